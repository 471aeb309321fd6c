"""``tokenmeter audit``: the ledger against the provider's Usage and Costs APIs (the sandbox's,
read with the openai SDK's admin client over HTTP).

A metered run audits clean; what the provider saw and the meter did not (an unmetered
script), a row the ledger lost, a wrong price: each is found and named.  The audit's own
failures (no key, a key that is not an admin key) are one line and exit 2.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace
from decimal import Decimal
from typing import Any

import pytest
from fastapi.testclient import TestClient
from openai import OpenAI
from sqlalchemy import delete
from typer.testing import CliRunner

from models import session_scope
from tests.helpers import clear_settings
from tokenmeter import OpenAICall, openai_hooks, usage_scope
from tokenmeter.context import CallRecord, record_call, set_sink
from tokenmeter.ledger import AuditRun
from tokenmeter.reporting import audit as auditing
from tokenmeter.reporting.api import create_app
from tokenmeter.reporting.cli import app as cli
from tokenmeter.sandbox.ground_truth import BilledRequest
from tokenmeter.sink import DatabaseSink, FileSpool

ADMIN_KEY = "sk-admin-audit-test"
AUDIT_TOKEN = "t0ken-for-the-audit-tests"
HOUR = 3600


@pytest.fixture
def metered(no_installation, db_url: str, tmp_path) -> Iterator[None]:
    """openai instrumented, each closed scope written to the test's ledger at once."""
    previous = set_sink(DatabaseSink(spool=FileSpool(tmp_path / "spool")))
    openai_hooks.instrument()
    try:
        yield
    finally:
        openai_hooks.uninstrument()
        set_sink(previous)


@pytest.fixture
def admin(sandbox) -> Iterator[Any]:
    client = OpenAI(
        base_url=sandbox.openai_base_url, api_key="x", admin_api_key=ADMIN_KEY, max_retries=0
    )
    yield client.admin.organization.usage
    client.close()


def _chat(client: OpenAI, n: int, model: str = "gpt-4o-mini", **kw: Any) -> None:
    for i in range(n):
        client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": f"audit {i}"}], **kw
        )


def _run(
    admin: Any, groups: tuple[str, ...] = ("model",), default_project: str | None = None
) -> auditing.AuditReport:
    """Audit the last two hours by the hour, as if two days later (every bucket and day
    closed)."""
    now = time.time()
    start = int(now) // HOUR * HOUR - HOUR
    with session_scope() as session:
        return auditing.audit(
            session,
            admin,
            start,
            start + 2 * HOUR,
            "1h",
            groups,
            settle_s=0,
            now=now + 2 * 86400,
            default_project=default_project,
        )


def test_a_metered_run_audits_clean(metered, openai_client, admin) -> None:
    with usage_scope("audit", "clean"):
        _chat(openai_client, 3)
        _chat(openai_client, 2, model="o3-mini")
        _chat(openai_client, 1, model="gpt-5-mini", service_tier="flex")
    report = _run(admin, ("model", "service_tier", "batch"))
    assert report.clean, report.differences
    assert report.compared == 2 and report.skipped == []
    served = {key[1] for key in report.provider}
    assert ("gpt-5-mini-2025-08-07", "flex", False) in served  # compared by the served tier
    assert sum(c.requests for c in report.ledger.values()) == 6


def test_calls_the_meter_never_saw_are_unmetered(metered, openai_client, admin) -> None:
    with usage_scope("audit", "metered"):
        _chat(openai_client, 2)
    openai_hooks.uninstrument()  # a script of the same organization that is not metered
    _chat(openai_client, 3)
    openai_hooks.instrument()
    report = _run(admin)
    kinds = {
        (d.what, d.kind, d.provider - d.ledger) for d in report.differences if d.what == "requests"
    }
    assert kinds == {("requests", "unmetered", Decimal(3))}
    assert all(d.kind == "unmetered" for d in report.differences)


def test_a_row_the_ledger_lost_and_a_wrong_price_are_named(metered, openai_client, admin) -> None:
    with usage_scope("audit", "priced"):
        _chat(openai_client, 4)
    with session_scope() as s:  # a wrong price: every token right, the dollars not
        for row in s.query(OpenAICall):
            row.cost_usd = row.cost_usd * 2
    report = _run(admin)
    assert [d.kind for d in report.differences] == ["priced differently"]
    [usd] = report.differences
    assert usd.what == "usd" and usd.ledger == 2 * usd.provider

    with session_scope() as s:  # now a row goes missing too
        victim = s.query(OpenAICall).order_by(OpenAICall.id).first()
        assert victim is not None
        s.execute(delete(OpenAICall).where(OpenAICall.id == victim.id))
    kinds = {(d.what, d.kind) for d in _run(admin).differences}
    assert ("requests", "unmetered") in kinds and ("usd", "unmetered") not in kinds


def test_hourly_and_daily_by_every_grouping_a_mixed_run_is_clean(
    metered, openai_client, admin
) -> None:
    with usage_scope("audit", "mixed"):
        _chat(openai_client, 2)
        _chat(openai_client, 1, model="gpt-5-mini", service_tier="flex")
        _chat(openai_client, 1, model="o4-mini", service_tier="priority")
    other = openai_client.with_options(project="proj_second")
    with usage_scope("audit", "other-project"):
        _chat(other, 2, model="o3-mini")
    now = time.time()
    day = int(now) // 86400 * 86400
    groups = ("model", "service_tier", "batch", "project_id")
    unnamed = _run(admin, groups)  # the key's own project: only the provider knows it
    assert unnamed.unnamed_projects and {d.kind for d in unnamed.differences} == {
        "unmetered",
        "missing upstream",
    }
    with session_scope() as session:
        daily = auditing.audit(
            session,
            admin,
            day - 86400,
            day + 86400,
            "1d",
            groups,
            settle_s=0,
            now=now + 2 * 86400,
            default_project="proj_sandbox_default",
        )
    hourly = _run(admin, groups, default_project="proj_sandbox_default")
    for report in (daily, hourly):
        assert report.clean, report.differences
        assert sum(c.requests for c in report.provider.values()) == 6
    assert daily.days_compared == 2 and daily.compared == 2
    projects = {key[1][3] for key in hourly.provider}
    assert projects == {"proj_sandbox_default", "proj_second"}


def test_a_flex_call_priced_as_default_is_named_by_its_tier(metered, openai_client, admin) -> None:
    with usage_scope("audit", "flex"):
        _chat(openai_client, 1, model="gpt-5-mini", service_tier="flex")
        _chat(openai_client, 1, model="gpt-5-mini")
    with session_scope() as s:  # the meter took the flex call for a default one
        row = s.query(OpenAICall).filter(OpenAICall.service_tier == "flex").one()
        row.service_tier, row.cost_usd = "default", row.cost_usd * 2
    found = {(d.group, d.what, d.kind, d.delta) for d in _run(admin, ("service_tier",)).differences}
    assert (("flex",), "requests", "unmetered", Decimal(1)) in found
    assert (("default",), "requests", "missing upstream", Decimal(-1)) in found
    [usd] = [d for d in _run(admin, ("service_tier",)).differences if d.what == "usd"]
    assert usd.ledger > usd.provider


def test_an_open_bucket_is_skipped_and_said_so(metered, openai_client, admin) -> None:
    with usage_scope("audit", "open"):
        _chat(openai_client, 1)
    now = time.time()
    start = int(now) // HOUR * HOUR
    with session_scope() as session:
        report = auditing.audit(session, admin, start, start + HOUR, "1h", settle_s=HOUR, now=now)
    assert report.compared == 0 and report.skipped == [start] and report.clean


def test_the_books_lag_which_is_why_recent_buckets_wait(
    metered, openai_client, sandbox, admin
) -> None:
    """The provider's books lag (the sandbox's too, when told): audited with no settling, a
    bucket that just closed looks as if the provider had never seen its calls."""
    sandbox.openai.usage_lag_s = HOUR
    try:
        with usage_scope("audit", "lag"):
            _chat(openai_client, 2)
        now = time.time()
        start = int(now) // HOUR * HOUR
        with session_scope() as session:
            hasty = auditing.audit(
                session, admin, start, start + HOUR, "1h", settle_s=0, now=now + HOUR
            )
            patient = auditing.audit(session, admin, start, start + HOUR, "1h", now=now + HOUR)
    finally:
        sandbox.openai.usage_lag_s = 0
    assert {(d.what, d.kind, d.delta) for d in hasty.differences if d.what == "requests"} == {
        ("requests", "missing upstream", Decimal(-2))
    }
    assert patient.compared == 0 and patient.skipped == [start] and patient.clean


def _billed_two_days_ago(sandbox: Any, request_id: str, n_in: int, n_out: int) -> int:
    """A gpt-4o-mini request the provider billed two days ago that no meter saw; its time."""
    when = int(time.time()) - 2 * 86400
    sandbox.openai.ledger.add(
        BilledRequest(
            request_id=request_id,
            operation="chat",
            model="gpt-4o-mini-2024-07-18",
            input_tokens=n_in,
            output_tokens=n_out,
            created=when,
        )
    )
    return when


def test_the_cli_finds_an_unmetered_day_and_exits_1(db_url, sandbox, monkeypatch) -> None:
    two_days_ago = _billed_two_days_ago(sandbox, "req_unmetered", 100, 10)
    monkeypatch.setenv("OPENAI_ADMIN_KEY", ADMIN_KEY)
    monkeypatch.setenv("OPENAI_BASE_URL", sandbox.openai_base_url)
    monkeypatch.setenv("COLUMNS", "160")
    # --settle 0: every bucket that has ended is compared, whatever the hour (the default hour
    # of settling skips yesterday's bucket in the first hour of a UTC day: 5 buckets, not 6)
    found = CliRunner().invoke(cli, ["audit", "--since", "7d", "--bucket", "1d", "--settle", "0"])
    assert found.exit_code == 1, found.output
    assert "unmetered" in found.output and "gpt-4o-mini-2024-07-18" in found.output
    assert ADMIN_KEY not in found.output
    as_json = CliRunner().invoke(
        cli, ["audit", "--since", "7d", "--format", "json", "--settle", "0"]
    )
    assert as_json.exit_code == 1 and '"kind": "unmetered"' in as_json.output
    as_csv = CliRunner().invoke(
        cli, ["audit", "--since", "7d", "--format", "csv", "--no-store", "--settle", "0"]
    )
    assert as_csv.exit_code == 1
    day = time.strftime("%Y-%m-%d 00:00", time.gmtime(two_days_ago))
    assert as_csv.output.splitlines() == [
        "bucket,group,what,provider,ledger,difference,kind",
        f"{day},gpt-4o-mini-2024-07-18,requests,1,0,+1,unmetered",
        f"{day},gpt-4o-mini-2024-07-18,input_tokens,100,0,+100,unmetered",
        f"{day},gpt-4o-mini-2024-07-18,output_tokens,10,0,+10,unmetered",
        # $0.15 and $0.60 per 1M input and output tokens (openai.com/api/pricing, 2024-07-18)
        f"{day},(all),usd,0.000021,0,+0.000021,unmetered",
    ]

    # each run is kept; the API shows the latest, its verdict and its worst difference
    monkeypatch.setenv("TOKENMETER_API_TOKEN", AUDIT_TOKEN)
    clear_settings()
    api = TestClient(create_app())
    latest = api.get("/api/usage/audits/latest", headers={"Authorization": f"Bearer {AUDIT_TOKEN}"})
    assert latest.status_code == 200, latest.text
    body = latest.json()
    assert body["clean"] is False and body["compared_buckets"] == 6 and body["bucket"] == "1d"
    assert body["worst"]["kind"] == "unmetered" and body["worst"]["what"] == "input_tokens"
    assert body["worst"]["provider"] == "100" and body["worst"]["ledger"] == "0"
    page = api.get("/", headers={"Authorization": f"Bearer {AUDIT_TOKEN}"})
    assert page.status_code == 200
    assert '<b id="audit-verdict">4 differences</b> in 6 closed 1d buckets' in page.text
    assert "worst: unmetered input_tokens in gpt-4o-mini-2024-07-18" in page.text
    assert "provider 100, ledger 0" in page.text
    with session_scope() as s:
        assert s.query(AuditRun).count() == 2
    CliRunner().invoke(cli, ["audit", "--since", "7d", "--no-store"])
    with session_scope() as s:
        assert s.query(AuditRun).count() == 2


def test_the_beat_task_audits_keeps_the_run_and_sets_the_gauges(
    no_installation, db_url, sandbox, monkeypatch
) -> None:
    """``tokenmeter.install`` adds ``tokenmeter.audit`` to the app (for beat): it runs the same
    audit, keeps it, and exports the difference nothing explains as a Prometheus gauge."""
    from celery import Celery
    from prometheus_client import REGISTRY

    import tokenmeter

    _billed_two_days_ago(sandbox, "req_unmetered_task", 1000, 20)
    monkeypatch.setenv("OPENAI_ADMIN_KEY", ADMIN_KEY)
    app = Celery("audit_beat")
    app.conf.update(task_always_eager=True, broker_url="memory://")
    handle = tokenmeter.install(app, recovery_interval_s=0, instrument_openai=False)
    try:
        result = app.tasks["tokenmeter.audit"].apply(
            # settle 0: six closed days at any hour (see the CLI's test)
            kwargs={"since_s": 7 * 86400, "settle_s": 0, "base_url": sandbox.openai_base_url}
        )
    finally:
        handle.uninstall()
    summary = result.get()
    assert summary["clean"] is False and summary["compared_buckets"] == 6
    assert summary["unexplained"]["requests"] == "1"
    assert summary["unexplained"]["input_tokens"] == "1000"
    # 1000 x $0.15/1M + 20 x $0.60/1M (openai.com/api/pricing, gpt-4o-mini-2024-07-18)
    assert summary["unexplained"]["usd"] == "0.000162"

    def gauge(name: str, **labels: str) -> float | None:
        return REGISTRY.get_sample_value(name, labels)

    assert gauge("tokenmeter_audit_unexplained_difference", measure="input_tokens") == 1000
    assert gauge("tokenmeter_audit_unexplained_difference", measure="usd") == 0.000162
    assert gauge("tokenmeter_audit_clean") == 0
    assert time.time() - (gauge("tokenmeter_audit_last_run_timestamp_seconds") or 0) < 60
    with session_scope() as s:
        [run] = s.query(AuditRun).all()
        assert run.clean is False and ADMIN_KEY not in run.differences
    assert not any(ADMIN_KEY in str(v) for v in summary.values())

    sandbox.openai.ledger.clear()  # now the books agree: the gauges say so
    result = app.tasks["tokenmeter.audit"].apply(
        kwargs={"since_s": 7 * 86400, "settle_s": 0, "base_url": sandbox.openai_base_url}
    )
    assert result.get()["clean"] is True
    assert gauge("tokenmeter_audit_clean") == 1
    assert gauge("tokenmeter_audit_unexplained_difference", measure="usd") == 0

    monkeypatch.delenv("OPENAI_ADMIN_KEY")  # no key: the task fails, says why, counts it
    before = gauge("tokenmeter_audit_failures_total") or 0
    failed = app.tasks["tokenmeter.audit"].apply(kwargs={"base_url": sandbox.openai_base_url})
    assert failed.failed() and "OPENAI_ADMIN_KEY" in str(failed.result)
    assert gauge("tokenmeter_audit_failures_total") == before + 1


def test_the_audit_table_keeps_every_model_name_and_figure_at_80_columns(
    db_url, sandbox, monkeypatch
) -> None:
    two_days_ago = int(time.time()) - 2 * 86400
    for i, (model, tier) in enumerate(
        [("gpt-4o-mini-2024-07-18", "default"), ("gpt-5-mini-2025-08-07", "flex")]
    ):
        sandbox.openai.ledger.add(
            BilledRequest(
                request_id=f"req_wide_{i}",
                operation="chat",
                model=model,
                service_tier=tier,
                input_tokens=123_456_789,
                output_tokens=10,
                created=two_days_ago,
            )
        )
    monkeypatch.setenv("OPENAI_ADMIN_KEY", ADMIN_KEY)
    monkeypatch.setenv("OPENAI_BASE_URL", sandbox.openai_base_url)
    for columns in ("80", "200"):
        monkeypatch.setenv("COLUMNS", columns)
        found = CliRunner().invoke(
            cli, ["audit", "--since", "7d", "--by", "model,service_tier", "--no-store"]
        )
        assert found.exit_code == 1, found.output
        lines = found.output.splitlines()
        assert "…" not in found.output and max(map(len, lines)) <= int(columns)
        for name in ("gpt-4o-mini-2024-07-18", "gpt-5-mini-2025-08-07", "+123456789"):
            assert any(name in line for line in lines), (name, found.output)


def test_no_audit_yet_is_a_404_that_says_what_to_run(db_url, monkeypatch) -> None:
    monkeypatch.setenv("TOKENMETER_API_TOKEN", AUDIT_TOKEN)
    clear_settings()
    none = TestClient(create_app()).get(
        "/api/usage/audits/latest", headers={"Authorization": f"Bearer {AUDIT_TOKEN}"}
    )
    assert none.status_code == 404 and "tokenmeter audit" in none.text
    page = TestClient(create_app()).get("/", headers={"Authorization": f"Bearer {AUDIT_TOKEN}"})
    assert "no audit yet: run <code>tokenmeter audit</code>" in page.text


def test_the_cli_says_in_one_line_what_is_wrong_with_the_key(db_url, sandbox, monkeypatch) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", sandbox.openai_base_url)
    monkeypatch.delenv("OPENAI_ADMIN_KEY", raising=False)
    missing = CliRunner().invoke(cli, ["audit"])
    assert missing.exit_code == 2 and "OPENAI_ADMIN_KEY" in missing.output
    monkeypatch.setenv("OPENAI_ADMIN_KEY", "sk-proj-not-an-admin-key")
    refused = CliRunner().invoke(cli, ["audit"])
    assert refused.exit_code == 2 and "need an admin key" in refused.output
    assert "sk-proj-not-an-admin-key" not in refused.output
    assert len(refused.output.strip().splitlines()) == 1


def test_every_page_is_read(metered, openai_client, admin, monkeypatch) -> None:
    """Minute buckets, two hours of them, a page limit of 7: the audit follows next_page."""
    monkeypatch.setitem(auditing.PAGE_LIMITS, "1m", 7)
    with usage_scope("audit", "pages"):
        _chat(openai_client, 2)
    now = time.time()
    start = int(now) // 60 * 60 - 60 * 60
    with session_scope() as session:
        report = auditing.audit(
            session, admin, start, start + 61 * 60, "1m", settle_s=0, now=now + 3600
        )
    assert report.clean and report.compared == 61
    assert sum(c.requests for c in report.provider.values()) == 2


def test_billed_request_created_survives_the_json_round_trip() -> None:
    row = BilledRequest(request_id="r", operation="chat", model="m", created=123)
    assert BilledRequest.from_json(row.to_json()) == row
    assert replace(row, created=5).created == 5


def test_ledger_rows_the_provider_never_billed_and_calls_never_answered(
    metered, sandbox, admin
) -> None:
    """A row in the ledger the provider has no trace of is "missing upstream"; a call the
    provider billed while the meter saw no answer (billed-unknown, tokens unknown) explains
    the tokens it lacks as "usage unknown"."""
    with usage_scope("audit", "odd"):
        record_call(
            CallRecord(
                operation="chat",
                requested_model="gpt-4o-mini",
                response_model="gpt-4o-mini-2024-07-18",
                request_id="req_only_in_the_ledger",
                input_tokens=50,
                output_tokens=5,
                cost_usd=Decimal("0.0000105"),
            )
        )
        record_call(
            CallRecord(
                operation="chat",
                requested_model="o3-mini",
                client_request_id="tm-timed-out",
                status="billed_unknown",
                usage_reported=False,
            )
        )
    sandbox.openai.ledger.add(
        BilledRequest(
            request_id="req_timed_out",
            operation="chat",
            model="o3-mini",
            input_tokens=400,
            output_tokens=90,
            client_request_id="tm-timed-out",
        )
    )
    report = _run(admin)
    kinds = {(d.group, d.what): d.kind for d in report.differences}
    assert kinds[(("gpt-4o-mini-2024-07-18",), "requests")] == "missing upstream"
    assert (("o3-mini",), "requests") not in kinds  # one billed, one in the ledger
    assert kinds[(("o3-mini",), "input_tokens")] == "usage unknown"


def test_a_timed_out_call_counts_under_the_model_the_provider_served(
    metered, openai_client, sandbox, admin
) -> None:
    """Found by `make reconcile`: a call never answered knows only the name its client asked
    for (gpt-4o-mini); the provider books it under the snapshot it served."""
    import openai

    impatient = openai_client.with_options(timeout=0.3, max_retries=0)
    with usage_scope("audit", "timeout"):
        _chat(openai_client, 1)
        with pytest.raises(openai.APITimeoutError):
            _chat(impatient, 1, extra_headers={"X-Sandbox-Fault": "slow=800"})
    deadline = time.monotonic() + 10
    while len(sandbox.ledger) < 2:  # the sandbox finishes and bills what the client left
        assert time.monotonic() < deadline, "the timed-out call was never billed"
        time.sleep(0.05)
    report = _run(admin)
    assert report.ledger[next(iter(report.ledger))].usage_unknown == 1
    assert {key[1] for key in report.ledger} == {("gpt-4o-mini-2024-07-18",)}
    assert {(d.what, d.kind) for d in report.differences} == {
        ("input_tokens", "usage unknown"),
        ("output_tokens", "usage unknown"),
        ("usd", "usage unknown"),  # the ledger holds its cost at NULL, never $0
    }


def test_a_timed_out_priority_call_counts_under_the_tier_it_asked_for(
    metered, openai_client, sandbox, admin
) -> None:
    """Found by `make reconcile` under faults: a call never answered has no response to say
    which tier served it; it asked for priority, and priority is what the provider billed."""
    import openai

    impatient = openai_client.with_options(timeout=0.3, max_retries=0)
    with usage_scope("audit", "timeout-priority"):
        _chat(openai_client, 1, model="gpt-5-mini", service_tier="priority")
        with pytest.raises(openai.APITimeoutError):
            _chat(
                impatient,
                1,
                model="gpt-5-mini",
                service_tier="priority",
                extra_headers={"X-Sandbox-Fault": "slow=800"},
            )
    deadline = time.monotonic() + 10
    while len(sandbox.ledger) < 2:
        assert time.monotonic() < deadline, "the timed-out call was never billed"
        time.sleep(0.05)
    report = _run(admin, ("model", "service_tier"))
    assert {d.kind for d in report.differences} == {"usage unknown"}, report.differences
    assert {key[1] for key in report.ledger} == {("gpt-5-mini-2025-08-07", "priority")}


def test_a_call_that_never_reached_the_provider_is_usage_unknown_not_missing(
    metered, openai_client, sandbox, admin
) -> None:
    """Found by `make reconcile --faults`: a call whose connection broke before the provider
    took it is billed-unknown in the ledger (the meter cannot tell) and absent from the
    provider's books; the ledger's extra request is one of its calls of unknown usage, not a
    row the provider lost."""
    import openai

    once = openai_client.with_options(max_retries=0)
    with usage_scope("audit", "dropped"):
        _chat(openai_client, 1)
        with pytest.raises(openai.APIConnectionError):
            _chat(once, 1, extra_headers={"X-Sandbox-Fault": "drop"})
    assert len(sandbox.ledger) == 1  # the dropped call billed nothing
    with session_scope() as session:
        statuses = sorted(c.status for c in session.query(OpenAICall))
    assert statuses == ["billed_unknown", "ok"]
    report = _run(admin)
    assert [(d.what, d.provider, d.ledger, d.kind) for d in report.differences] == [
        ("requests", 1, 2, "usage unknown")
    ]
    assert not any(auditing.unexplained(report).values())


def test_cache_writes_are_compared(metered, openai_client, admin) -> None:
    """The Usage API's ``input_cache_write_tokens`` against the ledger's: gpt-5.6 writes a long
    prompt to the cache (and bills the writes apart); a ledger that lost them is named."""
    prompt = "Catalogue of handmade gifts, one per line: wool foxes, felt owls. " * 80
    with usage_scope("audit", "writes"):
        openai_client.chat.completions.create(
            model="gpt-5.6-sol", messages=[{"role": "user", "content": prompt}]
        )
    report = _run(admin)
    assert report.clean, report.differences
    (theirs,) = report.provider.values()
    assert theirs.cache_write_tokens > 1024
    with session_scope() as session:
        session.query(OpenAICall).update({"cache_write_tokens": 0})
    report = _run(admin)
    assert [(d.what, d.kind) for d in report.differences] == [("cache_write_tokens", "unmetered")]


def test_the_provider_failing_is_retried_then_said_in_one_line(
    metered, openai_client, sandbox, monkeypatch
) -> None:
    """429 and 500 are retried with backoff (the SDK's, 5 tries); failing for good is one line,
    exit 2, never a partial audit presented as a whole."""
    with usage_scope("audit", "retried"):
        _chat(openai_client, 1)
    monkeypatch.setenv("OPENAI_ADMIN_KEY", ADMIN_KEY)
    monkeypatch.setenv("OPENAI_BASE_URL", sandbox.openai_base_url)
    path = "/v1/organization/usage/completions"
    sandbox.openai.faults.add("429", times=2, path=path)
    passed = CliRunner().invoke(cli, ["audit", "--since", "1d"])
    assert passed.exit_code == 0, passed.output  # two refusals, then the answer
    assert "nothing to compare yet" in passed.output  # today's bucket is still open
    sandbox.openai.faults.add("500", times=100, path="/v1/organization/costs")
    failed = CliRunner().invoke(cli, ["audit", "--since", "1d"])
    assert failed.exit_code == 2
    assert failed.output.strip().splitlines() == [
        "error: the provider answered 500 after 5 retries; nothing was compared (a partial "
        "answer is never reported); try again later"
    ]
    assert ADMIN_KEY not in failed.output
    sandbox.openai.faults.clear()


KEY_A = "sk-proj-" + "a" * 40 + "wxyz"
KEY_B = "sk-proj-" + "b" * 40 + "last"


def test_calls_carry_their_project_and_a_key_hint_never_the_key(metered, sandbox, admin) -> None:
    with usage_scope("audit", "projects"):
        for key, project in ((KEY_A, "proj_a"), (KEY_B, "proj_b")):
            with OpenAI(
                base_url=sandbox.openai_base_url, api_key=key, project=project, max_retries=0
            ) as client:
                _chat(client, 2)
    with session_scope() as s:
        rows = s.query(OpenAICall).order_by(OpenAICall.id).all()
        stored = [
            (r.project, r.api_key_hint, [getattr(r, c.name) for c in OpenAICall.__table__.columns])
            for r in rows
        ]
    assert [(p, h) for p, h, _ in stored] == [("proj_a", "sk-proj...wxyz")] * 2 + [
        ("proj_b", "sk-proj...last")
    ] * 2
    assert not any(KEY_A in str(v) or KEY_B in str(v) for _, _, row in stored for v in row)
    report = _run(admin, ("project_id", "model"))
    assert report.clean, report.differences
    assert {key[1][0] for key in report.ledger} == {"proj_a", "proj_b"}

    openai_hooks.uninstrument()  # project b also runs a script nobody meters
    with OpenAI(
        base_url=sandbox.openai_base_url, api_key=KEY_B, project="proj_b", max_retries=0
    ) as client:
        _chat(client, 1)
    openai_hooks.instrument()
    found = {(d.group[0], d.what, d.kind) for d in _run(admin, ("project_id",)).differences}
    assert ("proj_b", "requests", "unmetered") in found
    assert not any(group == "proj_a" for group, _, _ in found)


def test_a_client_whose_key_changes_is_hinted_by_its_new_key(metered, sandbox) -> None:
    """The hint is kept on the client with the key it was made from: a key swapped on the same
    client (a rotation) gets its own hint, never the old key's."""
    client = OpenAI(base_url=sandbox.openai_base_url, api_key=KEY_A, max_retries=0)
    with client, usage_scope("audit", "rotation") as scope:
        _chat(client, 1)
        client.api_key = KEY_B
        _chat(client, 1)
    assert [c.api_key_hint for c in scope.all_calls()] == ["sk-proj...wxyz", "sk-proj...last"]


def test_a_key_hint_gives_nothing_away() -> None:
    from tokenmeter.capture import key_hint

    assert key_hint(KEY_A) == "sk-proj...wxyz"
    assert key_hint("sk-" + "c" * 45) == "sk...cccc"
    assert key_hint("sk-svcacct-" + "d" * 40) == "sk-svcacct...dddd"
    assert key_hint("sk-sandbox") == "sk..."  # too short to show any of it
    assert key_hint(None) is None and key_hint("not-a-key") is None
