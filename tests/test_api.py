"""The usage API and dashboard: auth, validation, exact totals that agree with the CLI."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import schemathesis
import uvicorn
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from sqlalchemy import select
from typer.testing import CliRunner

from models import AgentScannedPost, PipelineRun, PipelineRunUsage, migrate, session_scope
from tests.helpers import clear_settings
from tokenmeter import OpenAICall
from tokenmeter.reporting.api import create_app
from tokenmeter.reporting.cli import app as cli

TOKEN = "s3cret-token-for-the-api-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def seed() -> None:
    now = datetime.now(UTC)
    with session_scope() as s:
        run = PipelineRun(status="completed", config={"commission": True, "donation_id": "d1"})
        s.add(run)
        s.flush()
        s.add(
            PipelineRunUsage(
                pipeline_run_id=run.id,
                idea_model="gpt-4o-mini",
                image_model="dall-e-3",
                prompt_tokens=100,
                completion_tokens=50,
                image_count=2,
                total_cost_usd=Decimal("0.08004500"),
            )
        )
        s.add(
            AgentScannedPost(
                post_id="p1",
                subreddit="crafts",
                agent_model="gpt-4o-mini",
                prompt_tokens=300,
                completion_tokens=40,
                total_cost_usd=Decimal("0.000069"),
            )
        )
        s.add_all(
            [
                OpenAICall(
                    request_id="r1",
                    operation="chat",
                    model="gpt-4o-mini",
                    task_name="tasks.commission",
                    scope_kind="pipeline_run",
                    scope_ref=str(run.id),
                    input_tokens=100,
                    output_tokens=50,
                    cost_usd=Decimal("0.000045"),
                    created_at=now - timedelta(hours=2),
                ),
                OpenAICall(
                    request_id="r2",
                    operation="image",
                    model="dall-e-3",
                    task_name="tasks.commission",
                    scope_kind="pipeline_run",
                    scope_ref=str(run.id),
                    image_count=2,
                    cost_usd=Decimal("0.08"),
                    created_at=now - timedelta(hours=2),
                ),
                OpenAICall(
                    request_id="r3",
                    operation="chat",
                    model="gpt-4o-mini",
                    task_name="tasks.promotion_scan",
                    scope_kind="scanned_post",
                    scope_ref="p1",
                    input_tokens=300,
                    output_tokens=40,
                    cost_usd=Decimal("0.000069"),
                    # two days back: never the day of the others (at most 2 h back), at any hour
                    created_at=now - timedelta(days=2),
                ),
                OpenAICall(
                    request_id="r4",
                    operation="chat",
                    model="gpt-4o-mini",
                    status="error",
                    error_type="RateLimitError",
                    http_status=429,
                    cost_usd=Decimal(0),
                    created_at=now - timedelta(hours=1),
                ),
            ]
        )


@pytest.fixture
def client(db_url: str, monkeypatch: pytest.MonkeyPatch) -> TestClient:
    monkeypatch.setenv("TOKENMETER_API_TOKEN", TOKEN)
    clear_settings()
    seed()
    return TestClient(create_app())


def test_refuses_to_start_without_a_token(db_url: str) -> None:
    with pytest.raises(RuntimeError, match="TOKENMETER_API_TOKEN is not set"):
        create_app()
    open_app = TestClient(create_app(require_auth=False), base_url="http://127.0.0.1")
    assert open_app.get("/api/usage/summary").status_code == 200


def test_bearer_token_is_required(client: TestClient) -> None:
    assert client.get("/api/usage/summary").status_code == 401
    wrong = client.get("/api/usage/summary", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
    assert client.get("/api/usage/summary", headers=AUTH).status_code == 200


def test_summary_is_exact_and_agrees_with_cli_and_dashboard(client: TestClient) -> None:
    body = client.get("/api/usage/summary", headers=AUTH, params={"group_by": "task"}).json()
    assert body["total"]["cost_usd"] == "0.0801140000"
    assert body["total"]["calls"] == 4 and body["total"]["errors"] == 1
    groups = {g["key"]: g for g in body["groups"]}
    assert groups["tasks.commission"]["cost_usd"] == "0.0800450000"
    assert groups["tasks.commission"]["image_count"] == 2

    cli_out = json.loads(
        CliRunner().invoke(cli, ["check-usage", "--by", "task", "--format", "json"]).output
    )
    assert cli_out["total"]["cost_usd"] == body["total"]["cost_usd"]
    page = client.get("/", headers=AUTH).text
    assert '<b id="total-cost">$0.080114</b>' in page

    # every group, to the cent, in the API, the CLI's JSON and table, and the dashboard
    from tokenmeter.reporting.render import money

    for by in ("model", "task", "kind", "tier", "status"):
        api = client.get("/api/usage/summary", headers=AUTH, params={"group_by": by}).json()
        as_json = json.loads(
            CliRunner().invoke(cli, ["check-usage", "--by", by, "--format", "json"]).output
        )
        table = CliRunner().invoke(cli, ["check-usage", "--by", by], env={"COLUMNS": "200"})
        dash = client.get("/", headers=AUTH, params={"group_by": by, "days": 7}).text
        pairs = {(g["key"], g["cost_usd"]) for g in api["groups"]}
        assert pairs == {(g["key"], g["cost_usd"]) for g in as_json["groups"]}, by
        for key, cost in pairs:
            shown = money(Decimal(cost)) if cost is not None else "unknown"
            assert any(key in line and shown in line for line in table.output.splitlines())
            assert f'<td class="l">{key}</td>' in dash and shown in dash, (by, key)


def test_money_is_plain_decimal_text_in_api_and_cli(client: TestClient) -> None:
    """Zero and sub-cent sums read "0.0000000000" and "0.0801140200", never "0E-10" / "2E-8"."""
    with session_scope() as s:
        s.add(
            OpenAICall(
                request_id="r5",
                operation="embedding",
                model="text-embedding-3-small",
                input_tokens=1,
                cost_usd=Decimal("0.00000002"),
                created_at=datetime.now(UTC) - timedelta(minutes=5),
            )
        )
    params = {"group_by": "status"}
    body = client.get("/api/usage/summary", headers=AUTH, params=params).json()
    costs = {g["key"]: g["cost_usd"] for g in body["groups"]}
    assert costs == {"ok": "0.0801140200", "error": "0.0000000000"}
    calls = client.get("/api/usage/calls", headers=AUTH, params={"limit": 10}).json()
    assert "0.0000000200" in {c["cost_usd"] for c in calls["items"]}

    cli_out = json.loads(
        CliRunner().invoke(cli, ["check-usage", "--by", "status", "--format", "json"]).output
    )
    assert {g["key"]: g["cost_usd"] for g in cli_out["groups"]} == costs


def test_windows_and_groups(client: TestClient) -> None:
    with session_scope() as s:
        seeded = list(s.scalars(select(OpenAICall.created_at)))
    assert len(seeded) == 4
    day = (datetime.now(UTC) - timedelta(days=2)).date()  # r3's day, and only r3's
    one_day = client.get(
        "/api/usage/summary",
        headers=AUTH,
        params={"start_date": day.isoformat(), "end_date": day.isoformat()},
    ).json()
    # a bare end date includes that day, and only that day
    expected = sum(1 for t in seeded if t.astimezone(UTC).date() == day)
    assert one_day["total"]["calls"] == expected < 4
    by_kind = client.get("/api/usage/summary", headers=AUTH, params={"group_by": "kind"}).json()
    assert {g["key"] for g in by_kind["groups"]} == {"pipeline_run", "scanned_post", "none"}
    by_day = client.get("/api/usage/summary", headers=AUTH, params={"group_by": "day"}).json()
    assert sum(int(g["calls"]) for g in by_day["groups"]) == 4
    only = client.get(
        "/api/usage/summary",
        headers=AUTH,
        params={"group_by": "task", "model": "gpt-4o-mini", "task": "tasks.commission"},
    ).json()
    assert [(g["key"], g["calls"]) for g in only["groups"]] == [("tasks.commission", 1)]
    by_project = client.get(
        "/api/usage/summary", headers=AUTH, params={"group_by": "project"}
    ).json()
    assert [(g["key"], g["calls"]) for g in by_project["groups"]] == [("(none)", 4)]


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"start_date": "last tuesday"}, "is not an ISO date"),
        ({"end_date": "2026-13-45"}, "is not an ISO date"),
        ({"start_date": "2026-11-20", "end_date": "2026-11-10"}, "end_date must be after"),
        ({"group_by": "colour"}, "group_by"),
    ],
)
def test_bad_input_is_a_clear_422(client: TestClient, params, message) -> None:
    response = client.get("/api/usage/summary", headers=AUTH, params=params)
    assert response.status_code == 422 and message in response.json()["detail"]


def test_scopes_and_calls(client: TestClient) -> None:
    with session_scope() as s:
        run_id = s.query(PipelineRun.id).scalar()
    top = client.get("/api/usage/scopes", headers=AUTH).json()["scopes"]
    assert [(t["kind"], t["ref"], t["cost_usd"], t["calls"]) for t in top] == [
        ("pipeline_run", str(run_id), "0.0800450000", 2),
        ("scanned_post", "p1", "0.0000690000", 1),
    ]
    only_posts = client.get("/api/usage/scopes", headers=AUTH, params={"kind": "scanned_post"})
    assert [t["ref"] for t in only_posts.json()["scopes"]] == ["p1"]
    run = client.get(f"/api/usage/scopes/pipeline_run/{run_id}", headers=AUTH).json()
    assert [c["request_id"] for c in run["calls"]] == ["r1", "r2"]
    post = client.get("/api/usage/scopes/scanned_post/p1", headers=AUTH).json()
    assert [(c["request_id"], c["input_tokens"]) for c in post["calls"]] == [("r3", 300)]
    assert client.get("/api/usage/scopes/pipeline_run/999999", headers=AUTH).status_code == 404
    assert client.get("/api/usage/scopes/scanned_post/nope", headers=AUTH).status_code == 404
    page1 = client.get("/api/usage/calls", headers=AUTH, params={"page_size": 3}).json()
    page2 = client.get("/api/usage/calls", headers=AUTH, params={"page_size": 3, "page": 2}).json()
    assert page1["total"] == 4 and len(page1["items"]) == 3 and len(page2["items"]) == 1
    errors = client.get("/api/usage/calls", headers=AUTH, params={"status": "error"}).json()
    assert [c["error_type"] for c in errors["items"]] == ["RateLimitError"]
    assert client.get("/api/usage/calls", headers=AUTH, params={"page_size": 0}).status_code == 422


@pytest.mark.parametrize("ttl", [0.0, 0.4])
def test_a_repeated_summary_is_answered_from_memory_for_its_ttl_only(
    db_url: str, monkeypatch: pytest.MonkeyPatch, ttl: float
) -> None:
    """TOKENMETER_API_CACHE_S: the same query within it gets the same answer (its window
    says which); after it, or with 0, a call written since is counted; another query is
    computed on its own."""
    import time

    monkeypatch.setenv("TOKENMETER_API_TOKEN", TOKEN)
    monkeypatch.setenv("TOKENMETER_API_CACHE_S", str(ttl))
    clear_settings()
    seed()
    client = TestClient(create_app())

    def calls(**params: str) -> int:
        response = client.get("/api/usage/summary", params=params, headers=AUTH)
        assert response.status_code == 200, response.text
        return int(response.json()["total"]["calls"])

    before = calls(group_by="model")
    asked = time.monotonic()
    with session_scope() as s:
        s.add(OpenAICall(request_id="req_after", operation="chat", model="gpt-4o-mini"))
    again = calls(group_by="model")
    if ttl and time.monotonic() - asked < ttl:
        assert again == before  # the same answer, from memory
    else:
        assert again == before + 1
    assert calls(group_by="task") == before + 1  # another query: computed
    time.sleep(ttl + 0.05)
    assert calls(group_by="model") == before + 1


def test_the_answer_cache_is_bounded() -> None:
    from tokenmeter.reporting.web import AnswerCache

    cache = AnswerCache(60, size=3)
    for i in range(10):
        cache.put(i, b"%d" % i)
    assert [cache.get(i) for i in range(10)] == [None] * 7 + [b"7", b"8", b"9"]
    assert AnswerCache(0).get("x") is None


async def test_answers_asked_at_the_same_moment_are_computed_once() -> None:
    """Requests that miss the cache together share one computation; a failure reaches each
    of them and is not kept; with the cache off each computes its own."""
    import asyncio

    from tokenmeter.reporting.web import AnswerCache

    computed: list[str] = []
    release = asyncio.Event()

    async def slow(tag: str, fail: bool = False) -> bytes:
        computed.append(tag)
        await release.wait()
        if fail:
            raise ValueError("bad window")
        return tag.encode()

    cache = AnswerCache(60)
    waiting = [asyncio.ensure_future(cache.answer("k", lambda: slow("k"))) for _ in range(5)]
    await asyncio.sleep(0)
    release.set()
    assert await asyncio.gather(*waiting) == [b"k"] * 5 and computed == ["k"]
    assert await cache.answer("k", lambda: slow("again")) == b"k"  # kept: not computed
    release.clear()
    failing = [asyncio.ensure_future(cache.answer("f", lambda: slow("f", True))) for _ in range(3)]
    await asyncio.sleep(0)
    release.set()
    outcomes = await asyncio.gather(*failing, return_exceptions=True)
    assert all(isinstance(o, ValueError) for o in outcomes) and computed == ["k", "f"]
    assert cache.get("f") is None  # a failure is not kept
    off = AnswerCache(0)
    both = await asyncio.gather(
        off.answer("k", lambda: slow("1")), off.answer("k", lambda: slow("2"))
    )
    assert both == [b"1", b"2"]


def test_openapi_fuzzing_finds_no_server_error(sqlite_url: str, monkeypatch) -> None:
    """Every operation of the OpenAPI schema, fuzzed: never a 5xx, only 200/404/422."""
    migrate.upgrade(sqlite_url)
    monkeypatch.setenv("DATABASE_URL", sqlite_url)
    monkeypatch.setenv("TOKENMETER_API_TOKEN", TOKEN)
    clear_settings()
    seed()
    schema = schemathesis.openapi.from_asgi("/openapi.json", create_app())
    seen: list[tuple[str, int]] = []

    @given(case=schema.as_strategy())
    @settings(
        max_examples=200, deadline=None, suppress_health_check=list(HealthCheck), database=None
    )
    def check(case: schemathesis.Case) -> None:
        response = case.call(headers=AUTH)
        seen.append((case.path, response.status_code))
        assert response.status_code in (200, 404, 422), (case.path, case.query, response.text)

    check()
    assert {path for path, _ in seen} == {
        "/api/usage/summary",
        "/api/usage/scopes",
        "/api/usage/scopes/{kind}/{ref}",
        "/api/usage/calls",
        "/api/usage/audits/latest",
    }
    assert any(code == 422 for _, code in seen) and any(code == 200 for _, code in seen)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def served(client: TestClient) -> Iterator[tuple[str, Any]]:
    port = _free_port()
    application = create_app()
    server = uvicorn.Server(
        uvicorn.Config(application, host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", application
    server.should_exit = True
    thread.join(timeout=10)


def test_dashboard_renders_in_headless_chromium(served: tuple[str, Any], tmp_path: Path) -> None:
    """The overview, a range, a grouping, a run's and a post's page, rendered by Chromium
    with every host but this server unresolvable (nothing loads from anywhere else), each
    checked on the totals it shows; screenshots of the overview and a run go to docs/ when
    TOKENMETER_SCREENSHOTS is set."""
    import os

    url, application = served
    chromium = "/usr/bin/chromium"
    if not Path(chromium).exists():
        pytest.fail("Debian's chromium is required (`make test` installs it)")
    with session_scope() as s:
        run_id = s.query(PipelineRun.id).scalar()
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",  # offline but for us
        f"--user-data-dir={tmp_path / 'profile'}",
    ]

    def browse(*args: str) -> str:
        return subprocess.run(
            [chromium, *flags, *args], capture_output=True, text=True, timeout=60, check=True
        ).stdout

    def sign_in() -> None:
        """With a one-time link (what `tokenmeter api` prints): the profile keeps the cookie."""
        once = application.state.sign_in.issue_once()
        login = browse("--dump-dom", f"{url}/login?once={once}")
        assert "OpenAI usage" in login  # redirected to the overview, signed in

    def render(path: str) -> str:
        sign_in()
        return browse("--dump-dom", f"{url}{path}")

    overview = render("/")
    assert '<b id="total-cost">$0.080114</b>' in overview
    assert "Cost per day (UTC) by model" in overview and "dall-e-3" in overview
    assert f'href="/scopes/pipeline_run/{run_id}"' in overview  # runs link to their calls
    assert 'href="/scopes/scanned_post/p1"' in overview
    assert '<b id="unpriced">0</b>' in overview and '<b id="errors">1</b>' in overview
    assert "http://" not in overview.replace(url, "") and "https://" not in overview

    yesterday = (datetime.now(UTC) - timedelta(days=1)).date().isoformat()
    ranged = render(f"/?start_date={yesterday}&end_date={yesterday}")
    assert f"{yesterday} to " in ranged and "OpenAI usage" in ranged

    by_task = render("/?group_by=task")
    assert "Cost per day (UTC) by task" in by_task and "tasks.commission" in by_task

    run = render(f"/scopes/pipeline_run/{run_id}")
    assert '<b id="scope-cost">$0.080045</b>' in run and "2 calls" in run
    assert "dall-e-3" in run and "gpt-4o-mini" in run
    post = render("/scopes/scanned_post/p1")
    assert '<b id="scope-cost">$0.000069</b>' in post and "1 calls" in post

    shots = Path(os.environ.get("TOKENMETER_SCREENSHOTS") or tmp_path)
    for name, path in (("dashboard", "/"), ("dashboard-run", f"/scopes/pipeline_run/{run_id}")):
        sign_in()
        shot = shots / f"{name}.png"
        browse("--window-size=1100,1000", f"--screenshot={shot}", f"{url}{path}")
        assert shot.stat().st_size > 5000
