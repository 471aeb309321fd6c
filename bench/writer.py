"""The ledger writer alone: how many calls a second it puts into PostgreSQL.

    .venv/bin/python bench/writer.py                     # 3 rounds of 20,000 calls
    .venv/bin/python bench/writer.py --calls 50000 --per-task 4

Batches shaped like a task's (``--per-task`` calls each, every column the capture fills) are
queued on a :class:`tokenmeter.writer.BackgroundWriter` as fast as one thread can, and the
clock stops when ``flush()`` returns: everything is committed.  A throwaway database; the
ledger's indexes and unique constraints are all there.  Target: >= 20,000 calls/s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.pg import SERVER_URL as PG_SERVER_URL  # noqa: E402
from tokenmeter.sink import FlushBatch  # noqa: E402


def batches(n_calls: int, per_task: int, round_no: int) -> list[FlushBatch]:
    from tokenmeter.context import CallRecord
    from tokenmeter.ids import new_id

    out = []
    now = datetime.now(UTC)
    for _ in range(n_calls // per_task):
        execution = new_id()
        calls = [
            CallRecord(
                operation="chat",
                requested_model="gpt-4o-mini",
                response_model="gpt-4o-mini-2024-07-18",
                request_id=f"req_{execution}_{seq}",
                client_request_id=f"tm-{new_id()}",
                service_tier="default",
                input_tokens=1200,
                cached_input_tokens=1024,
                output_tokens=40,
                cost_usd=Decimal("0.0000348000"),
                price_source="genai-prices 0.2.3",
                price_version="gpt-4o-mini@listed",
                latency_ms=412.5,
                created_at=now,
                task_id=execution,
                task_name="promotion.scan",
                execution_id=execution,
                seq=seq,
                scope_kind="task",
                scope_ref=execution,
                hostname="bench@host",
            )
            for seq in range(per_task)
        ]
        out.append(FlushBatch(calls=calls, execution_id=execution, task_id=execution))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20_000, help="calls per round")
    parser.add_argument("--per-task", type=int, default=2, help="calls per batch (task)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--pg-url",
        default=PG_SERVER_URL,
    )
    parser.add_argument("--results", type=Path, help="write the Markdown report here")
    parser.add_argument(
        "--without-daily-totals",
        action="store_true",
        help="drop the daily-totals triggers (tm0008, tm0009) first: what keeping them costs",
    )
    args = parser.parse_args()

    from bench.pg import create_database, drop_database

    db_url = create_database(args.pg_url, "tokenmeter_writer")
    os.environ["DATABASE_URL"] = db_url
    os.environ.setdefault("TOKENMETER_DATA_DIR", f"/tmp/tokenmeter-writer-{os.getpid()}")
    try:
        from tokenmeter.migrate import upgrade
        from tokenmeter.sink import DatabaseSink, FileSpool
        from tokenmeter.writer import BackgroundWriter

        upgrade(db_url)
        if args.without_daily_totals:
            from sqlalchemy import create_engine, text

            bare = create_engine(db_url)
            with bare.begin() as conn:
                for event in ("insert", "update", "delete"):
                    for table in ("daily", "scopes"):
                        conn.execute(
                            text(f"DROP TRIGGER tokenmeter_{table}_{event} ON openai_calls")
                        )
            bare.dispose()
        sink = DatabaseSink(spool=FileSpool(Path(os.environ["TOKENMETER_DATA_DIR"]) / "spool"))
        writer = BackgroundWriter(sink)
        writer.submit(batches(args.per_task, args.per_task, -1)[0])
        writer.flush()  # warm: the connection, the staging table
        rates, commits = [], []
        for round_no in range(args.rounds):
            work = batches(args.calls, args.per_task, round_no)
            before = writer.commits
            started = time.perf_counter()
            for batch in work:
                writer.submit(batch)
            writer.flush()
            elapsed = time.perf_counter() - started
            rates.append(args.calls / elapsed)
            commits.append(writer.commits - before)
            print(
                f"round {round_no + 1}: {args.calls:,} calls in {elapsed:.2f} s = "
                f"{rates[-1]:,.0f} calls/s ({commits[-1]} commits)",
                flush=True,
            )
        writer.close()
        from sqlalchemy import create_engine, text

        engine = create_engine(db_url)
        with engine.connect() as conn:
            stored = conn.execute(text("SELECT count(*) FROM openai_calls")).scalar_one()
        engine.dispose()
        expected = args.calls * args.rounds + args.per_task
        if stored != expected:
            raise SystemExit(f"the ledger has {stored} rows, {expected} were written")
    finally:
        drop_database(args.pg_url, db_url)

    median = statistics.median(rates)
    command = (
        f".venv/bin/python bench/writer.py --calls {args.calls} --per-task {args.per_task} "
        f"--rounds {args.rounds}"
    )
    body = "\n".join(
        [
            "### The ledger writer alone",
            "",
            f"`{command}`: batches of {args.per_task} fully filled calls queued on one "
            "`BackgroundWriter` as fast as a thread can; the clock stops when `flush()` "
            "returns (all committed, every row counted afterwards). PostgreSQL, all the "
            "ledger's indexes and unique constraints.",
            "",
            "| calls per round | median calls/s | slowest round | commits per round |",
            "| ---: | ---: | ---: | ---: |",
            f"| {args.calls:,} | {median:,.0f} | {min(rates):,.0f} | "
            f"{statistics.median(commits):.0f} |",
        ]
    )
    from bench.results import publish

    publish(body, args.results, "writer")


if __name__ == "__main__":
    main()
