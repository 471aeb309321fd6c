"""The application's tasks, end to end: a real ``celery -A tasks worker`` on the embedded
(filesystem) broker, SQLite, the OpenAI and Reddit sandboxes over HTTP."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from sqlalchemy import create_engine, func, select
from sqlalchemy.orm import Session

from celeryconfig import filesystem_transport_options
from models import AgentScannedPost, PipelineRun, PipelineRunUsage, migrate
from tests.helpers import subprocess_env, wait_for
from tokenmeter import OpenAICall
from tokenmeter.sandbox.runner import SandboxServers

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class App:
    sandbox: SandboxServers
    db_url: str
    client: Celery
    env: dict[str, str]
    var: Path
    worker: subprocess.Popen[bytes] | None = None

    def start_worker(self, **env: str) -> None:
        log = open(self.var / "worker.log", "ab")  # noqa: SIM115
        self.worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "tasks",
                "worker",
                "-P",
                "prefork",
                "-c",
                "4",
                "-l",
                "INFO",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
            ],
            cwd=ROOT,
            env={**self.env, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def stop_worker(self) -> None:
        if self.worker and self.worker.poll() is None:
            self.worker.send_signal(signal.SIGTERM)
            try:
                self.worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.worker.kill()
                self.worker.wait()
        self.worker = None

    def run(self, name: str, *args: Any, timeout: float = 90, **kwargs: Any) -> Any:
        result = self.client.send_task(name, args=args, kwargs=kwargs)
        deadline = time.monotonic() + timeout
        while not result.ready():
            if self.worker is not None and self.worker.poll() is not None:
                raise AssertionError(
                    f"worker died: {(self.var / 'worker.log').read_text()[-3000:]}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"{name} not done in {timeout}s")
            time.sleep(0.1)
        return result

    def session(self) -> Session:
        return Session(create_engine(self.db_url))

    def wait_flushed(self, n_calls: int, timeout: float = 30) -> list[OpenAICall]:
        """The flush runs after the result is stored: poll the ledger with a deadline.

        Fails at the deadline; each row's cost must equal what the provider charged for it
        (the sandbox's own price list, not the meter's).
        """
        deadline = time.monotonic() + timeout
        while True:
            with self.session() as s:
                rows = list(s.scalars(select(OpenAICall)))
            if len(rows) >= n_calls:
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(rows)} of {n_calls} calls flushed in {timeout}s")
            time.sleep(0.1)
        for row in rows:
            billed = self.sandbox.ledger.get(row.request_id) if row.request_id else None
            if billed is not None:
                assert row.cost_usd == billed.cost_usd, (row.model, row.cost_usd, billed)
        return rows


@contextmanager
def running_app(tmp_path: Path, db_url: str, worker_db_url: str | None = None) -> Iterator[App]:
    """The application with its sandboxes; the worker reaches the database at
    ``worker_db_url`` (a proxy the test can cut), the test at ``db_url``."""
    var = tmp_path / "var"
    migrate.upgrade(db_url)
    with SandboxServers() as sandbox:
        env = subprocess_env(
            **{
                "PYTHONPATH": str(ROOT),
                "TOKENMETER_VAR_DIR": str(var),
                "DATABASE_URL": worker_db_url or db_url,
                "OPENAI_BASE_URL": sandbox.openai_base_url,
                "OPENAI_API_KEY": "sk-sandbox",
                "REDDIT_SANDBOX_URL": sandbox.reddit_base_url,
                "TOKENMETER_SPOOL_DIR": str(var / "spool"),
                "TOKENMETER_DATA_DIR": str(var),
                "COMMISSION_MAX_RETRIES": "1",
            }
        )
        client = Celery("test_client", broker="filesystem://", backend=f"file://{var / 'results'}")
        client.conf.broker_transport_options = filesystem_transport_options(var)
        (var / "results").mkdir(parents=True, exist_ok=True)
        a = App(sandbox, db_url, client, env, var)
        try:
            yield a
        finally:
            a.stop_worker()


@pytest.fixture
def app(tmp_path: Path) -> Iterator[App]:
    with running_app(tmp_path, f"sqlite:///{tmp_path / 'var' / 'tokenmeter.sqlite'}") as a:
        yield a


def ground_truth(app: App, rows: list[OpenAICall]) -> dict[str, int]:
    return app.sandbox.ledger.totals([r.request_id for r in rows if r.request_id])


DONATION = {"id": "don-1", "amount_usd": "25", "message": "for my grandmother who knits"}


def test_commission_usage_row_equals_ground_truth(app: App) -> None:
    app.start_worker()
    result = app.run("tasks.commission", DONATION).get(timeout=5)
    assert result["status"] == "completed" and result["products"] == 2
    rows = app.wait_flushed(3)  # ideas + 2 images
    with app.session() as s:
        run = s.get(PipelineRun, result["pipeline_run_id"])
        usage = s.scalars(select(PipelineRunUsage)).one()
        assert run is not None and run.status == "completed" and run.end_time is not None
        assert run.config["donation_id"] == "don-1" and len(run.config["products"]) == 2
    truth = ground_truth(app, rows)
    assert len(rows) == len(app.sandbox.ledger) == 3
    assert (usage.prompt_tokens, usage.completion_tokens, usage.image_count) == (
        truth["input_tokens"],
        truth["output_tokens"],
        truth["image_count"],
    )
    assert usage.total_cost_usd == sum((r.cost_usd for r in rows), Decimal(0))
    assert (usage.idea_model, usage.image_model) == ("gpt-4o-mini", "dall-e-3")
    # a redelivered message for a completed run spends nothing more
    again = app.run("tasks.commission", DONATION).get(timeout=5)
    assert again["redelivered"] is True and len(app.sandbox.ledger) == 3


def test_commission_failing_after_the_idea_call_keeps_that_usage(app: App) -> None:
    app.start_worker(COMMISSION_IMAGES_PER_IDEA="2")  # dall-e-3 refuses n=2: 400 after ideas
    result = app.run("tasks.commission", DONATION)
    assert result.failed()
    rows = app.wait_flushed(2)
    with app.session() as s:
        run = s.scalars(select(PipelineRun)).one()
        usage = s.scalars(select(PipelineRunUsage)).one()
    assert run.status == "failed" and "BadRequestError" in (run.summary or "")
    ok = [r for r in rows if r.status == "ok"]
    assert [r.operation for r in ok] == ["chat"]
    assert usage.prompt_tokens == ok[0].input_tokens > 0 and usage.image_count == 0
    assert usage.total_cost_usd == ok[0].cost_usd


def test_rate_limited_commission_retries_and_keeps_each_attempt(app: App) -> None:
    app.sandbox.openai.faults.add("429", times=1, path="/v1/images/generations")
    app.start_worker()
    assert app.run("tasks.commission", DONATION, timeout=120).get(timeout=5)["status"] == (
        "completed"
    )
    # attempt 0: ideas + the image call refused with 429; attempt 1: ideas + 2 images
    rows = app.wait_flushed(5)
    assert [(r.attempt, r.operation, r.status) for r in sorted(rows, key=lambda r: r.id)] == [
        (0, "chat", "ok"),
        (0, "image", "error"),
        (1, "chat", "ok"),
        (1, "image", "ok"),
        (1, "image", "ok"),
    ]
    attempts = sorted({r.attempt for r in rows})
    assert attempts == [0, 1]
    with app.session() as s:
        usage = s.scalars(select(PipelineRunUsage)).one()
    truth = ground_truth(app, rows)
    assert usage.prompt_tokens == truth["input_tokens"]  # both attempts' idea calls
    assert usage.image_count == truth["image_count"] == 2


def test_scan_gives_each_post_exactly_its_own_calls(app: App) -> None:
    app.start_worker()
    out = app.run("tasks.promotion_scan", subreddits=["handmade", "gifts"], limit=10).get(timeout=5)
    assert out["scanned"] == 20 and out["dry_run"] is True
    rows = app.wait_flushed(20 + out["promoted"])
    with app.session() as s:
        posts = list(s.scalars(select(AgentScannedPost)))
    assert len(posts) == 20
    for post in posts:
        mine = [r for r in rows if r.scope_kind == "scanned_post" and r.scope_ref == post.post_id]
        truth = ground_truth(app, mine)
        assert len(mine) == (2 if post.promoted else 1)
        assert (post.prompt_tokens, post.completion_tokens) == (
            truth["input_tokens"],
            truth["output_tokens"],
        )
        assert post.total_cost_usd == sum((r.cost_usd for r in mine), Decimal(0))
        assert post.agent_model == "gpt-4o-mini" and post.agent_ratings is not None
    assert sum(p.promoted for p in posts) == out["promoted"] > 0
    assert app.sandbox.reddit.comments == []  # dry run: nothing posted
    with app.session() as s:
        ledger_cost = s.scalar(select(func.sum(OpenAICall.cost_usd)))
    assert sum(p.total_cost_usd for p in posts) == ledger_cost
    assert sum(r.input_tokens for r in rows) == app.sandbox.ledger.totals()["input_tokens"]

    rerun = app.run("tasks.promotion_scan", subreddits=["handmade", "gifts"], limit=10).get(
        timeout=5
    )
    assert rerun["scanned"] == 0 and len(app.sandbox.ledger) == len(rows)


def test_live_scan_posts_comments_for_promoted_posts_only(app: App) -> None:
    app.start_worker(PROMOTION_DRY_RUN="false")
    out = app.run("tasks.promotion_scan", subreddits=["crafts"], limit=15).get(timeout=5)
    with app.session() as s:
        promoted = {p.post_id: p for p in s.scalars(select(AgentScannedPost)) if p.promoted}
    posted = {c.parent_fullname.removeprefix("t3_"): c for c in app.sandbox.reddit.comments}
    assert set(posted) == set(promoted) and len(posted) == out["promoted"] > 0
    for post_id, post in promoted.items():
        assert post.comment_id == posted[post_id].id
        assert post.promotion_message == posted[post_id].body


def test_beat_schedule_and_reliability_settings_from_config() -> None:
    import celeryconfig
    from tasks import app as celery_app
    from tasks.app import metering
    from tokenmeter import openai_hooks

    metering.uninstall()  # importing tasks installs metering; keep this process clean
    openai_hooks.uninstrument()

    entry = celeryconfig.beat_schedule["promotion-scan"]
    assert entry["task"] == "tasks.promotion_scan"
    assert entry["task"] in celery_app.tasks  # the schedule names a task the app registered
    assert entry["schedule"] == 900.0  # PROMOTION_INTERVAL_S default
    assert celery_app.conf.task_acks_late and celery_app.conf.task_reject_on_worker_lost
    assert celery_app.conf.accept_content == ["json"]
    assert celery_app.conf.worker_send_task_events


# -- a database outage -------------------------------------------------------------------------


@pytest.mark.postgres
def test_commissions_and_a_scan_ride_out_a_database_outage(pg_url: str, tmp_path: Path) -> None:
    """PostgreSQL unreachable for 20 s while they run: every task ends SUCCESS, one run per
    donation, no comment twice, and every billed call is in the ledger once."""
    from sqlalchemy.engine import make_url

    from bench.tcp_proxy import TcpProxy

    pg = make_url(pg_url)
    proxy = TcpProxy(pg.host or "127.0.0.1", pg.port or 5432).start()
    worker_url = pg.set(port=proxy.port).render_as_string(hide_password=False)
    try:
        with running_app(tmp_path, pg_url, worker_url) as app:
            app.sandbox.openai.faults.set_error_rate(0.0)
            app.start_worker(TOKENMETER_RECOVERY_INTERVAL_S="1")
            donations = [
                {"id": f"don-{i}", "amount_usd": "10", "message": f"gift {i}"} for i in range(6)
            ]
            results = [app.client.send_task("tasks.commission", args=(d,)) for d in donations]
            scan = app.client.send_task(
                "tasks.promotion_scan",
                kwargs={"subreddits": ["handmade", "gifts"], "limit": 8, "dry_run": False},
            )
            wait_for(lambda: len(app.sandbox.ledger) >= 2, 60, "the work to start")
            proxy.stop()  # PostgreSQL "goes down" for the worker, mid-work
            time.sleep(20)  # the outage itself (what is being survived), not a synchronisation
            proxy.start()
            for result in [*results, scan]:
                wait_for(result.ready, 180, f"task {result.id}")
            assert [r.state for r in [*results, scan]] == ["SUCCESS"] * 7, [
                str(r.result) for r in [*results, scan]
            ]

            with app.session() as s:
                runs = list(s.scalars(select(PipelineRun)))
                posts = list(s.scalars(select(AgentScannedPost)))
            assert sorted(r.config["donation_id"] for r in runs) == [d["id"] for d in donations]
            assert {r.status for r in runs} == {"completed"}
            comments = [c.parent_fullname for c in app.sandbox.reddit.comments]
            assert len(comments) == len(set(comments)) == sum(p.promoted for p in posts) > 0

            billed = {b.request_id: b for b in app.sandbox.ledger.rows()}

            def ledger() -> dict[str, OpenAICall]:
                with app.session() as s:
                    rows = s.scalars(select(OpenAICall).where(OpenAICall.status == "ok"))
                    return {r.request_id: r for r in rows if r.request_id}

            wait_for(lambda: len(ledger()) >= len(billed), 60, "the spooled usage to land")
            ours = ledger()
            assert set(ours) == set(billed)
            for rid, b in billed.items():
                assert (ours[rid].input_tokens, ours[rid].output_tokens, ours[rid].cost_usd) == (
                    b.input_tokens,
                    b.output_tokens,
                    b.cost_usd,
                ), rid
    finally:
        proxy.stop()
