"""``make demo``: the whole thing, offline, on the embedded defaults.

Starts the OpenAI and Reddit sandboxes, a real ``celery -A tasks worker --beat`` on the
embedded filesystem broker and a fresh SQLite database under ``var/demo``, enqueues the seed
donations as commissions, lets beat run a promotion scan (dry run), waits with a progress
display, checks the ledger against the sandbox's ground truth, prints the usage report and
stops everything, also on Ctrl-C or failure.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from importlib import resources
from pathlib import Path

from celery import Celery
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from sqlalchemy import create_engine, func, select
from sqlalchemy.orm import Session

from celeryconfig import filesystem_transport_options
from models import migrate
from models.tables import AgentScannedPost, PipelineRun
from tasks import reports
from tokenmeter import OpenAICall
from tokenmeter.reporting import queries, render
from tokenmeter.sandbox.runner import SandboxServers

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 100


def main() -> int:
    console = Console()
    var = ROOT / "var" / "demo"
    shutil.rmtree(var, ignore_errors=True)
    var.mkdir(parents=True)
    db_url = f"sqlite:///{var / 'tokenmeter.sqlite'}"
    migrate.upgrade(db_url)
    donations = json.loads(resources.files("tasks").joinpath("data/donations.json").read_text())

    worker: subprocess.Popen[bytes] | None = None
    with SandboxServers() as sandbox:
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("CELERY_", "OPENAI_"))},
            "PYTHONPATH": str(ROOT),
            "TOKENMETER_VAR_DIR": str(var),
            "DATABASE_URL": db_url,
            "OPENAI_BASE_URL": sandbox.openai_base_url,
            "OPENAI_API_KEY": "sk-sandbox",
            "REDDIT_SANDBOX_URL": sandbox.reddit_base_url,
            "PROMOTION_INTERVAL_S": "2",
            "PROMOTION_POST_LIMIT": "5",
            "TOKENMETER_SPOOL_DIR": str(var / "spool"),
        }
        console.print(
            f"[bold]tokenmeter demo[/bold]: sandbox OpenAI at {sandbox.openai_base_url}, "
            f"Reddit at {sandbox.reddit_base_url}; database {db_url}"
        )
        log = open(var / "worker.log", "wb")  # noqa: SIM115
        worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "tasks",
                "worker",
                "--beat",
                "-c",
                "2",
                "-l",
                "INFO",
                "-s",
                str(var / "celerybeat-schedule"),
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
            ],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            _run(console, var, db_url, donations, sandbox, worker)
            _stop(worker)  # beat would go on scanning: the audit compares a finished run
            _audit(console, env)
        except KeyboardInterrupt:
            console.print("[yellow]interrupted; stopping the worker[/yellow]")
            return 130
        except Exception as exc:
            console.print(f"[red]demo failed:[/red] {exc}\nworker log: {var / 'worker.log'}")
            return 1
        finally:
            _stop(worker)
    console.print(
        f"\nworker stopped. Explore: DATABASE_URL={db_url} tokenmeter check-usage --by task"
    )
    return 0


def _stop(worker: subprocess.Popen[bytes]) -> None:
    """Warm shutdown: running tasks finish and the writer drains into the ledger."""
    if worker.poll() is None:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


def _audit(console: Console, env: dict[str, str]) -> None:
    """``tokenmeter audit`` against the sandbox's Usage and Costs APIs, by the minute.

    The audit compares closed buckets only, so it waits for the current minute to end.
    """
    wait = 61 - time.time() % 60
    console.print(
        f"\n[bold]provider audit[/bold]: waiting {wait:.0f}s for this minute's usage bucket to "
        "close (only closed buckets are compared)"
    )
    time.sleep(wait)
    command = [sys.executable, "-m", "tokenmeter.reporting.cli", "audit", "--since", "10m"]
    command += ["--bucket", "1m", "--settle", "0", "--by", "model,service_tier,batch"]
    console.print(f"$ tokenmeter {' '.join(command[3:])}")
    audited = subprocess.run(
        command,
        env={**env, "OPENAI_ADMIN_KEY": "sk-admin-demo", "COLUMNS": str(console.width)},
        cwd=ROOT,
        check=False,
    )
    if audited.returncode != 0:
        raise RuntimeError(f"the audit against the provider's books exited {audited.returncode}")


def _run(
    console: Console,
    var: Path,
    db_url: str,
    donations: list[dict[str, object]],
    sandbox: SandboxServers,
    worker: subprocess.Popen[bytes],
) -> None:
    client = Celery("demo_client", broker="filesystem://", backend=f"file://{var / 'results'}")
    client.conf.broker_transport_options = filesystem_transport_options(var)
    (var / "results").mkdir(exist_ok=True)
    results = [client.send_task("tasks.commission", args=(d,)) for d in donations]
    engine = create_engine(db_url)
    deadline = time.monotonic() + TIMEOUT_S
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        commissions = progress.add_task("commissions", total=len(results))
        scan = progress.add_task("promotion scan (beat, dry run)", total=1)
        ledger = progress.add_task("ledger vs sandbox ground truth", total=1)
        while True:
            if worker.poll() is not None:
                raise RuntimeError(f"the worker exited with {worker.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"not finished after {TIMEOUT_S}s")
            done = sum(r.ready() for r in results)
            progress.update(commissions, completed=done)
            with Session(engine) as s:
                rated = s.scalar(
                    select(func.count())
                    .select_from(AgentScannedPost)
                    .where(AgentScannedPost.agent_ratings.is_not(None))
                )
                recorded = s.scalar(select(func.count()).select_from(OpenAICall))
            progress.update(scan, completed=min(1, rated or 0))
            billed = len(sandbox.ledger)
            settled = done == len(results) and rated and recorded == billed
            progress.update(ledger, total=max(billed, 1), completed=min(recorded or 0, billed))
            if settled:
                break
            time.sleep(0.25)
    failed = [r for r in results if r.failed()]
    if failed:
        raise RuntimeError(f"{len(failed)} commissions failed: {failed[0].result!r}")

    with Session(engine) as s:
        ids = set(s.scalars(select(OpenAICall.request_id)))
        truth = sandbox.ledger.totals()
        ours = queries.usage_summary(
            s,
            datetime.now(UTC) - timedelta(hours=1),
            datetime.now(UTC) + timedelta(minutes=1),
            "none",
        )[0]
        by_model = queries.usage_summary(
            s,
            datetime.now(UTC) - timedelta(hours=1),
            datetime.now(UTC) + timedelta(minutes=1),
            "model",
        )
        runs = reports.top_runs(s, 20)
        posts = reports.top_posts(s, 50)
        statuses = dict(
            s.execute(select(PipelineRun.status, func.count()).group_by(PipelineRun.status)).all()
        )
    exact = ids == {r.request_id for r in sandbox.ledger.rows()} and all(
        getattr(ours, f) == truth[f]
        for f in ("input_tokens", "output_tokens", "cached_input_tokens", "image_count")
    )
    width = console.width
    console.print(reports.runs_table(runs, "per pipeline run (commissions)", width))
    console.print(reports.posts_table(posts, "per scanned post", width))
    console.print(render.usage_table(by_model, "per model", "model", width))
    console.print(
        f"[bold]total[/bold]: {ours.calls} OpenAI calls, {ours.input_tokens:,} input "
        f"({ours.cached_input_tokens:,} cached) and {ours.output_tokens:,} output tokens, "
        f"{ours.image_count} images, [bold]{render.money(ours.cost_usd)}[/bold]; runs: "
        f"{statuses}; posts scanned: {len(posts)}"
    )
    verdict = "[green]matches[/green]" if exact else "[red]DIFFERS FROM[/red]"
    console.print(
        f"ledger {verdict} the sandbox's ground truth: {len(ids)} requests, every token category"
    )
    if not exact:
        raise RuntimeError("the ledger differs from the ground truth")


if __name__ == "__main__":
    sys.exit(main())
