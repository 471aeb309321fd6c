"""A seeded fault schedule that hunts for the next loss path, in one process.

Each step is drawn from a seeded generator: a task (run eagerly through the real Celery
signals) whose actions are calls of every kind (plain, streamed to the end, broken after a
random number of chunks and closed or not, never iterated), answers lost on the wire, client
timeouts, 429s the SDK retries, nested post scopes with rollups, calls from threads (joined,
or outliving the task), eager subtasks, task budgets that refuse calls, tasks that fail half
way, and tasks whose process "dies" (never flushed: the write-ahead log must bring them
back); or an outage: PostgreSQL or Redis cut (through TCP proxies) and restored, a recovery
pass.  Then everything is restored and recovered, and the ledger is compared with what the
sandbox billed (``bench.reconcile.reconcile``: every request, category and cent, rollups
included) and every answered call with the task and scope that made it.

    .venv/bin/python bench/chaos.py --steps 200 --seed 7
    make reconcile RECONCILE_ARGS="--chaos 200"        # after the reconciliation run

``tests/test_chaos.py`` runs a fixed seed in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import openai  # noqa: E402
from celery import Celery  # noqa: E402
from rich.console import Console  # noqa: E402
from sqlalchemy import select  # noqa: E402
from sqlalchemy.orm import Session  # noqa: E402

from bench.pg import SERVER_URL as PG_SERVER_URL  # noqa: E402
from bench.pg import create_database, drop_database  # noqa: E402
from bench.reconcile import Reconciliation, reconcile, report_table  # noqa: E402
from bench.redisdb import claimed_databases  # noqa: E402
from bench.tcp_proxy import TcpProxy  # noqa: E402
from models import migrate  # noqa: E402
from models.tables import AgentScannedPost  # noqa: E402
from tokenmeter import BudgetExceeded, OpenAICall, TableRollup  # noqa: E402
from tokenmeter import install as install_metering  # noqa: E402
from tokenmeter.budgets import Budgets  # noqa: E402
from tokenmeter.celery_signals import active  # noqa: E402
from tokenmeter.context import _current, open_scope, run_in_scope_thread, usage_scope  # noqa: E402
from tokenmeter.db import get_engine  # noqa: E402
from tokenmeter.sandbox.runner import SandboxServers  # noqa: E402
from tokenmeter.settings import get_settings  # noqa: E402
from tokenmeter.sink import DatabaseSink, connect_redis, default_spool  # noqa: E402
from tokenmeter.wal import OPEN_KEY  # noqa: E402

DEFAULT_PG = PG_SERVER_URL
DEFAULT_REDIS = "redis://127.0.0.1:6379"
MODELS = ("gpt-4o-mini", "gpt-4o", "o3-mini")
ACTIONS = (
    "chat",
    "stream",
    "stream_break",
    "stream_never",
    "lost",
    "timeout",
    "retry_429",
    "post",
    "thread",
    "late_thread",
    "subtask",
)


@dataclass
class ChaosReport:
    seed: int
    steps: int
    events: Counter[str] = field(default_factory=Counter)
    reconciliation: Reconciliation | None = None
    attribution: list[str] = field(default_factory=list)  # "request: expected != ledger"

    @property
    def ok(self) -> bool:
        return (
            self.reconciliation is not None
            and self.reconciliation.ok
            and not self.attribution
            and self.events["answered"] > 0
        )


class Driver:
    """Runs the schedule: the tasks, the faults, and what each answered call must be."""

    def __init__(self, rng: random.Random, sandbox: SandboxServers, app: Celery) -> None:
        self.rng = rng
        self.sandbox = sandbox
        self.app = app
        self.client = openai.OpenAI(
            base_url=sandbox.openai_base_url, api_key="sk-chaos", max_retries=2
        )
        self.expected: dict[str, tuple[str | None, str, str]] = {}  # request id -> where
        self.events: Counter[str] = Counter()
        self.late: list[tuple[threading.Thread, threading.Event]] = []
        driver = self

        def work(task: Any, actions: list[dict[str, Any]], fail: bool = False) -> int:
            return driver._work(task, actions, fail)

        self.work = app.task(bind=True, name="chaos.work")(work)

    # -- the task ------------------------------------------------------------------------------
    def _work(self, task: Any, actions: list[dict[str, Any]], fail: bool = False) -> int:
        where = (task.request.id, "task", task.request.id)
        for action in actions:
            try:
                self.act(action, where)
            except BudgetExceeded:
                self.events["refused by a budget"] += 1
        if fail:
            raise RuntimeError("fails half way, on purpose")
        return len(actions)

    def expect(self, request_id: str | None, where: tuple[str | None, str, str]) -> None:
        if request_id:
            self.expected[request_id] = where
            self.events["answered"] += 1

    def _chat(self, where: tuple[str | None, str, str], **kw: Any) -> None:
        model = self.rng.choice(MODELS)
        prompt = f"chaos {self.rng.random():.6f}"
        answer = self.client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], **kw
        )
        self.expect(answer._request_id, where)

    def act(self, action: dict[str, Any], where: tuple[str | None, str, str]) -> None:
        kind = action["kind"]
        self.events[kind] += 1
        msgs: Any = [{"role": "user", "content": f"chaos {action['n']}"}]
        if kind == "chat":
            self._chat(where)
        elif kind in ("stream", "stream_break", "stream_never"):
            stream: Any = self.client.chat.completions.create(
                model=self.rng.choice(MODELS), messages=msgs, stream=True
            )
            self.expect(stream.response.headers.get("x-request-id"), where)
            if kind == "stream":
                for _ in stream:
                    pass
            elif kind == "stream_break":
                for n, _ in enumerate(stream):
                    if n >= action["after"]:
                        break
                if action["close"]:
                    stream.close()
        elif kind == "lost":  # completed and billed, the answer never arrives; SDK retries
            self.sandbox.openai.faults.add("lost", times=action["times"])
            try:
                self._chat(where)
            except openai.APIConnectionError:
                self.events["gave up after lost answers"] += 1
        elif kind == "timeout":
            impatient = self.client.with_options(timeout=0.2, max_retries=0)
            with suppress(openai.APITimeoutError):
                impatient.chat.completions.create(
                    model="gpt-4o-mini",
                    messages=msgs,
                    extra_headers={"X-Sandbox-Fault": "slow=450"},
                )
        elif kind == "retry_429":
            self.sandbox.openai.faults.add("429", times=1)
            self._chat(where)
        elif kind == "post":
            ref = f"p{action['n']}-{self.rng.randrange(10**6)}"
            with usage_scope("scanned_post", ref) as post:
                post.bind_rollup(
                    TableRollup(
                        AgentScannedPost,
                        key={"post_id": ref},
                        sums={
                            "prompt_tokens": "input_tokens",
                            "completion_tokens": "output_tokens",
                        },
                        cost_column="total_cost_usd",
                        values={"subreddit": "chaos", "agent_model": "gpt-4o-mini"},
                    )
                )
                for _ in range(action["calls"]):
                    self._chat((where[0], "scanned_post", ref))
        elif kind == "thread":
            thread = run_in_scope_thread(self._chat, where)
            thread.join(timeout=30)
        elif kind == "late_thread":  # outlives its task: recorded in a flush of its own
            go = threading.Event()

            def later() -> None:
                go.wait(30)
                self._chat(where)

            self.late.append((run_in_scope_thread(later), go))
        elif kind == "subtask":
            sub = self.work.apply(args=([{"kind": "chat", "n": action["n"]}],))
            self.events["subtask " + sub.state] += 1

    # -- the schedule ----------------------------------------------------------------------------
    def plan(self, n: int) -> list[dict[str, Any]]:
        actions = []
        for i in range(self.rng.randint(1, 4)):
            kind = self.rng.choice(ACTIONS)
            action: dict[str, Any] = {"kind": kind, "n": f"{n}.{i}"}
            if kind == "stream_break":
                action.update(after=self.rng.randint(0, 6), close=self.rng.random() < 0.5)
            elif kind == "lost":
                action["times"] = self.rng.choice((1, 1, 2, 3))  # 3: the SDK gives up
            elif kind == "post":
                action["calls"] = self.rng.randint(1, 3)
            actions.append(action)
        return actions

    def run_task(self, n: int) -> None:
        headers = {}
        if self.rng.random() < 0.1:  # a budget small enough to refuse a later call
            headers["tokenmeter_budget_usd"] = "0.00003"
        result = self.work.apply(
            args=(self.plan(n),), kwargs={"fail": self.rng.random() < 0.08}, headers=headers
        )
        self.events[f"task {result.state}"] += 1
        for thread, go in self.late:
            go.set()
            thread.join(timeout=30)
        self.late.clear()

    def run_dead_task(self, n: int, wal_client: Any) -> None:
        """A task whose process dies mid-way: never closed, never flushed."""
        task_id = f"dead-{n}"
        root, token = open_scope("task", task_id, task_id=task_id, task_name="chaos.work")
        metering = active()
        assert metering is not None and metering.wal is not None
        metering.wal.attach(root)
        where = (task_id, "task", task_id)
        try:
            for _ in range(self.rng.randint(1, 3)):
                self._chat(where)
        finally:
            _current.reset(token)
        with metering.wal._lock:  # the process is gone: nobody renews its lease any more
            metering.wal._open.pop(root.execution_id, None)
        raw = wal_client.hget(OPEN_KEY, root.execution_id)
        if raw is not None:  # its pid now names another process (it started at another time)
            meta = json.loads(raw)
            meta["started"] = (meta.get("started") or 0) - 1
            meta["renewed"] = 0
            wal_client.hset(OPEN_KEY, root.execution_id, json.dumps(meta))
        self.events["died mid-task"] += 1


@contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    get_settings.cache_clear()
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        get_settings.cache_clear()


def run_chaos(
    steps: int,
    seed: int,
    *,
    pg_url: str = DEFAULT_PG,
    redis_url: str = DEFAULT_REDIS,
    progress: Callable[[str], None] | None = None,
    tmp_dir: Path | None = None,
) -> ChaosReport:
    """Run ``steps`` seeded steps; the report says what happened and what differs."""
    rng = random.Random(seed)
    report = ChaosReport(seed, steps)
    db_url = create_database(pg_url, "tokenmeter_chaos")
    parsed_pg = urlsplit(db_url)
    pg_proxy = TcpProxy(parsed_pg.hostname or "127.0.0.1", parsed_pg.port or 5432).start()
    proxied_db = db_url.replace(
        f"{parsed_pg.hostname}:{parsed_pg.port or 5432}", f"127.0.0.1:{pg_proxy.port}", 1
    )
    data_dir = tmp_dir or Path(os.environ.get("TMPDIR", "/tmp")) / f"tokenmeter-chaos-{os.getpid()}"
    handle = None
    previous = active()  # one installation per process: the schedule's own, then this one back
    if previous is not None:
        previous.uninstall()
    try:
        migrate.upgrade(db_url)
        with claimed_databases(redis_url, 1) as (claimed,), SandboxServers() as sandbox:
            r = urlsplit(claimed.url)
            redis_proxy = TcpProxy(r.hostname or "127.0.0.1", r.port or 6379).start()
            proxied_redis = f"redis://127.0.0.1:{redis_proxy.port}{r.path}"
            with _environment({"DATABASE_TIMEOUT_S": "2", "TOKENMETER_DATA_DIR": str(data_dir)}):
                redis_client: Any = connect_redis(proxied_redis)
                direct_redis = claimed.client()
                app = Celery("chaos", broker="memory://")
                app.conf.update(task_always_eager=True, task_eager_propagates=False)
                driver = Driver(rng, sandbox, app)
                handle = install_metering(
                    app,
                    sink=DatabaseSink(proxied_db, spool=default_spool(redis_client)),
                    redis_client=redis_client,
                    write_ahead="redis",  # the "dead" tasks below come back through Redis's log
                    budgets=Budgets(),
                    recovery_interval_s=0,
                )
                down = {"postgresql": False, "redis": False}
                proxies = {"postgresql": pg_proxy, "redis": redis_proxy}
                for n in range(steps):
                    roll = rng.random()
                    if roll < 0.08:
                        what = rng.choice(("postgresql", "redis"))
                        if down[what]:
                            proxies[what].start()
                        else:
                            proxies[what].stop()
                        down[what] = not down[what]
                        driver.events[f"{what} {'down' if down[what] else 'up'}"] += 1
                    elif roll < 0.13:
                        handle.recover_once()
                        driver.events["recovery pass"] += 1
                    elif roll < 0.18 and not down["redis"]:
                        # (its "dead" process is this one, whose local write-ahead file is its
                        # own: only Redis's log can bring it back here; real kills: e2e tests)
                        driver.run_dead_task(n, direct_redis)
                    else:
                        driver.run_task(n)
                    if progress and n % 25 == 0:
                        progress(f"step {n}/{steps}")
                for what, is_down in down.items():
                    if is_down:
                        proxies[what].start()
                _settle(handle, direct_redis)
                report.events = driver.events
                with Session(get_engine(db_url)) as session:
                    report.reconciliation = reconcile(session, sandbox.ledger.rows())
                    report.attribution = _attribution(session, driver.expected)
                handle.uninstall()
                handle = None
                redis_client.close()
                direct_redis.close()
            redis_proxy.stop()
    finally:
        if handle is not None:
            handle.uninstall()
        if previous is not None:
            previous.install()
        pg_proxy.stop()
        get_engine(db_url).dispose()
        drop_database(pg_url, db_url)
    return report


def _settle(handle: Any, direct_redis: Any, timeout: float = 60) -> None:
    """Recover until nothing waits: the writer has written (or spooled) every ended task, the
    spool is empty and no write-ahead execution is open."""
    deadline = time.monotonic() + timeout
    while True:
        handle.flush(timeout=max(0.0, deadline - time.monotonic()))
        result = handle.recover_once()
        if result.still_spooled == 0 and not direct_redis.hlen(OPEN_KEY):
            return
        if time.monotonic() > deadline:
            raise AssertionError(
                f"still waiting after {timeout}s: {result.still_spooled} spooled batches, "
                f"{direct_redis.hlen(OPEN_KEY)} open write-ahead executions"
            )
        time.sleep(0.2)


def _attribution(session: Session, expected: dict[str, tuple[str | None, str, str]]) -> list[str]:
    rows = {
        c.request_id: (c.task_id, c.scope_kind, c.scope_ref)
        for c in session.scalars(select(OpenAICall).where(OpenAICall.request_id.is_not(None)))
    }
    return [
        f"{request_id}: made in {where}, ledger says {rows.get(request_id)}"
        for request_id, where in expected.items()
        if rows.get(request_id) != where
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=None, help="default: a random one (printed)")
    parser.add_argument("--pg-url", default=DEFAULT_PG)
    parser.add_argument("--redis-url", default=DEFAULT_REDIS, help="server URL, no db number")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(10**6)
    console = Console()
    console.print(f"chaos: {args.steps} steps, seed {seed} (rerun with --seed {seed})")
    report = run_chaos(
        args.steps,
        seed,
        pg_url=args.pg_url,
        redis_url=args.redis_url,
        progress=lambda line: console.print(f"  {line}"),
    )
    console.print("  " + ", ".join(f"{k} {v}" for k, v in sorted(report.events.items())))
    assert report.reconciliation is not None
    console.print(report_table(report.reconciliation))
    for line in report.attribution[:20]:
        console.print(f"  [red]attribution[/red] {line}")
    verdict = "difference: 0, every call where it was made" if report.ok else "DIFFERENCES FOUND"
    console.print(("[green]" if report.ok else "[bold red]") + verdict)
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
