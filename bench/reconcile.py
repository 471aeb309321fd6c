"""Reconciliation run: a mixed load on real workers, the ledger checked against what was billed.

    make reconcile                                   # 1,000 tasks, 4 worker processes
    make reconcile RECONCILE_ARGS="--faults"          # + PostgreSQL down 30 s, SIGKILL, redelivery
    .venv/bin/python bench/reconcile.py --tasks 100 --faults --outage-s 10
    make reconcile RECONCILE_ARGS="--chaos 200"       # then 200 steps of bench/chaos.py

Starts the OpenAI and Reddit sandboxes (in this process, so their ground truth is at hand), a
throwaway PostgreSQL database for the ledger, a Redis broker and one ``celery worker -c 4``
(prefork: 4 worker processes) running the application's real tasks plus ``reconcile.mixed``
(bench/reconcile_app.py).  The load mixes commissions (chat in JSON-schema mode, dall-e-2 with
``n`` = 2), promotion scans (JSON-mode ratings, comments, one row per post) and mixed tasks
(streaming with and without ``include_usage``, Responses API plain and streamed, embeddings,
gpt-image-1 with ``n`` = 2, reasoning and cached tokens, the async client), while the sandbox
fails a seeded ~5 % of requests with 429/500, a lost answer (completed and billed, the
connection cut before the answer leaves) or a dropped one (cut before the request is taken,
billed nothing): the SDK and the tasks retry; some callers give up on
a slow answer (a client timeout) or stop reading a stream at ``finish_reason``, and a few tasks
fail half way.

``--faults`` adds, mid-run: PostgreSQL stopped for ``--outage-s`` seconds (really stopped, with
``pg_ctlcluster``; the load keeps running), one worker process SIGKILLed in the middle of a
task (its message is redelivered), and completed messages published again (redeliveries).

Then every request the sandbox billed is looked up in ``openai_calls`` by request id (an
answer that never arrived: by the ``X-Client-Request-Id`` its attempt carried, and it must be a
``billed_unknown`` row at cost NULL) and compared field by field, totals per token category and
in dollars are compared (over the requests whose usage the meter could know), and
``pipeline_run_usages`` / ``agent_scanned_posts`` are checked against the ledger rows of their
run or post.  Prints the table; exits 1 on any difference.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC
from decimal import Decimal
from pathlib import Path
from typing import Any, cast

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402
from celery import Celery  # noqa: E402
from celery.result import AsyncResult  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from sqlalchemy import create_engine, func, select  # noqa: E402
from sqlalchemy.engine import Engine  # noqa: E402
from sqlalchemy.orm import Session  # noqa: E402

from bench.env import subprocess_env  # noqa: E402
from bench.pg import SERVER_URL as PG_SERVER_URL  # noqa: E402
from bench.pg import create_database, drop_database  # noqa: E402
from bench.redisdb import claimed_databases  # noqa: E402
from models import migrate  # noqa: E402
from models.tables import AgentScannedPost, PipelineRunUsage  # noqa: E402
from tokenmeter import OpenAICall  # noqa: E402
from tokenmeter.filewal import FileWriteAheadLog  # noqa: E402
from tokenmeter.ledger import PendingRollup  # noqa: E402
from tokenmeter.reporting.audit import TEXT_OPERATIONS  # noqa: E402
from tokenmeter.sandbox.ground_truth import TOKEN_FIELDS, BilledRequest  # noqa: E402
from tokenmeter.sandbox.runner import SandboxServers  # noqa: E402

CATEGORIES = (*TOKEN_FIELDS, "cost_usd")
UNMETERED_PROJECT = "proj_unmetered_script"
SANDBOX_PROJECT = "proj_sandbox_default"  # the sandbox key's own project
#: A script of the same organization with the same key that tokenmeter does not meter (it
#: imports only openai): the audit must find exactly its calls, and nothing else.
UNMETERED_SCRIPT = """
import openai
client = openai.OpenAI(max_retries=8)
for i in range(5):
    client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": f"unmetered script {i}"}]
    )
"""
BROKER_DB, BACKEND_DB, CONTROL_DB = 0, 1, 2  # indexes into the run's claimed databases


# -- the comparison ------------------------------------------------------------------------------
@dataclass
class Reconciliation:
    """The ledger against the ground truth.  ``ok`` only if every list is empty."""

    truth: dict[str, int | Decimal] = field(default_factory=dict)
    ledger: dict[str, int | Decimal] = field(default_factory=dict)
    billed_requests: int = 0
    ledger_rows: int = 0
    error_rows: int = 0
    missing: list[str] = field(default_factory=list)  # billed, not in the ledger
    extra: list[str] = field(default_factory=list)  # in the ledger with usage, never billed
    mismatched: list[str] = field(default_factory=list)  # "request: field truth != ledger"
    #: billed, answer never arrived: matched by client request id to a billed_unknown row
    unanswered: list[str] = field(default_factory=list)
    #: billed, the meter saw no usage (a stream left early): matched by request id, cost NULL
    usage_unknown: list[str] = field(default_factory=list)
    #: never answered and never billed (the connection broke before the provider took the
    #: request, or, a stream, cut before its end): the operation of each such billed_unknown row
    never_reached: list[str] = field(default_factory=list)
    unmetered_usd: Decimal = Decimal(0)  # what those two cost (the ledger has them at NULL)
    rollups: list[str] = field(default_factory=list)  # "table key: column rollup != ledger"
    kept_rollups: list[str] = field(default_factory=list)  # could not apply: never reached
    rollup_rows: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        totals_equal = all(self.truth[c] == self.ledger[c] for c in CATEGORIES)
        return totals_equal and not (
            self.missing or self.extra or self.mismatched or self.rollups or self.kept_rollups
        )


#: What each rollup column must equal, stated here rather than read from the application's own
#: rollup definitions (a wrong mapping there must not be checked against itself).
#: image_tokens = input image tokens + output tokens of image generation calls.
RUN_USAGE_COLUMNS = {
    "prompt_tokens": "input_tokens",
    "completion_tokens": "output_tokens",
    "cached_prompt_tokens": "cached_input_tokens",
    "reasoning_tokens": "reasoning_tokens",
    "image_count": "image_count",
    "image_tokens": "image_tokens",
    "total_cost_usd": "cost_usd",
}
POST_COLUMNS = {
    "prompt_tokens": "input_tokens",
    "completion_tokens": "output_tokens",
    "total_cost_usd": "cost_usd",
}


def _billable(call: OpenAICall) -> bool:
    """Did the provider (maybe) bill it?  An answered error bills nothing (stated here, apart
    from the meter's own rule)."""
    return call.status not in ("error", "blocked") or bool(call.input_tokens or call.output_tokens)


def _image_tokens(call: OpenAICall) -> int:
    """Tokens of image generation: the input image tokens plus, for image calls, the output."""
    return call.input_image_tokens + (call.output_tokens if call.operation == "image" else 0)


def reconcile(session: Session, truth_rows: Iterable[BilledRequest]) -> Reconciliation:
    """Compare ``openai_calls`` (and the rollup tables) with what the provider billed.

    A billed request is found by its request id, else (an answer that never arrived) by the
    client request id its attempt carried, which must be a ``billed_unknown`` row.  A row whose
    usage the meter never saw must have cost NULL, never $0; its tokens are left out of the
    category totals (on both sides) and counted apart, with the dollars the provider charged.
    """
    result = Reconciliation()
    truth = {r.request_id: r for r in truth_rows}
    calls = list(session.scalars(select(OpenAICall)))
    by_id = {c.request_id: c for c in calls if c.request_id}
    unanswered_rows = {
        c.client_request_id: c
        for c in calls
        if c.status == "billed_unknown" and c.client_request_id and not c.request_id
    }
    result.billed_requests, result.ledger_rows = len(truth), len(calls)
    unknown: set[int] = set()  # ledger rows that stand for a billed request of unknown usage

    totals_truth: dict[str, int | Decimal] = dict.fromkeys(CATEGORIES, 0)
    for request_id, row in truth.items():
        cost = row.cost_usd  # what the provider charged, from the sandbox's own price list
        call = by_id.get(request_id)
        lost = call is None and row.client_request_id in unanswered_rows
        if lost and row.client_request_id is not None:
            call = unanswered_rows[row.client_request_id]
        if call is None:
            result.missing.append(request_id)
            totals_truth["cost_usd"] += cost or Decimal(0)
            for name in TOKEN_FIELDS:
                totals_truth[name] += getattr(row, name)
            continue
        if lost or not call.usage_reported:
            unknown.add(call.id)
            (result.unanswered if lost else result.usage_unknown).append(request_id)
            result.unmetered_usd += cost or Decimal(0)
            if call.cost_usd is not None or any(getattr(call, n) for n in TOKEN_FIELDS):
                result.mismatched.append(
                    f"{request_id} ({call.status}): usage unknown to the meter, but the ledger "
                    f"says cost {call.cost_usd}"
                )
            continue
        totals_truth["cost_usd"] += cost or Decimal(0)
        for name in TOKEN_FIELDS:
            totals_truth[name] += getattr(row, name)
            if getattr(call, name) != getattr(row, name):
                result.mismatched.append(
                    f"{request_id}: {name} {getattr(row, name)} != {getattr(call, name)}"
                )
        if call.batch != row.batch:
            result.mismatched.append(f"{request_id}: batch {row.batch} != {call.batch}")
        if (call.service_tier or "default") != row.service_tier:
            result.mismatched.append(
                f"{request_id}: service_tier {row.service_tier} != {call.service_tier}"
            )
        if cost is None or call.cost_usd != cost:
            result.mismatched.append(
                f"{request_id} ({row.model}): cost_usd charged {cost} != ledger {call.cost_usd}"
            )

    totals_ledger: dict[str, int | Decimal] = dict.fromkeys(CATEGORIES, 0)
    for call in calls:
        for name in TOKEN_FIELDS:
            totals_ledger[name] += getattr(call, name)
        totals_ledger["cost_usd"] += call.cost_usd or Decimal(0)
        if call.request_id not in truth and call.id not in unknown:
            if call.status == "billed_unknown":
                result.never_reached.append(call.operation)
            else:
                result.error_rows += call.status != "ok"
            if call.status == "ok" or any(getattr(call, n) for n in TOKEN_FIELDS):
                result.extra.append(f"{call.request_id or f'row {call.id}'} ({call.status})")
            elif call.status == "billed_unknown" and call.cost_usd is not None:
                result.mismatched.append(f"row {call.id} (billed_unknown) priced {call.cost_usd}")
    result.truth, result.ledger = totals_truth, totals_ledger
    _check_rollups(session, calls, result)
    result.kept_rollups = [
        f"{r.task_id}: {r.last_error}" for r in session.scalars(select(PendingRollup))
    ]
    return result


def _check_rollups(session: Session, calls: list[OpenAICall], result: Reconciliation) -> None:
    sums: dict[tuple[str, str], dict[str, int | Decimal]] = defaultdict(lambda: defaultdict(int))
    for call in calls:
        if call.scope_kind is None or call.scope_ref is None:
            continue
        acc = sums[(call.scope_kind, call.scope_ref)]
        for name in (*TOKEN_FIELDS, "cost_usd"):
            acc[name] += getattr(call, name) or 0
        acc["image_tokens"] += _image_tokens(call)
        # a billable call of unknown price makes the rolled-up cost unknown (NULL), never a sum
        acc["uncosted"] += call.cost_usd is None and _billable(call)
    tables: list[tuple[Any, str, Callable[[Any], str], dict[str, str]]] = [
        (PipelineRunUsage, "pipeline_run", lambda r: str(r.pipeline_run_id), RUN_USAGE_COLUMNS),
        (AgentScannedPost, "scanned_post", lambda r: r.post_id, POST_COLUMNS),
    ]
    for table, kind, key_of, columns in tables:
        rows: list[Any] = list(session.scalars(select(table)))
        result.rollup_rows[table.__tablename__] = len(rows)
        for row in rows:
            acc = sums.get((kind, key_of(row)), {})
            for column, category in columns.items():
                have = getattr(row, column)
                want: int | Decimal | None = acc.get(category, 0)
                if category == "cost_usd" and acc.get("uncosted"):
                    want = None
                elif have is None:
                    have = 0
                if have != want:
                    result.rollups.append(
                        f"{table.__tablename__} {key_of(row)}: {column} {have} != ledger {want}"
                    )


def report_table(result: Reconciliation) -> Table:
    table = Table(
        title="openai_calls vs what the sandbox billed (ground truth)", title_justify="left"
    )
    table.add_column("category")
    table.add_column("billed", justify="right")
    table.add_column("ledger", justify="right")
    table.add_column("difference", justify="right")
    for name in CATEGORIES:
        t, ledger = result.truth[name], result.ledger[name]
        diff = ledger - t
        style = "green" if diff == 0 else "bold red"
        if name == "cost_usd":
            cells = (f"${t:,.10f}", f"${ledger:,.10f}", f"{diff:+.10f}")
        else:
            cells = (f"{t:,}", f"{ledger:,}", f"{diff:+,}")
        table.add_row(name, cells[0], cells[1], f"[{style}]{cells[2]}[/{style}]")
    table.add_section()
    table.add_row("requests", f"{result.billed_requests:,}", f"{result.ledger_rows:,}", "")
    table.add_row("  of which failed (not billed)", "", f"{result.error_rows:,}", "")
    table.add_row(
        "never answered (cost NULL)",
        f"{len(result.unanswered):,}",
        f"{len(result.unanswered) + len(result.never_reached):,}",
        "",
    )
    table.add_row("  of which never billed", "", f"{len(result.never_reached):,}", "")
    table.add_row(
        "stream left early (cost NULL)",
        f"{len(result.usage_unknown):,}",
        f"{len(result.usage_unknown):,}",
        "",
    )
    table.add_row("  charged for those two", f"${result.unmetered_usd:,.10f}", "", "")
    for label, items in (
        ("billed, not in the ledger", result.missing),
        ("in the ledger, not billed", result.extra),
        ("requests that differ", result.mismatched),
        ("rollups that differ", result.rollups),
        ("rollups kept, not applied", result.kept_rollups),
    ):
        style = "green" if not items else "bold red"
        table.add_row(label, "", "", f"[{style}]{len(items)}[/{style}]")
    return table


def coverage(rows: list[BilledRequest]) -> str:
    """What the load exercised, e.g. ``chat 180 (41 streamed), image 30 (68 images), ...``."""
    ops = Counter(r.operation for r in rows)
    streamed = Counter(r.operation for r in rows if r.stream)
    parts = [
        f"{op} {n}" + (f" ({streamed[op]} streamed)" if streamed[op] else "")
        for op, n in ops.most_common()
    ]
    parts.append(f"{sum(r.image_count for r in rows)} images")
    parts.append(f"{sum(r.cached_input_tokens > 0 for r in rows)} with cached tokens")
    parts.append(f"{sum(r.cache_write_tokens > 0 for r in rows)} with cache writes")
    parts.append(f"{sum(r.reasoning_tokens > 0 for r in rows)} with reasoning tokens")
    tiers = Counter(r.service_tier for r in rows if r.service_tier != "default")
    parts += [f"{n} on {tier}" for tier, n in sorted(tiers.items())]
    parts.append(f"{sum(r.web_search_calls for r in rows)} web searches")
    parts.append(f"{sum(r.batch for r in rows)} batch lines")
    return f"{len(rows)} requests: " + ", ".join(parts)


def victim_line(session: Session) -> str:
    """The killed task's executions, as the ledger has them."""
    per_execution = session.execute(
        select(OpenAICall.execution_id, func.count())
        .where(OpenAICall.task_name == "reconcile.victim", OpenAICall.status == "ok")
        .group_by(OpenAICall.execution_id)
        .order_by(func.min(OpenAICall.id))
    ).all()
    counts = " + ".join(str(n) for _, n in per_execution)
    return (
        f"the SIGKILLed task in the ledger: {len(per_execution)} executions, {counts} calls "
        "(the killed one recovered from the write-ahead log, then its redelivery)"
    )


def _failure(result: AsyncResult) -> str:
    """The exception type of a failed task, as its traceback names it."""
    for line in reversed((result.traceback or "").strip().splitlines()):
        if match := re.match(r"([A-Za-z_][\w.]*(Error|Exception|Failure|Exit)\w*)(:|$)", line):
            return match.group(1)
    return type(result.result).__name__


APP_TASKS = ("tasks.commission", "tasks.promotion_scan")
#: failures that mean "the application did not ride out the database outage"
DATABASE_FAILURES = {"DatabaseUnavailable", "OperationalError", "sqlalchemy.exc.OperationalError"}


# -- the load ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Job:
    name: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


def plan_load(tasks: int, seed: int, sandbox: SandboxServers) -> list[Job]:
    """``tasks`` jobs: ~30 % commissions, ~10 % scans (own subreddit each), the rest mixed."""
    rng = random.Random(seed)
    jobs: list[Job] = []
    for i in range(tasks):
        kind = rng.random()
        if kind < 0.30:
            donation = {
                "id": f"rc-{seed}-{i}",
                "amount_usd": str(rng.choice(["5", "12.50", "40", "100"])),
                "donor": f"donor {i}",
                "message": rng.choice(
                    ["for the animal shelter", "in memory of grandma's garden", "keep knitting"]
                ),
            }
            jobs.append(Job("tasks.commission", (donation,)))
        elif kind < 0.40:
            subreddit = f"reconcile{seed}x{i}"
            for n in range(4):
                sandbox.reddit.add_post(
                    subreddit,
                    f"Looking for a handmade gift idea #{n}",
                    "My sister loves pottery and wool. " * (1 + n),
                )
            jobs.append(Job("tasks.promotion_scan", kwargs={"subreddits": [subreddit]}))
        else:
            jobs.append(Job("reconcile.mixed", (i,), {"fail_half_way": i % 29 == 0}))
    return jobs


# -- the run -------------------------------------------------------------------------------------
class Run:
    """Everything the reconciliation run starts, and stops again (also on failure)."""

    def __init__(self, args: argparse.Namespace, console: Console) -> None:
        self.args, self.console = args, console
        self.workdir = Path(tempfile.mkdtemp(prefix="tokenmeter-reconcile-"))
        self.db_url = ""
        # three empty Redis databases claimed for this run: broker, results, control
        self._claim = claimed_databases(args.redis_url, 3)
        self.dbs = self._claim.__enter__()
        self.redis_urls = [db.url for db in self.dbs]
        self.control = redis.Redis.from_url(self.redis_urls[CONTROL_DB])
        self.broker_redis = redis.Redis.from_url(self.redis_urls[BROKER_DB])  # spool, WAL
        self.queue = f"reconcile-{uuid.uuid4().hex[:8]}"  # never another run's messages
        self.broker_url = self.redis_urls[BROKER_DB] if args.broker == "redis" else args.amqp_url
        self.sandbox = SandboxServers()
        self.worker: subprocess.Popen[bytes] | None = None
        self.pg_stopped = False
        self.app_db_failures = 0  # application tasks that gave up on the database
        self.events: list[str] = []
        self.results: list[AsyncResult] = []
        self.client = Celery(
            "reconcile_client", broker=self.broker_url, backend=self.redis_urls[BACKEND_DB]
        )
        self.client.conf.task_serializer = "json"
        self.client.conf.task_default_queue = self.queue
        self._engine: Engine | None = None
        self._jobs_by_id: dict[str, Job] = {}
        self.audit_problems: list[str] = []

    # setup / teardown
    def start(self) -> None:
        self.db_url = create_database(self.args.pg_url, "tokenmeter_reconcile")
        migrate.upgrade(self.db_url)
        self._engine = create_engine(self.db_url, pool_pre_ping=True)
        self.sandbox.start()
        # 429 and 500 answer with an error (billed nothing); "lost" completes and bills the
        # request, then cuts the connection before the answer leaves; "drop" cuts it before
        # the request is taken (billed nothing, the meter cannot tell it from "lost")
        self.sandbox.openai.faults.set_error_rate(
            self.args.error_rate, seed=self.args.seed, faults=("429", "500", "lost", "drop")
        )
        env = {
            **subprocess_env(),
            "PYTHONPATH": str(ROOT),
            "DATABASE_URL": self.db_url,
            "CELERY_BROKER_URL": self.broker_url,
            "CELERY_TASK_DEFAULT_QUEUE": self.queue,
            "CELERY_RESULT_BACKEND": self.redis_urls[BACKEND_DB],
            "RECONCILE_CONTROL_URL": self.redis_urls[CONTROL_DB],
            "OPENAI_BASE_URL": self.sandbox.openai_base_url,
            "OPENAI_API_KEY": "sk-sandbox",
            "REDDIT_SANDBOX_URL": self.sandbox.reddit_base_url,
            "OPENAI_IMAGE_MODEL": "dall-e-2",
            "COMMISSION_IMAGES_PER_IDEA": "2",
            "COMMISSION_IMAGE_SIZE": "512x512",
            "PROMOTION_POST_LIMIT": "10",
            "TOKENMETER_VAR_DIR": str(self.workdir),
            "TOKENMETER_SPOOL_DIR": str(self.workdir / "spool"),
            "TOKENMETER_RECOVERY_INTERVAL_S": "2",
            "TOKENMETER_WRITE_AHEAD": "true",
            "TOKENMETER_DATA_DIR": str(self.workdir),
        }
        if self.args.prices_file:  # the meter's prices, deliberately changed: must be caught
            env["TOKENMETER_PRICES_FILE"] = str(Path(self.args.prices_file).resolve())
        log = (self.workdir / "worker.log").open("wb")
        self.worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "bench.reconcile_app",
                "worker",
                "-P",
                "prefork",
                "-c",
                str(self.args.workers),
                "-l",
                "WARNING",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
                "-n",
                f"reconcile-{uuid.uuid4().hex[:6]}@%h",
            ],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while not self.client.control.ping(timeout=0.5):
            if self.worker.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the worker did not start; see {self.workdir / 'worker.log'}")

    def stop(self, keep: bool) -> None:
        if self.pg_stopped:
            self.start_postgres()
        if self.worker is not None and self.worker.poll() is None:
            self.worker.send_signal(signal.SIGTERM)
            try:
                self.worker.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.worker.kill()
                self.worker.wait()
        self.sandbox.stop()
        if self.args.broker == "rabbitmq":  # the run's own queue goes with it
            with contextlib.suppress(Exception), self.client.connection_for_write() as conn:
                conn.default_channel.queue_delete(self.queue)
        self.client.close()
        self.control.close()
        self.broker_redis.close()
        self._claim.__exit__(None, None, None)
        if self._engine is not None:
            self._engine.dispose()
        if not keep:
            if self.db_url:
                drop_database(self.args.pg_url, self.db_url)
            shutil.rmtree(self.workdir, ignore_errors=True)

    @property
    def engine(self) -> Engine:
        assert self._engine is not None
        return self._engine

    # the load
    def send(self, jobs: Iterable[Job]) -> None:
        for job in jobs:
            self.results.append(self.client.send_task(job.name, job.args, job.kwargs))

    def done(self) -> int:
        return sum(r.ready() for r in self.results)

    def recorded(self) -> int | None:
        """Ledger rows so far (None while the database is unreachable)."""
        try:
            with self.engine.connect() as conn:
                return conn.scalar(select(func.count()).select_from(OpenAICall))
        except Exception:
            return None

    def pending_recovery(self) -> int:
        """Batches still waiting in a spool or a write-ahead log (Redis's, when the broker is
        Redis; the local files of dead worker processes always), and ended tasks the live
        workers' writers still hold (what ``tokenmeter flush --wait`` waits for)."""
        waiting = sum(1 for _ in (self.workdir / "spool").rglob("*.json"))
        if self.args.broker == "redis":  # keys named by the ledger: tokenmeter:<id>:...
            for key in self.broker_redis.scan_iter("tokenmeter:*:spool"):
                waiting += int(self.broker_redis.llen(key))
            for key in self.broker_redis.scan_iter("tokenmeter:*:wal:open"):
                waiting += int(self.broker_redis.hlen(key))
        local = FileWriteAheadLog(self.workdir / "wal")
        waiting += sum(
            1 for path in (self.workdir / "wal").glob("*.jsonl") if not local._writer_alive(path)
        )
        return waiting + local.pending()  # ended tasks the live writers have not written yet

    def wait(self, label: str, until: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = 0.0
        while not until():
            if self.worker is not None and self.worker.poll() is not None:
                raise RuntimeError(f"the worker exited with {self.worker.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{label}: not done after {timeout:.0f}s")
            if time.monotonic() - last > 5:
                self.progress(label)
                last = time.monotonic()
            time.sleep(0.2)
        self.progress(label)

    def progress(self, label: str) -> None:
        recorded = self.recorded()
        self.console.print(
            f"  {label}: tasks {self.done()}/{len(self.results)}, billed "
            f"{len(self.sandbox.ledger)}, ledger "
            f"{'(database down)' if recorded is None else recorded}, "
            f"awaiting recovery {self.pending_recovery()}"
        )

    # the faults
    def _pg(self, action: str) -> None:
        cmd = self.args.pg_stop if action == "stop" else self.args.pg_start
        subprocess.run(shlex.split(cmd), check=True)

    def stop_postgres(self) -> None:
        self._pg("stop")
        self.pg_stopped = True

    def start_postgres(self) -> None:
        self._pg("start")
        self.pg_stopped = False
        deadline = time.monotonic() + 60
        while self.recorded() is None:
            if time.monotonic() > deadline:
                raise RuntimeError("PostgreSQL did not come back within 60 s")
            time.sleep(0.5)

    def kill_victim(self) -> int:
        """SIGKILL the worker process running ``reconcile.victim`` between two of its calls."""
        tag = uuid.uuid4().hex[:8]
        self.send([Job("reconcile.victim", (tag,))])
        victim = self.results[-1]
        deadline = time.monotonic() + 300
        while (popped := self.control.lpop(f"reconcile:held:{tag}")) is None:
            if victim.ready():
                raise RuntimeError(
                    f"the victim task ended before it could be killed: {victim.result!r}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError("the victim task never reached the point where it is killed")
            time.sleep(0.1)
        pid = int(cast(bytes, popped))
        self.control.set(f"reconcile:killed:{tag}", 1)  # its redelivery will not wait
        os.kill(pid, signal.SIGKILL)
        return pid

    def redeliver(self, count: int) -> int:
        """Publish ``count`` completed messages again, same task id and body."""
        finished = [r for r in self.results if r.id in self._jobs_by_id and r.successful()]
        chosen = finished[:: max(1, len(finished) // count)][:count]
        for result in chosen:
            job = self._jobs_by_id[result.id]
            result.forget()
            self.client.send_task(job.name, job.args, job.kwargs, task_id=result.id)
        return len(chosen)

    def run(self) -> Reconciliation:
        jobs = plan_load(self.args.tasks, self.args.seed, self.sandbox)
        args, started = self.args, time.monotonic()
        third = len(jobs) // 3
        waves = (
            [jobs]
            if not args.faults
            else [jobs[:third], jobs[third : 2 * third], jobs[2 * third :]]
        )
        started_at = time.time()
        self._send_wave(waves[0])
        if args.faults:
            # before: a third of the load; during the outage: the second; after: the rest
            self.wait("first wave", lambda: self.done() >= len(self.results) // 2, 600)
            pid = self.kill_victim()
            self.events.append(f"SIGKILLed worker process {pid} in the middle of a task")
            self.stop_postgres()
            outage_started = time.monotonic()
            self.console.print(f"  PostgreSQL stopped; the load goes on for {args.outage_s}s")
            self._send_wave(waves[1])
            peak = 0
            while time.monotonic() - outage_started < args.outage_s:
                time.sleep(min(5.0, args.outage_s))
                self.progress("PostgreSQL down")
                peak = max(peak, self.pending_recovery())
            self.start_postgres()
            self.events.append(
                f"PostgreSQL stopped for {time.monotonic() - outage_started:.0f}s mid-run; "
                f"{peak} task batches waited in the spool/write-ahead log meanwhile"
            )
            self._send_wave(waves[2])
        self.wait("load", lambda: self.done() == len(self.results), args.timeout_s)
        if args.faults:
            n = self.redeliver(max(3, len(jobs) // 50))
            self.events.append(f"{n} completed messages delivered again (same id and body)")
            self.wait("redeliveries", lambda: self.done() == len(self.results), 300)
        billed = self.sandbox.ledger

        def settled() -> bool:
            return self.pending_recovery() == 0 and self.recorded() is not None

        self.wait("recovery", settled, 300)
        # a request whose client gave up (a timeout) is billed when the provider ends it, maybe
        # after its task ended: the ground truth is read once nothing is left in flight
        self.wait("the provider's last requests", lambda: self.sandbox.openai.in_flight == 0, 60)
        self.events.append(f"load finished in {time.monotonic() - started:.0f}s")
        self.events.extend(self.outcomes())
        self.events.append("billed: " + coverage(billed.rows()))
        with Session(self.engine) as session:
            if args.faults:
                self.events.append(victim_line(session))
            result = reconcile(session, billed.rows())
        if args.audit:
            never_reached = sum(op in TEXT_OPERATIONS for op in result.never_reached)
            self.audit_problems = self.audit_with_unmetered_caller(started_at, never_reached)
        return result

    def audit_with_unmetered_caller(self, started_at: float, never_reached: int = 0) -> list[str]:
        """Run an unmetered script (same key, its own project), then ``tokenmeter audit``'s
        comparison by the minute against the sandbox's Usage API: it must name exactly the
        script's calls as unmetered, and the ledger's calls of unknown usage as such.  Returns
        the problems (none: the audit found what was injected and nothing else)."""
        import openai

        from tokenmeter.reporting import audit as auditing

        before = {r.request_id for r in self.sandbox.ledger.rows()}
        env = {
            **subprocess_env(),
            "OPENAI_BASE_URL": self.sandbox.openai_base_url,
            "OPENAI_API_KEY": "sk-sandbox",
            "OPENAI_PROJECT_ID": UNMETERED_PROJECT,
        }
        subprocess.run([sys.executable, "-c", UNMETERED_SCRIPT], env=env, check=True)
        script = [r for r in self.sandbox.ledger.rows() if r.request_id not in before]
        time.sleep(61 - time.time() % 60)  # the script's minute closes: its bucket is compared
        admin = openai.OpenAI(
            api_key="unused",
            admin_api_key="sk-admin-reconcile",
            base_url=self.sandbox.openai_base_url,
            max_retries=8,
        )
        start, end = int(started_at) // 60 * 60 - 60, int(time.time()) // 60 * 60
        groups = ("model", "service_tier", "batch", "project_id")
        with Session(self.engine) as session, admin:
            report = auditing.audit(
                session,
                admin.admin.organization.usage,
                start,
                end,
                "1m",
                groups,
                settle_s=0,
                default_project=SANDBOX_PROJECT,
            )
        problems = []
        at = groups.index("project_id")
        found: Counter[str] = Counter()
        for d in report.differences:
            if d.kind == "unmetered" and d.group[at] == UNMETERED_PROJECT:
                found[d.what] += int(d.delta)
            elif d.kind != "usage unknown":
                problems.append(f"audit: unexpected {d.kind} {d.what} {d.delta:+} in {d.group}")
        expected = Counter(
            {
                "requests": len(script),
                "input_tokens": sum(r.input_tokens for r in script),
                "cached_input_tokens": sum(r.cached_input_tokens for r in script),
                "output_tokens": sum(r.output_tokens for r in script),
            }
        )
        if +found != +expected:
            problems.append(f"audit: unmetered {dict(found)} != the script's {dict(expected)}")
        provider_requests = sum(c.requests for c in report.provider.values())
        ledger_requests = sum(c.requests for c in report.ledger.values())
        if provider_requests - ledger_requests != len(script) - never_reached:
            problems.append(
                f"audit: the provider counts {provider_requests} requests, the ledger "
                f"{ledger_requests}: the difference is not the script's {len(script)} less "
                f"the {never_reached} calls that never reached the provider"
            )
        unknown = sum(c.usage_unknown for c in report.ledger.values())
        self.events.append(
            f"audit by the minute, {report.compared} buckets, by model, tier, batch and project: "
            f"{provider_requests} chat/Responses requests at the provider, {ledger_requests} in "
            f"the ledger ({unknown} of unknown usage, {never_reached} of them never billed); "
            f"the unmetered script's {len(script)} "
            f"calls (same key, {UNMETERED_PROJECT}) found: "
            + ", ".join(f"{k} {v}" for k, v in found.items())
        )
        if problems:
            problems.extend(self.booked_in_another_minute())
        return problems

    def booked_in_another_minute(self) -> list[str]:
        """Requests the provider booked in another minute than the ledger timed them: what
        a difference by the minute would come from if not from a lost or invented call."""
        with Session(self.engine) as session:
            calls = list(session.scalars(select(OpenAICall)))
        by_id = {c.request_id: c for c in calls if c.request_id}
        by_client_id = {c.client_request_id: c for c in calls if c.client_request_id}
        lines = []
        for row in self.sandbox.ledger.rows():
            call = by_id.get(row.request_id) or by_client_id.get(row.client_request_id or "")
            if call is None:
                continue
            at = call.created_at if call.created_at.tzinfo else call.created_at.replace(tzinfo=UTC)
            if int(at.timestamp()) // 60 != row.created // 60:
                lines.append(
                    f"audit: {row.request_id} ({row.operation} {row.model}, {call.status}) "
                    f"booked at {row.created}, in the ledger at {at.timestamp():.3f}"
                )
        return lines

    def outcomes(self) -> list[str]:
        """Task outcomes, the application's apart from the meter's own test load."""
        lines = []
        for label, names in (
            ("application tasks (commission, promotion scan)", APP_TASKS),
            ("mixed load tasks", ("reconcile.mixed",)),
        ):
            jobs = {r.id: self._jobs_by_id.get(r.id) for r in self.results}
            mine = [r for r in self.results if (job := jobs[r.id]) and job.name in names]
            failed = Counter(_failure(r) for r in mine if r.failed())
            on_purpose = sum(
                1
                for r in mine
                if r.failed() and (job := jobs[r.id]) and job.kwargs.get("fail_half_way")
            )
            lines.append(
                f"{label}: {len(mine)}, failed: "
                + (", ".join(f"{n} {name}" for name, n in failed.most_common()) or "none")
                + (f" ({on_purpose} on purpose)" if on_purpose else "")
            )
            if names == APP_TASKS:
                self.app_db_failures = sum(
                    n for name, n in failed.items() if name in DATABASE_FAILURES
                )
        return lines

    def _send_wave(self, jobs: list[Job]) -> None:
        before = len(self.results)
        self.send(jobs)
        for job, result in zip(jobs, self.results[before:], strict=True):
            self._jobs_by_id[result.id] = job


def main(argv: list[str] | None = None) -> int:
    clusters = sorted(os.listdir("/etc/postgresql")) if os.path.isdir("/etc/postgresql") else []
    pg_version = clusters[0] if clusters else "15"
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=4, help="worker processes (prefork -c)")
    parser.add_argument("--faults", action="store_true", help="DB outage, SIGKILL, redelivery")
    parser.add_argument("--outage-s", type=float, default=30.0, help="PostgreSQL down this long")
    parser.add_argument("--error-rate", type=float, default=0.05, help="sandbox 429/500 share")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--timeout-s", type=float, default=900.0)
    parser.add_argument("--keep", action="store_true", help="keep the database and worker log")
    parser.add_argument(
        "--chaos",
        type=int,
        default=0,
        metavar="N",
        help="then N steps of the seeded fault schedule (bench/chaos.py, seed --seed)",
    )
    parser.add_argument(
        "--no-audit",
        dest="audit",
        action="store_false",
        help="skip the audit against the sandbox's Usage API (and its unmetered caller)",
    )
    parser.add_argument(
        "--prices-file",
        help="price rows the worker's meter uses over its own (TOKENMETER_PRICES_FILE): a wrong "
        "price here must make the run fail on cost_usd, priced by the sandbox's own list",
    )
    parser.add_argument(
        "--pg-url",
        default=PG_SERVER_URL,
        help="an existing database; the run creates (and drops) its own next to it",
    )
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379")
    parser.add_argument(
        "--broker",
        choices=("redis", "rabbitmq"),
        default="redis",
        help="the worker's broker; with rabbitmq tokenmeter has no Redis (local write-ahead "
        "files, file spool); Redis still carries the results and the drill's control",
    )
    parser.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672//")
    parser.add_argument(
        "--pg-stop",
        default=f"pg_ctlcluster --skip-systemctl-redirect {pg_version} main stop -m fast",
    )
    parser.add_argument(
        "--pg-start", default=f"pg_ctlcluster --skip-systemctl-redirect {pg_version} main start"
    )
    args = parser.parse_args(argv)
    if args.tasks < 10:
        parser.error("--tasks must be at least 10")
    console = Console()
    console.print(
        f"[bold]reconcile[/bold]: {args.tasks} tasks on {args.workers} worker processes "
        f"({args.broker} broker), "
        f"{args.error_rate:.0%} injected errors"
        + (
            f", faults: PostgreSQL down {args.outage_s:.0f}s, SIGKILL, redelivery"
            if args.faults
            else ""
        )
    )
    run = Run(args, console)
    result: Reconciliation | None = None
    interrupted = False
    try:
        run.start()
        result = run.run()
    except KeyboardInterrupt:
        interrupted = True
        return 130
    except Exception as exc:
        console.print(f"[red]reconcile failed:[/red] {exc!r}; kept {run.workdir / 'worker.log'}")
        return 2
    finally:
        run.stop(keep=args.keep or (not interrupted and (result is None or not result.ok)))
    for event in run.events:
        console.print(f"  {event}")
    console.print(report_table(result))
    rows = ", ".join(f"{n} {t}" for t, n in result.rollup_rows.items())
    console.print(f"rollup rows checked against their ledger rows: {rows}")
    problems = result.missing + result.extra + result.mismatched + result.rollups
    for line in (problems + result.kept_rollups)[:20]:
        console.print(f"  [red]{line}[/red]")
    if result.ok and run.app_db_failures:
        console.print(
            f"[bold red]{run.app_db_failures} application tasks failed on the database "
            "outage[/bold red] (the meter lost nothing)"
        )
        return 1
    for line in run.audit_problems:
        console.print(f"  [red]{line}[/red]")
    if not result.ok:
        console.print(f"[bold red]the ledger differs[/bold red]; kept: {run.db_url}, {run.workdir}")
        return 1
    if run.audit_problems:
        console.print("[bold red]the audit did not find what was injected[/bold red]")
        return 1
    console.print("[bold green]difference: 0[/bold green] (every request, category and cent)")
    if args.chaos:
        from bench import chaos

        servers = ["--pg-url", args.pg_url, "--redis-url", args.redis_url]
        return chaos.main(["--steps", str(args.chaos), "--seed", str(args.seed), *servers])
    return 0


if __name__ == "__main__":
    sys.exit(main())
