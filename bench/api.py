"""The usage API under load: /api/usage/summary on a small ledger, served by a real uvicorn.

    .venv/bin/python bench/api.py                       # 31 rows (the demo's size), SQLite
    .venv/bin/python bench/api.py --rows 5000 --requests 3000 --concurrency 20

Seeds a throwaway SQLite ledger, starts ``tokenmeter api`` (one uvicorn process, as a user
runs it) and times, in ONE run, for the API with its answer cache, without it, and a bare
FastAPI app: requests one at a time and ``--concurrency`` clients at once (requests/s, p50,
p99), each with two load generators on the same 2 cores as the server:

- httpx (Python, as a script or a test polls the API), which itself needs about as much CPU
  per request as the server, so at concurrency it measures the client as much as the server;
- ``wrk`` (C; ``apt-get install wrk``, which ``make bench`` does), which leaves the cores to
  the server: the server's own capacity.  Skipped, and said so, where wrk is not installed.

Targets (#17): >= 1,000 requests/s one at a time, p99 < 50 ms at concurrency 20.
"""

from __future__ import annotations

import argparse
import re
import shutil
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


_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


def _seconds(text: str) -> float:
    """A wrk duration (``812.00us``, ``3.82ms``, ``1.02s``) in seconds."""
    for unit in ("us", "ms", "s", "m"):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * _UNITS[unit]
    raise ValueError(f"not a wrk duration: {text!r}")


def with_wrk(url: str, clients: int, seconds: int) -> tuple[float, float, float] | None:
    """(requests/s, p50 s, p99 s) from ``wrk`` with ``clients`` connections for ``seconds``
    (one load thread), or None where wrk is not installed.  Any non-2xx answer fails."""
    wrk = shutil.which("wrk")
    if wrk is None:
        return None
    command = [wrk, "-t1", f"-c{clients}", f"-d{seconds}s", "--latency"]
    command += ["-H", f"Authorization: Bearer {TOKEN}", url]
    return parse_wrk(subprocess.run(command, capture_output=True, text=True, check=True).stdout)


def parse_wrk(out: str) -> tuple[float, float, float]:
    """(requests/s, p50 s, p99 s) of wrk's ``--latency`` report; failed requests fail."""
    if "Non-2xx" in out or "Socket errors" in out:
        raise SystemExit(f"wrk saw failed requests:\n{out}")
    rate = re.search(r"^Requests/sec:\s+([\d.]+)$", out, re.MULTILINE)
    found = dict(re.findall(r"^\s+(50|99)%\s+(\S+)$", out, re.MULTILINE))
    if rate is None or set(found) != {"50", "99"}:
        raise SystemExit(f"not a wrk --latency report:\n{out}")
    return float(rate.group(1)), _seconds(found["50"]), _seconds(found["99"])


#: A FastAPI app with one sync endpoint that returns at once: what the framework itself costs
#: a request on this machine, measured next to ours.
BARE_APP = """
from fastapi import FastAPI
app = FastAPI()
@app.get("/api/usage/summary")
def summary():
    return {"groups": []}
"""


def serve(db: str, mode: str, folder: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    env = {**subprocess_env(), "DATABASE_URL": db, "TOKENMETER_API_TOKEN": TOKEN}
    if mode == "bare":
        (folder / "bare_app.py").write_text(BARE_APP)
        command = [sys.executable, "-m", "uvicorn", "bare_app:app", "--app-dir", str(folder)]
        command += ["--port", str(port), "--log-level", "warning"]
    else:
        env["TOKENMETER_API_CACHE_S"] = "0" if mode == "no cache" else "1"
        command = [sys.executable, "-m", "tokenmeter.reporting.cli", "api", "--port", str(port)]
    server = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT
    )
    url = f"http://127.0.0.1:{port}/api/usage/summary"
    deadline = time.monotonic() + 30
    while True:
        try:
            httpx.get(url, headers={"Authorization": f"Bearer {TOKEN}"}).raise_for_status()
            return server, url
        except httpx.HTTPError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.terminate()
                raise
            time.sleep(0.1)


MODES = ("tokenmeter (cache 1 s)", "no cache", "bare")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=31)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--wrk-seconds", type=int, default=5, help="each wrk measurement")
    parser.add_argument("--results", type=Path, help="write the Markdown report here")
    args = parser.parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="tokenmeter-bench-api-"))
    db = f"sqlite:///{folder / 'ledger.sqlite'}"
    seed(db, args.rows)
    table = []
    missing_wrk = shutil.which("wrk") is None
    for mode in MODES:  # one server at a time: each has the machine to itself
        server, url = serve(db, mode, folder)
        try:
            sequential(url, args.warmup)
            rate, times = sequential(url, args.requests)
            crate, ctimes = concurrent(url, args.requests, args.concurrency)
            figures: list[tuple[str, int, float, float, float]] = [
                ("httpx", 1, rate, statistics.median(times), _percentile(times, 0.99)),
                (
                    "httpx",
                    args.concurrency,
                    crate,
                    statistics.median(ctimes),
                    _percentile(ctimes, 0.99),
                ),
            ]
            for clients in (1, args.concurrency):
                measured = with_wrk(url, clients, args.wrk_seconds)
                if measured is not None:
                    figures.append(("wrk", clients, *measured))
        finally:
            server.terminate()
            server.wait(timeout=10)
        for load, clients, r, p50, p99 in sorted(figures, key=lambda f: (f[1], f[0])):
            row = (
                f"| {mode} | {load} | {clients} | {r:,.0f} | {p50 * 1000:.2f} | {p99 * 1000:.2f} |"
            )
            print(row, flush=True)
            table.append(row)
    from bench.results import publish

    command = (
        f".venv/bin/python bench/api.py --rows {args.rows} --requests {args.requests} "
        f"--concurrency {args.concurrency}"
    )
    body = "\n".join(
        [
            "### The usage API under load",
            "",
            f"`{command}`: `GET /api/usage/summary` (the same query each time, as a dashboard "
            f"or scraper polls it) on a {args.rows}-row SQLite ledger, one `tokenmeter api` "
            "process (uvicorn) with its answer cache (the default, 1 s) and without it "
            "(`TOKENMETER_API_CACHE_S=0`), and a bare FastAPI app whose one endpoint returns "
            "at once (what the framework costs here); one run, one server after the other. "
            "Two load generators on the same 2 cores as the server: httpx (Python: at "
            f"concurrency it needs about as much CPU as the server), {args.requests:,} "
            f"requests each, and wrk (C: the server's own capacity), {args.wrk_seconds} s "
            "each, one load thread. Targets: >= 1,000 requests/s one at a time, p99 < 50 ms "
            "at concurrency 20."
            + (" wrk was not installed: its rows are missing." if missing_wrk else ""),
            "",
            "| server | load generator | clients | requests/s | p50 ms | p99 ms |",
            "| --- | --- | ---: | ---: | ---: | ---: |",
            *table,
        ]
    )
    publish(body, args.results, "api")
    return 0


if __name__ == "__main__":
    sys.exit(main())
