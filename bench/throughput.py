"""Worker throughput with and without tokenmeter: tasks/second of the same worker, one run.

    .venv/bin/python bench/throughput.py                # 300 tasks x 2 calls, prefork -c 2
    .venv/bin/python bench/throughput.py --latency-ms 200 --tasks 100

Starts the sandbox and a real ``celery worker`` per measurement (Redis broker, PostgreSQL
ledger in a throwaway database), interleaving the modes over several rounds so drift on a noisy
machine hits them alike, and prints the median tasks/second of each mode and its ratio to bare
(the median over rounds of the two in the same round), the pooled ratio (all of a mode's tasks
over all its time) and the spread of the rounds' ratios.  A thread polls the ledger every 10 ms
in every mode (bare too; each poll reads only the rows it has not seen, so that its load is the
same for all) and notes when each task's first row appears: a metered mode's flush latency is
that moment minus the moment the task's work ended (the task returns it).  The CPU each mode costs
a task is read from /proc: the worker's processes, PostgreSQL's and Redis', from the first
task sent until every row is in.  The clock starts after a warm-up (``WARM_UP`` tasks and, for
a metered mode, their rows in the ledger: each pool process's first commit is behind it).
Targets: metered / bare >= 0.95; p99 latency <= 1 s.

Two modes take a part of metering out, to say what each part costs a task (``--modes
nodb,capture``): ``nodb`` runs everything but the database write (the write-ahead file, the
writer thread, which prices each batch and marks it done in the file, as after a commit);
``capture`` keeps only the capture, the task's scope and the pricing (no write-ahead file, no
writer thread, no database).  They write no rows, so they have no flush latency, and their CPU
is counted until the last task's result.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from celery import Celery  # noqa: E402

from bench.env import subprocess_env  # noqa: E402
from bench.pg import SERVER_URL as PG_SERVER_URL  # noqa: E402
from bench.pg import create_database, drop_database  # noqa: E402
from bench.redisdb import ClaimedDB, claimed_databases  # noqa: E402
from models import migrate  # noqa: E402
from tokenmeter.sandbox.runner import SandboxServers  # noqa: E402

MODES = {
    "bare": {"TOKENMETER_DISABLED": "1"},
    "metered (defaults)": {},
    "metered, write-ahead to Redis too": {"TOKENMETER_WRITE_AHEAD": "redis"},
    "metered, inline flush": {"TOKENMETER_FLUSH": "inline"},
    # the general tool, for comparison: OpenTelemetry's celery + openai instrumentations, a
    # batch span processor, an exporter that keeps nothing (bench/worker_app.py)
    "opentelemetry (no metering)": {"TOKENMETER_DISABLED": "1", "BENCH_OTEL": "1"},
    # parts of metering taken out (bench/worker_app.py): what each part costs a task
    "metered, no database write": {"BENCH_ABLATE": "no-database"},
    "capture only (no WAL, no writer)": {
        "BENCH_ABLATE": "no-database",
        "TOKENMETER_WRITE_AHEAD": "off",
        "TOKENMETER_FLUSH": "inline",
    },
}
#: ``--modes`` names them so (bare always runs: the others are measured against it).
MODE_KEYS = dict(
    zip(("bare", "defaults", "redis", "inline", "otel", "nodb", "capture"), MODES, strict=True)
)


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _processes() -> list[tuple[int, int, str, float]]:
    """(pid, parent pid, command name, CPU seconds used so far: user + system) of every
    process, each read from its /proc stat once."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            head, tail = (entry / "stat").read_text().rsplit(")", 1)
        except OSError:
            continue
        fields = tail.split()  # from field 3 on: the name (field 2) may hold spaces
        cpu = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime
        found.append((int(entry.name), int(fields[1]), head.split("(", 1)[1], cpu))
    return found


def cpu_by_part(worker_pid: int) -> dict[str, float]:
    """CPU seconds used so far by the worker (its main process and pool children), by the
    PostgreSQL server's processes and by Redis: read before and after the timed tasks."""
    procs = _processes()
    tree, parts = {worker_pid}, {"worker": 0.0, "postgres": 0.0, "redis": 0.0}
    for _ in range(3):  # children, then theirs
        tree |= {pid for pid, ppid, _, _ in procs if ppid in tree}
    for pid, _, name, cpu in procs:
        part = (
            "worker"
            if pid in tree
            else "postgres"
            if name.startswith("postgres")
            else "redis"
            if name.startswith("redis-server")
            else None
        )
        if part is not None:
            parts[part] += cpu
    return parts


@dataclass(frozen=True)
class Ratios:
    """A mode's throughput against bare's over the rounds of one run."""

    median: float  # of the rounds' own ratios (each round's two runs minutes apart at most)
    pooled: float  # every task of the mode over all its time, against bare's the same way
    low: float  # the lowest and highest of the rounds' ratios
    high: float

    @classmethod
    def of(cls, rates: list[float], bare: list[float]) -> Ratios:
        """From the tasks/s of each round (the same number of tasks in every run)."""
        if not rates or len(rates) != len(bare):
            raise ValueError("one rate of the mode and one of bare for every round")
        each = [m / b for m, b in zip(rates, bare, strict=True)]
        # the same tasks in every run: time = tasks / rate, so the pooled ratio is bare's
        # total time over the mode's
        pooled = sum(1 / b for b in bare) / sum(1 / m for m in rates)
        return cls(statistics.median(each), pooled, min(each), max(each))


#: Tasks run before the clock starts (each pool process gets some).
WARM_UP = 20


class RowWatch:
    """Notes when each task's first ledger row becomes visible (polling, 10 ms)."""

    def __init__(self, db_url: str) -> None:
        from sqlalchemy import create_engine

        self.engine = create_engine(db_url)
        self.seen: dict[str, float] = {}
        self._stop = threading.Event()
        self._last = 0
        with self.engine.connect() as conn:
            self._last = conn.exec_driver_sql(
                "SELECT coalesce(max(id), 0) FROM openai_calls"
            ).scalar_one()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        # Ids are not committed in their order (two processes), so a high-water mark would
        # miss a row that commits late.  Each poll reads the rows above the longest run of
        # ids seen without a gap: the new rows and the few still out of order, not every row
        # of the round (which would make a metered mode's poll cost more than bare's, whose
        # ledger stays empty; a gap that never fills, a rolled-back insert, only makes the
        # polls read more).
        seen_ids: set[int] = set()
        while not self._stop.wait(0.01):
            with self.engine.connect() as conn:
                rows = conn.exec_driver_sql(
                    "SELECT id, task_id FROM openai_calls WHERE id > %s", (self._last,)
                ).all()
            now = time.time()
            for row_id, task_id in rows:
                self.seen.setdefault(task_id, now)
                seen_ids.add(row_id)
            while self._last + 1 in seen_ids:
                self._last += 1
                seen_ids.discard(self._last)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.engine.dispose()


def measure(
    env: dict[str, str], app: Celery, args: argparse.Namespace, db_url: str, metered: bool
) -> tuple[float, list[float], dict[str, float]]:
    """Tasks/second of one worker, each task's flush latency (metered), and the CPU
    milliseconds per task of the worker, PostgreSQL and Redis.

    The ledger is polled in every mode, bare included, so that the poll's own load is the
    same for all of them."""
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
        watch = RowWatch(db_url)
        # warm up, to the steady state a worker is in after its first minute: imports, pools,
        # and (metered) each child's first commit (its engine, its connection, the dialect's
        # first queries), so the clock starts once the warm-up's rows are all in the ledger
        warm = [app.send_task("bench.calls", args=(args.calls,)) for _ in range(WARM_UP)]
        for r in warm:
            r.get(timeout=60)
        warmed = {r.id for r in warm}
        deadline = time.monotonic() + 30
        while metered and not warmed <= set(watch.seen) and time.monotonic() < deadline:
            time.sleep(0.05)
        cpu_before = cpu_by_part(worker.pid)
        started = time.perf_counter()
        results = [app.send_task("bench.calls", args=(args.calls,)) for _ in range(args.tasks)]
        ended = {r.id: r.get(timeout=600) for r in results}
        rate = args.tasks / (time.perf_counter() - started)
        if metered:  # until every row is in: the writer's work is part of the tasks' cost
            deadline = time.monotonic() + 30
            while len(set(ended) & set(watch.seen)) < len(ended) and time.monotonic() < deadline:
                time.sleep(0.05)
        cpu = {
            part: (after - cpu_before[part]) * 1e3 / args.tasks
            for part, after in cpu_by_part(worker.pid).items()
        }
        latencies: list[float] = []
        if not metered:
            watch.stop()
        else:
            deadline = time.monotonic() + 30
            while len(set(ended) & set(watch.seen)) < len(ended) and time.monotonic() < deadline:
                time.sleep(0.05)
            watch.stop()
            missing = set(ended) - set(watch.seen)
            if missing:
                raise SystemExit(f"{len(missing)} tasks have no ledger row after 30 s")
            latencies = [watch.seen[t] - ended[t] for t in ended]
        return rate, latencies, cpu
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
        "--modes",
        default=",".join(MODE_KEYS),
        help="comma-separated, of " + ", ".join(MODE_KEYS) + " (bare always runs); fewer "
        "modes, more rounds in the same time: a ratio measured more often",
    )
    parser.add_argument(
        "--pg-url",
        default=PG_SERVER_URL,
    )
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379")
    parser.add_argument("--results", type=Path, help="write the Markdown report here")
    args = parser.parse_args()
    keys = [k.strip() for k in args.modes.split(",") if k.strip()]
    unknown = sorted(set(keys) - set(MODE_KEYS))
    if unknown:
        parser.error(f"unknown --modes {', '.join(unknown)}: choose from {', '.join(MODE_KEYS)}")
    args.modes = [MODE_KEYS[k] for k in MODE_KEYS if k in keys or k == "bare"]

    db_url = create_database(args.pg_url, "tokenmeter_bench")
    migrate.upgrade(db_url)
    with claimed_databases(args.redis_url, 2) as (broker_db, backend_db):
        run(args, db_url, broker_db, backend_db)


def run(args: argparse.Namespace, db_url: str, broker_db: ClaimedDB, backend_db: ClaimedDB) -> None:
    broker, backend = broker_db.url, backend_db.url
    sandbox = SandboxServers().start()
    app = Celery("bench_client", broker=broker, backend=backend)
    base_env = {
        **subprocess_env(),
        "PYTHONPATH": str(ROOT),
        "DATABASE_URL": db_url,
        "CELERY_BROKER_URL": broker,
        "CELERY_RESULT_BACKEND": backend,
        "OPENAI_BASE_URL": sandbox.openai_base_url,
        "OPENAI_API_KEY": "sk-sandbox",
        "BENCH_LATENCY_MS": str(args.latency_ms),
        "TOKENMETER_RECOVERY_INTERVAL_S": "30",
        "TOKENMETER_DATA_DIR": f"/tmp/tokenmeter-throughput-{os.getpid()}",
    }
    modes = {mode: MODES[mode] for mode in args.modes}
    rates: dict[str, list[float]] = {mode: [] for mode in modes}
    latencies: dict[str, list[float]] = {mode: [] for mode in modes}
    cpus: dict[str, list[dict[str, float]]] = {mode: [] for mode in modes}
    try:
        for round_no in range(args.rounds):
            order = list(modes.items())
            order = order[round_no % len(order) :] + order[: round_no % len(order)]
            for mode, extra in order:
                metered = "TOKENMETER_DISABLED" not in extra and "BENCH_ABLATE" not in extra
                rate, lat, cpu = measure({**base_env, **extra}, app, args, db_url, metered)
                rates[mode].append(rate)
                latencies[mode].extend(lat)
                cpus[mode].append(cpu)
                p99 = f"  p99 flush {_pct(lat, 99) * 1e3:6.0f} ms" if lat else ""
                used = "  ".join(f"{part} {ms:.2f}" for part, ms in cpu.items())
                print(
                    f"round {round_no + 1}: {mode:<34} {rate:8.1f} tasks/s  "
                    f"CPU ms/task: {used}{p99}",
                    flush=True,
                )
    finally:
        sandbox.stop()
        app.close()
        drop_database(args.pg_url, db_url)

    print(
        f"\n{args.tasks} tasks x {args.calls} calls, pool={args.pool} "
        f"-c {args.concurrency}, sandbox latency {args.latency_ms} ms, "
        f"median of {args.rounds} rounds"
    )
    header = ["tasks/s", "ratio", "pooled", "spread", "p50 ms", "p99 ms", "max ms"]
    header += ["worker", "postgres", "redis"]
    print(f"{'mode':<36}" + "".join(f"{h:>10}" for h in header))
    rows = []
    for mode in modes:
        median = statistics.median(rates[mode])
        lat = latencies[mode]
        cells = (
            [f"{_pct(lat, q) * 1e3:,.0f}" for q in (50, 99)] + [f"{max(lat) * 1e3:,.0f}"]
            if lat
            else ["", "", ""]
        )
        cells += [
            f"{statistics.median(c[part] for c in cpus[mode]):.2f}"
            for part in ("worker", "postgres", "redis")
        ]
        r = Ratios.of(rates[mode], rates["bare"])
        spread = f"{r.low:.2f}-{r.high:.2f}"
        print(
            f"{mode:<36}{median:>10.1f}{r.median:>10.3f}{r.pooled:>10.3f}{spread:>10}"
            + "".join(f"{c:>10}" for c in cells)
        )
        rows.append(
            f"| {mode} | {median:,.1f} | {r.median:.3f} | {r.pooled:.3f} | {spread} | "
            + " | ".join(cells)
            + " |"
        )
    if args.results:
        from bench.results import write_section

        command = (
            f".venv/bin/python bench/throughput.py --tasks {args.tasks} --calls {args.calls} "
            f"--rounds {args.rounds} --concurrency {args.concurrency} "
            f"--latency-ms {args.latency_ms}"
        )
        chosen = [k for k, mode in MODE_KEYS.items() if mode in modes]
        some = len(chosen) < len(MODE_KEYS)  # a run of some modes: said, a section of its own
        if some:
            command += f" --modes {','.join(chosen)}"
        body = "\n".join(
            [
                f"### Worker throughput, sandbox latency {args.latency_ms} ms"
                + (f" ({', '.join(chosen)})" if some else ""),
                "",
                f"`{command}`: real `celery worker -P {args.pool} -c {args.concurrency}`, Redis "
                "broker, PostgreSQL ledger; median tasks/s of the rounds, modes interleaved "
                "(order rotated each round); ratio: the median over rounds of the mode's "
                "tasks/s over bare's in the same round; pooled: all the mode's tasks over all "
                "its time, against bare's (a round that ran fast or slow for both counts for "
                "what it took, not as one vote); spread: the lowest and highest of the rounds' "
                "ratios (where they lie far apart, the machine moved under the run and neither "
                "figure is sharper than that). Flush latency: task's work ended -> "
                "its first ledger row visible (a 10 ms poll of the ledger's new rows, which "
                "runs in every mode, bare included), over every task of the rounds. CPU: "
                "milliseconds of CPU per task (user + system, from /proc) of the worker's "
                "processes, of PostgreSQL's and of Redis', from the first task sent until every "
                "task's rows are in; medians of the rounds.",
                "",
                "| mode | tasks/s | ratio to bare | pooled | spread | flush p50 (ms) | p99 (ms) "
                "| max (ms) "
                "| worker CPU (ms/task) | PostgreSQL CPU | Redis CPU |",
                "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
                *rows,
            ]
        )
        section = f"throughput-{args.latency_ms}ms" + ("-" + "-".join(chosen) if some else "")
        write_section(args.results, section, body)
        print(f"written to {args.results}")


def _pct(values: list[float], q: int) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


if __name__ == "__main__":
    main()
