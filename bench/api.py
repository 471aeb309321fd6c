"""The usage API under load: /api/usage/summary on a small ledger, served by a real uvicorn.

    .venv/bin/python bench/api.py                       # 31 rows (the demo's size), SQLite
    .venv/bin/python bench/api.py --rows 5000 --requests 3000 --concurrency 20

Seeds a throwaway SQLite ledger, starts ``tokenmeter api`` (one uvicorn process, as a user
runs it) and times, in ONE run: requests one at a time (requests/s, p50, p99), then
``--concurrency`` clients at once (requests/s, p50, p99).  Targets (#17): >= 1,000 requests/s
one at a time, p99 < 50 ms at concurrency 20.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
from sqlalchemy import create_engine  # noqa: E402
from sqlalchemy.orm import Session  # noqa: E402

from bench.env import subprocess_env  # noqa: E402
from models import migrate  # noqa: E402
from tokenmeter import OpenAICall  # noqa: E402

TOKEN = "bench-api-token-0123456789abcdef"
MODELS = ("gpt-4o-mini-2024-07-18", "dall-e-3", "gpt-5-mini-2025-08-07", "o3-mini")


def seed(url: str, rows: int) -> None:
    migrate.upgrade(url)
    now = datetime.now(UTC)
    engine = create_engine(url)
    with Session(engine) as s:
        s.add_all(
            OpenAICall(
                request_id=f"req_{i}",
                operation="image" if i % 4 == 1 else "chat",
                model=MODELS[i % 4],
                task_name=("tasks.commission", "tasks.promotion_scan")[i % 2],
                scope_kind=("pipeline_run", "scanned_post", None)[i % 3],
                scope_ref=str(i % 50),
                input_tokens=100 + i % 900,
                output_tokens=20 + i % 300,
                image_count=1 if i % 4 == 1 else 0,
                cost_usd=Decimal(i % 1000) / Decimal(10**6),
                created_at=now - timedelta(minutes=i * 7 % (6 * 24 * 60)),
            )
            for i in range(rows)
        )
        s.commit()
    engine.dispose()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def sequential(url: str, n: int) -> tuple[float, list[float]]:
    times: list[float] = []
    with httpx.Client(headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        started = time.perf_counter()
        for _ in range(n):
            t = time.perf_counter()
            response = client.get(url)
            times.append(time.perf_counter() - t)
            response.raise_for_status()
        return n / (time.perf_counter() - started), times


def concurrent(url: str, n: int, clients: int) -> tuple[float, list[float]]:
    """``clients`` connections at once, each sending its next request as soon as the last is
    answered (asyncio in one thread: the load generator adds no lock contention of its own)."""
    import asyncio

    times: list[float] = []

    async def one(client: httpx.AsyncClient, count: int) -> None:
        for _ in range(count):
            t = time.perf_counter()
            (await client.get(url)).raise_for_status()
            times.append(time.perf_counter() - t)

    async def run() -> float:
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with httpx.AsyncClient(headers=headers, limits=limits) as client:
            await asyncio.gather(*(one(client, 10) for _ in range(clients)))  # warm up
            times.clear()
            started = time.perf_counter()
            await asyncio.gather(*(one(client, n // clients) for _ in range(clients)))
            return time.perf_counter() - started

    elapsed = asyncio.run(run())
    return len(times) / elapsed, times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=31)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--results", type=Path, help="write the Markdown report here")
    args = parser.parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="tokenmeter-bench-api-"))
    db = f"sqlite:///{folder / 'ledger.sqlite'}"
    seed(db, args.rows)
    port = _free_port()
    env = {**subprocess_env(), "DATABASE_URL": db, "TOKENMETER_API_TOKEN": TOKEN}
    server = subprocess.Popen(
        [sys.executable, "-m", "tokenmeter.reporting.cli", "api", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
    )
    url = f"http://127.0.0.1:{port}/api/usage/summary"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(url, headers={"Authorization": f"Bearer {TOKEN}"}).raise_for_status()
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.1)
        sequential(url, args.warmup)
        rate, times = sequential(url, args.requests)
        crate, ctimes = concurrent(url, args.requests, args.concurrency)
    finally:
        server.terminate()
        server.wait(timeout=10)
    from bench.results import publish

    command = (
        f".venv/bin/python bench/api.py --rows {args.rows} --requests {args.requests} "
        f"--concurrency {args.concurrency}"
    )
    body = "\n".join(
        [
            "### The usage API under load",
            "",
            f"`{command}`: `GET /api/usage/summary` on a {args.rows}-row SQLite ledger, one "
            "`tokenmeter api` process (uvicorn), the load generator on the same machine; one "
            "run, one mode after the other. Targets: >= 1,000 requests/s one at a time, "
            "p99 < 50 ms at concurrency 20.",
            "",
            "| clients | requests/s | p50 ms | p99 ms |",
            "| ---: | ---: | ---: | ---: |",
            f"| 1 | {rate:,.0f} | {statistics.median(times) * 1000:.2f} | "
            f"{_percentile(times, 0.99) * 1000:.2f} |",
            f"| {args.concurrency} | {crate:,.0f} | {statistics.median(ctimes) * 1000:.2f} | "
            f"{_percentile(ctimes, 0.99) * 1000:.2f} |",
        ]
    )
    publish(body, args.results, "api")
    return 0


if __name__ == "__main__":
    sys.exit(main())
