"""Report queries on a big ledger: 1M openai_calls rows in PostgreSQL, summary timings.

    .venv/bin/python bench/report_queries.py                 # 1,000,000 rows over 90 days
    .venv/bin/python bench/report_queries.py --rows 200000 --explain

Creates a throwaway database (dropped at the end), seeds it with generate_series (models,
tasks, scopes, statuses and costs drawn deterministically), ANALYZEs it, then times
``reporting.queries.usage_summary`` for 7- and 30-day windows and each grouping, read through
the daily totals the database keeps (``tokenmeter_daily_usage``) and, for comparison, from
every call: median of ``--repeat`` runs, both in one run.  Target (#17): a 30-day summary
over 10M rows < 150 ms.  Then the dashboard's pages (overview, ranges, groupings, a run's and
a post's calls) served by the app over the same rows (#18: fast on 10M rows).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session

from bench.pg import create_database, drop_database
from models import migrate
from tokenmeter.reporting import queries

SEED = """
INSERT INTO openai_calls (request_id, created_at, task_id, task_name, attempt, execution_id,
    seq, scope_kind, scope_ref, operation, requested_model, response_model, model, stream,
    input_tokens, cached_input_tokens, input_image_tokens, output_tokens, reasoning_tokens,
    image_count, usage_reported, cost_usd, price_version, latency_ms, status)
SELECT 'req_' || i, :end - (i::bigint * 90 * 86400 / :rows) * interval '1 second',
    'task-' || (i / 4), (ARRAY['tasks.commission','tasks.promotion_scan'])[1 + i % 2], 0,
    'exec-' || (i / 4), i % 4,
    (ARRAY['pipeline_run','scanned_post','task', NULL])[1 + i % 4], (i % 5000)::text,
    'chat', m, m || '-snap', m, false,
    100 + i % 900, (i % 3) * 128, 0, 20 + i % 300, CASE WHEN m = 'o3-mini' THEN 64 ELSE 0 END,
    0, true, ((100 + i % 900) * 0.15 + (20 + i % 300) * 0.60) / 1000000, m || '@v1',
    50 + i % 400, CASE WHEN i % 50 = 0 THEN 'error' ELSE 'ok' END
FROM generate_series(1, :rows) AS i,
     LATERAL (SELECT (ARRAY['gpt-4o-mini','gpt-4o','o3-mini','text-embedding-3-small'])
              [1 + i % 4] AS m) AS pick
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--explain", action="store_true", help="print EXPLAIN ANALYZE")
    parser.add_argument(
        "--no-pages", dest="pages", action="store_false", help="skip the dashboard's pages"
    )
    parser.add_argument("--results", type=Path, help="write the Markdown report here")
    parser.add_argument("--pg-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()

    url = create_database(args.pg_url, "tokenmeter_bench")
    engine = create_engine(url)
    try:
        migrate.upgrade(url)
        end = datetime.now(UTC)
        started = time.perf_counter()
        with engine.begin() as conn:
            conn.execute(text(SEED), {"rows": args.rows, "end": end})
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM ANALYZE openai_calls"))
        print(f"seeded {args.rows:,} rows in {time.perf_counter() - started:.1f} s")
        print(
            f"{'window':<8}{'group by':<10}{'groups':>8}{'calls':>12}"
            f"{'daily totals ms':>17}{'every call ms':>15}"
        )
        table: list[str] = []
        with Session(engine) as session:
            for days in (7, 30):
                start = end - timedelta(days=days)
                for group in ("model", "task", "kind", "day", "status", "none"):
                    timings: dict[bool, list[float]] = {True: [], False: []}
                    found: dict[bool, list[queries.UsageRow]] = {}
                    for _ in range(args.repeat):
                        for daily in (True, False):  # interleaved: the same load on both
                            queries.USE_DAILY_TOTALS = daily
                            t0 = time.perf_counter()
                            found[daily] = queries.usage_summary(session, start, end, group)
                            timings[daily].append((time.perf_counter() - t0) * 1000)
                    queries.USE_DAILY_TOTALS = True
                    if found[True] != found[False]:
                        raise SystemExit(f"{days} days by {group}: the two readings differ")
                    calls = sum(r.calls for r in found[True])
                    table.append(
                        f"| {days} | {group} | {calls:,} | {statistics.median(timings[True]):.1f} "
                        f"| {statistics.median(timings[False]):.1f} |"
                    )
                    print(
                        f"{days:>3} days {group:<10}{len(found[True]):>8}{calls:>12,}"
                        f"{statistics.median(timings[True]):>17.1f}"
                        f"{statistics.median(timings[False]):>15.1f}",
                        flush=True,
                    )
        pages: list[str] = []
        if args.pages:
            pages = time_pages(url, args.repeat)
        if args.explain:
            with engine.connect() as conn:
                plan = conn.execute(
                    text(
                        "EXPLAIN ANALYZE SELECT model, count(*), sum(cost_usd) FROM openai_calls "
                        "WHERE created_at >= :s AND created_at < :e GROUP BY model"
                    ),
                    {"s": end - timedelta(days=7), "e": end},
                ).scalars()
                print("\n".join(plan))
    finally:
        engine.dispose()
        drop_database(args.pg_url, url)
    from bench.results import publish

    body = "\n".join(
        [
            f"### Usage summary over {args.rows:,} ledger rows (PostgreSQL)",
            "",
            f"`.venv/bin/python bench/report_queries.py --rows {args.rows} --repeat "
            f"{args.repeat}`: rows spread over 90 days; `usage_summary` for windows ending now, "
            "median ms, read through the daily totals (`tokenmeter_daily_usage`, whole UTC days, "
            "plus the ledger for the partial days at the ends) and from every call, interleaved "
            "in one run; both readings checked equal. Target: 30 days over 10M rows < 150 ms.",
            "",
            "| days | group by | calls | daily totals ms | every call ms |",
            "| ---: | --- | ---: | ---: | ---: |",
            *table,
        ]
    )
    if pages:
        body += "\n".join(
            [
                "",
                "",
                "The dashboard's pages on the same rows: `GET` through the app in-process "
                "(FastAPI's TestClient, sign-in off), the HTML built and returned; median ms of "
                f"{args.repeat} (after one warm-up).",
                "",
                "| page | ms | bytes |",
                "| --- | ---: | ---: |",
                *pages,
            ]
        )
    publish(body, args.results, f"report-queries-{args.rows}")


PAGES = (
    ("overview, last 30 days by model", "/"),
    ("last 7 days", "/?days=7"),
    ("30 days by task", "/?group_by=task"),
    ("30 days by tier", "/?group_by=tier"),
    ("a date range (60 days)", "/?start_date={d60}&end_date={d0}"),
    ("a run's calls", "/scopes/pipeline_run/4000"),
    ("a scanned post's calls", "/scopes/scanned_post/4001"),
)


def time_pages(url: str, repeat: int) -> list[str]:
    """Median ms of each dashboard page, served by the real app over the seeded ledger."""
    import os

    from fastapi.testclient import TestClient

    from tokenmeter.reporting.api import create_app
    from tokenmeter.settings import get_settings

    os.environ["DATABASE_URL"] = url
    get_settings.cache_clear()
    today = datetime.now(UTC).date()
    dates = {"d0": today.isoformat(), "d60": (today - timedelta(days=60)).isoformat()}
    rows = []
    with TestClient(create_app(require_auth=False), base_url="http://127.0.0.1") as client:
        for label, path in PAGES:
            path = path.format(**dates)
            client.get(path).raise_for_status()  # warm-up
            timings = []
            for _ in range(repeat):
                t0 = time.perf_counter()
                response = client.get(path)
                timings.append((time.perf_counter() - t0) * 1000)
                response.raise_for_status()
            ms = statistics.median(timings)
            print(f"page {label:<34}{ms:>9.1f} ms {len(response.content):>9,} bytes", flush=True)
            rows.append(f"| {label} (`{path}`) | {ms:.1f} | {len(response.content):,} |")
    return rows


if __name__ == "__main__":
    main()
