"""How long the local file spool takes to replay N spooled batches into the ledger.

    .venv/bin/python bench/spool_replay.py                      # 1,000 / 4,000 / 10,000
    .venv/bin/python bench/spool_replay.py --sizes 10000 --results bench/RESULTS.md

Each batch is one task's flush of one call (what a database outage leaves in the spool of a
worker without Redis).  The ledger is a fresh SQLite file per size; the time is the replay
alone (writing the spool is not counted).  Replay must stay linear in the number of batches.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.results import write_section
from tokenmeter import migrate
from tokenmeter.context import CallRecord
from tokenmeter.db import dispose_all
from tokenmeter.sink import DatabaseSink, FileSpool, FlushBatch


def replay_seconds(n: int, folder: Path) -> float:
    url = f"sqlite:///{folder / 'ledger.sqlite'}"
    migrate.upgrade(url)
    spool = FileSpool(folder / "spool")
    for i in range(n):
        call = CallRecord(
            operation="chat",
            request_id=f"req_{i}",
            requested_model="gpt-4o-mini",
            input_tokens=100,
            output_tokens=20,
            cost_usd=Decimal("0.000027"),
            execution_id=f"e{i}",
        )
        spool.push(FlushBatch(calls=[call], execution_id=call.execution_id).to_json())
    sink = DatabaseSink(url, spool=FileSpool(folder / "spool"))
    started = time.perf_counter()
    replayed = sink.replay()
    elapsed = time.perf_counter() - started
    if replayed != n or len(sink.spool):
        raise SystemExit(f"replayed {replayed} of {n}, {len(sink.spool)} left")
    dispose_all()
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,4000,10000")
    parser.add_argument("--results", type=Path, help="write the Markdown table here")
    args = parser.parse_args()
    rows = ["| batches | replay (s) | per batch (ms) |", "| ---: | ---: | ---: |"]
    for n in (int(x) for x in args.sizes.split(",")):
        with tempfile.TemporaryDirectory(prefix="tokenmeter-spool-") as tmp:
            seconds = replay_seconds(n, Path(tmp))
        rows.append(f"| {n:,} | {seconds:.2f} | {seconds / n * 1000:.3f} |")
        print(rows[-1], flush=True)
    body = (
        "Spool replay (local file spool, one call per batch, SQLite ledger): "
        f"`.venv/bin/python bench/spool_replay.py --sizes {args.sizes}`\n\n" + "\n".join(rows)
    )
    if args.results:
        write_section(args.results, "spool-replay", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
