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


def _run(admin: Any, groups: tuple[str, ...] = ("model",)) -> auditing.AuditReport:
    """Audit the last two hours by the hour, as if two days later (every bucket and day
    closed)."""
    now = time.time()
    start = int(now) // HOUR * HOUR - HOUR
    with session_scope() as session:
        return auditing.audit(
            session, admin, start, start + 2 * HOUR, "1h", groups, settle_s=0, now=now + 2 * 86400
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


def test_an_open_bucket_is_skipped_and_said_so(metered, openai_client, admin) -> None:
    with usage_scope("audit", "open"):
        _chat(openai_client, 1)
    now = time.time()
    start = int(now) // HOUR * HOUR
    with session_scope() as session:
        report = auditing.audit(session, admin, start, start + HOUR, "1h", settle_s=HOUR, now=now)
    assert report.compared == 0 and report.skipped == [start] and report.clean


def test_the_cli_finds_an_unmetered_day_and_exits_1(db_url, sandbox, monkeypatch) -> None:
    two_days_ago = int(time.time()) - 2 * 86400
    sandbox.openai.ledger.add(
        BilledRequest(
            request_id="req_unmetered",
            operation="chat",
            model="gpt-4o-mini-2024-07-18",
            input_tokens=100,
            output_tokens=10,
            created=two_days_ago,
        )
    )
    monkeypatch.setenv("OPENAI_ADMIN_KEY", ADMIN_KEY)
    monkeypatch.setenv("OPENAI_BASE_URL", sandbox.openai_base_url)
    monkeypatch.setenv("COLUMNS", "160")
    found = CliRunner().invoke(cli, ["audit", "--since", "7d", "--bucket", "1d"])
    assert found.exit_code == 1, found.output
    assert "unmetered" in found.output and "gpt-4o-mini-2024-07-18" in found.output
    assert ADMIN_KEY not in found.output
    as_json = CliRunner().invoke(cli, ["audit", "--since", "7d", "--format", "json"])
    assert as_json.exit_code == 1 and '"kind": "unmetered"' in as_json.output

    # each run is kept; the API shows the latest, its verdict and its worst difference
    monkeypatch.setenv("TOKENMETER_API_TOKEN", "t0ken")
    clear_settings()
    api = TestClient(create_app())
    latest = api.get("/api/usage/audits/latest", headers={"Authorization": "Bearer t0ken"})
    assert latest.status_code == 200, latest.text
    body = latest.json()
    assert body["clean"] is False and body["compared_buckets"] == 6 and body["bucket"] == "1d"
    assert body["worst"]["kind"] == "unmetered" and body["worst"]["what"] == "input_tokens"
    assert body["worst"]["provider"] == "100" and body["worst"]["ledger"] == "0"
    with session_scope() as s:
        assert s.query(AuditRun).count() == 2
    CliRunner().invoke(cli, ["audit", "--since", "7d", "--no-store"])
    with session_scope() as s:
        assert s.query(AuditRun).count() == 2


def test_no_audit_yet_is_a_404_that_says_what_to_run(db_url, monkeypatch) -> None:
    monkeypatch.setenv("TOKENMETER_API_TOKEN", "t0ken")
    clear_settings()
    none = TestClient(create_app()).get(
        "/api/usage/audits/latest", headers={"Authorization": "Bearer t0ken"}
    )
    assert none.status_code == 404 and "tokenmeter audit" in none.text


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
    the tokens it lacks as "never answered"."""
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
    assert kinds[(("o3-mini",), "input_tokens")] == "never answered"


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
        "error: the provider answered 500 after retries; try again later"
    ]
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


def test_a_key_hint_gives_nothing_away() -> None:
    from tokenmeter.capture import key_hint

    assert key_hint(KEY_A) == "sk-proj...wxyz"
    assert key_hint("sk-" + "c" * 45) == "sk...cccc"
    assert key_hint("sk-svcacct-" + "d" * 40) == "sk-svcacct...dddd"
    assert key_hint("sk-sandbox") == "sk..."  # too short to show any of it
    assert key_hint(None) is None and key_hint("not-a-key") is None
