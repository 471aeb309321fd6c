"""Per-call overhead of tokenmeter's capture vs the bare openai client, against the sandbox.

    .venv/bin/python bench/overhead.py              # 2000 calls per mode, interleaved blocks
    .venv/bin/python bench/overhead.py --calls 500 --stream

The sandbox runs in its own process (so it does not share the client's GIL), calls alternate in
blocks between the bare client and the instrumented one (inside a usage scope, priced, with a
sink that keeps nothing), and the medians are compared: overhead in microseconds and as a share
of a bare loopback call.  Target: <= 3 %.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from openai import OpenAI  # noqa: E402

from tokenmeter import openai_hooks  # noqa: E402
from tokenmeter.context import CallRecord, UsageScope, set_sink, usage_scope  # noqa: E402


class NullSink:
    def scope_closed(self, scope: UsageScope) -> None:
        pass

    def unscoped_call(self, call: CallRecord) -> None:
        pass


def start_sandbox() -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tokenmeter.reporting.cli",
            "sandbox",
            "--openai-port",
            "0",
            "--reddit-port",
            "0",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith("OPENAI_BASE_URL="):
            return proc, line.strip().split("=", 1)[1]
    proc.kill()
    raise SystemExit("sandbox did not start")


def one_call(client: OpenAI, stream: bool) -> float:
    started = time.perf_counter()
    if stream:
        for _ in client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True
        ):
            pass
    else:
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )
    return time.perf_counter() - started


def measure(
    client: OpenAI, calls: int, block: int, stream: bool
) -> tuple[list[float], list[float]]:
    bare: list[float] = []
    metered: list[float] = []
    for _ in range(50):  # warm up both paths
        one_call(client, stream)
    while len(bare) < calls:
        openai_hooks.uninstrument()
        bare += [one_call(client, stream) for _ in range(block)]
        openai_hooks.instrument()
        with usage_scope("bench", "overhead"):
            metered += [one_call(client, stream) for _ in range(block)]
    openai_hooks.uninstrument()
    return bare, metered


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000, help="calls per mode")
    parser.add_argument("--block", type=int, default=50, help="calls per interleaved block")
    parser.add_argument("--stream", action="store_true", help="also measure streamed calls")
    args = parser.parse_args()

    set_sink(NullSink())
    proc, base_url = start_sandbox()
    try:
        client = OpenAI(base_url=base_url, api_key="sk-sandbox", max_retries=0)
        modes = [False, True] if args.stream else [False]
        print(f"{args.calls} calls per mode, blocks of {args.block}, sandbox at {base_url}")
        print(f"{'call':<10}{'bare us':>10}{'metered us':>12}{'overhead us':>13}{'ratio':>8}")
        for stream in modes:
            bare, metered = measure(client, args.calls, args.block, stream)
            b, m = statistics.median(bare) * 1e6, statistics.median(metered) * 1e6
            print(
                f"{'stream' if stream else 'chat':<10}{b:>10.0f}{m:>12.0f}{m - b:>13.0f}"
                f"{m / b:>8.3f}"
            )
    finally:
        proc.terminate()
        proc.wait(timeout=10)


if __name__ == "__main__":
    main()
