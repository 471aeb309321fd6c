"""Worker throughput with and without tokenmeter: tasks/second of the same worker, one run.

    .venv/bin/python bench/throughput.py                # 300 tasks x 2 calls, prefork -c 2
    .venv/bin/python bench/throughput.py --latency-ms 200 --tasks 100

Starts the sandbox and a real ``celery worker`` per measurement (Redis broker, PostgreSQL
ledger in a throwaway database), interleaving the modes over several rounds so drift on a noisy
machine hits them alike, and prints the median tasks/second of each mode and the ratios.
Target: metered / bare >= 0.97.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402
from celery import Celery  # noqa: E402

from bench.pg import create_database, drop_database  # noqa: E402
from models import migrate  # noqa: E402
from tokenmeter.sandbox.runner import SandboxServers  # noqa: E402

MODES = {
    "bare": {"TOKENMETER_DISABLED": "1"},
    "metered": {"TOKENMETER_WRITE_AHEAD": "true"},
    "metered, no write-ahead": {"TOKENMETER_WRITE_AHEAD": "false"},
}


def measure(env: dict[str, str], app: Celery, args: argparse.Namespace) -> float:
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "bench.worker_app",
            "worker",
            "-P",
            args.pool,
            "-c",
            str(args.concurrency),
            "-l",
            "WARNING",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "-n",
            f"bench-{uuid.uuid4().hex[:6]}@%h",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not app.control.ping(timeout=0.5):
            if worker.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("worker did not start")
        for r in [app.send_task("bench.calls", args=(args.calls,)) for _ in range(10)]:
            r.get(timeout=60)  # warm up: imports, connections, pools
        started = time.perf_counter()
        results = [app.send_task("bench.calls", args=(args.calls,)) for _ in range(args.tasks)]
        for r in results:
            r.get(timeout=600)
        return args.tasks / (time.perf_counter() - started)
    finally:
        worker.terminate()
        worker.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=300)
    parser.add_argument("--calls", type=int, default=2, help="OpenAI calls per task")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pool", default="prefork")
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--latency-ms", type=int, default=0, help="sandbox response delay")
    parser.add_argument(
        "--pg-url",
        default=os.environ.get(
            "TOKENMETER_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
        ),
    )
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379")
    parser.add_argument("--results", type=Path, help="write the Markdown report here")
    args = parser.parse_args()

    db_url = create_database(args.pg_url, "tokenmeter_bench")
    migrate.upgrade(db_url)
    broker, backend = f"{args.redis_url}/9", f"{args.redis_url}/8"
    for url in (broker, backend):
        redis.Redis.from_url(url).flushdb()
    sandbox = SandboxServers().start()
    app = Celery("bench_client", broker=broker, backend=backend)
    base_env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "DATABASE_URL": db_url,
        "CELERY_BROKER_URL": broker,
        "CELERY_RESULT_BACKEND": backend,
        "OPENAI_BASE_URL": sandbox.openai_base_url,
        "OPENAI_API_KEY": "sk-sandbox",
        "BENCH_LATENCY_MS": str(args.latency_ms),
        "TOKENMETER_RECOVERY_INTERVAL_S": "30",
    }
    rates: dict[str, list[float]] = {mode: [] for mode in MODES}
    try:
        for round_no in range(args.rounds):
            for mode, extra in MODES.items():
                rate = measure({**base_env, **extra}, app, args)
                rates[mode].append(rate)
                print(f"round {round_no + 1}: {mode:<24} {rate:8.1f} tasks/s", flush=True)
    finally:
        sandbox.stop()
        app.close()
        drop_database(args.pg_url, db_url)

    bare = statistics.median(rates["bare"])
    print(
        f"\n{args.tasks} tasks x {args.calls} calls, pool={args.pool} "
        f"-c {args.concurrency}, sandbox latency {args.latency_ms} ms, "
        f"median of {args.rounds} rounds"
    )
    print(f"{'mode':<26}{'tasks/s':>10}{'ratio':>8}")
    rows = []
    for mode in MODES:
        median = statistics.median(rates[mode])
        print(f"{mode:<26}{median:>10.1f}{median / bare:>8.3f}")
        rows.append(f"| {mode} | {median:,.1f} | {median / bare:.3f} |")
    if args.results:
        from bench.results import write_section

        command = (
            f".venv/bin/python bench/throughput.py --tasks {args.tasks} --calls {args.calls} "
            f"--rounds {args.rounds} --concurrency {args.concurrency} "
            f"--latency-ms {args.latency_ms}"
        )
        body = "\n".join(
            [
                f"### Worker throughput, sandbox latency {args.latency_ms} ms",
                "",
                f"`{command}`: real `celery worker -P {args.pool} -c {args.concurrency}`, Redis "
                "broker, PostgreSQL ledger; median tasks/s of the rounds, modes interleaved.",
                "",
                "| mode | tasks/s | ratio to bare |",
                "| --- | ---: | ---: |",
                *rows,
            ]
        )
        write_section(args.results, f"throughput-{args.latency_ms}ms", body)
        print(f"written to {args.results}")


if __name__ == "__main__":
    main()
