"""What a call's capture costs in place, against the least any capture of it can cost.

    .venv/bin/python bench/capture_floor.py                  # 8,000 calls a mode, chat + stream
    .venv/bin/python bench/capture_floor.py --calls 2000 --results bench/RESULTS.md

bench/per_task.py times tokenmeter's per-call overhead against a target in microseconds; this
says how much of it any capture would pay on the same machine.  One process, the openai client
on bench/per_task.py's ``httpx.MockTransport`` (its canned chat completion and stream), each
block of calls inside a fresh ``tokenmeter.usage_scope`` (in every mode).  The modes swap the
SDK methods that a capture wraps (``SyncAPIClient.request``, ``._send_request`` and
``._sleep_for_retry``) between blocks, the order rotated every round:

- ``bare``: the SDK's own methods;
- ``pass-through``: a wrapper of ``request`` and one of ``_send_request`` that only call them
  (what wrapping costs);
- ``least capture``: the request wrapper keeps what a ledger row needs from the answer (usage,
  model, service tier, request id; a stream's usage chunk, read through a generator) in a list;
- ``+ attempt ids``: that, plus an ``X-Client-Request-Id`` header on the call's attempt (put in
  the call's headers, as tokenmeter does; a retry's attempt gets its own from the retry hook,
  which an answered call never reaches), by which a row of a request sent and never answered
  is identified;
- ``tokenmeter``: its own hooks (price, scope, totals, the stream's watch).

Per mode: the median over rounds of its block's time per call, and *adds*, the median of its
difference to bare in the same round.  Code run between two SDK calls costs several times
what it costs in a tight loop (caches), so only the in-place figures here compare.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from openai import OpenAI, Stream  # noqa: E402
from openai._base_client import SyncAPIClient  # noqa: E402

from bench.per_task import chat, client  # noqa: E402

#: The SDK methods a mode sets, by name (those it leaves out are the SDK's own).
Methods = dict[str, Callable[..., Any]]
HOOKED = ("request", "_send_request", "_sleep_for_retry")


def least_capture(request: Callable[..., Any], kept: list[tuple[Any, ...]]) -> Callable[..., Any]:
    """A request wrapper that keeps what a ledger row needs from each answer, and no more."""

    def watch(chunks: Iterator[Any], started: float) -> Iterator[Any]:
        usage = None
        for chunk in chunks:
            if chunk.usage is not None:
                usage = chunk.usage
            yield chunk
        kept.append((started, time.perf_counter(), usage))

    def wrapper(self: Any, cast_to: Any, options: Any, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        result = request(self, cast_to, options, *args, **kwargs)
        if isinstance(result, Stream):
            result._iterator = watch(result._iterator, started)
            return result
        answer = (result.usage, result.model, result.service_tier, result._request_id)
        kept.append((started, time.perf_counter(), answer))
        return result

    return wrapper


def tagging(request: Callable[..., Any]) -> Callable[..., Any]:
    """A request wrapper that gives the call's attempt an ``X-Client-Request-Id``."""
    from tokenmeter.capture import new_client_request_id

    def wrapper(self: Any, cast_to: Any, options: Any, *args: Any, **kwargs: Any) -> Any:
        headers = options.headers
        tag = {"X-Client-Request-Id": new_client_request_id()}
        options.headers = {**headers, **tag} if headers else tag
        return request(self, cast_to, options, *args, **kwargs)

    return wrapper


def passing(method: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        return method(self, *args, **kwargs)

    return wrapper


def modes(kept: list[tuple[Any, ...]]) -> dict[str, Methods]:
    import tokenmeter

    tokenmeter.uninstrument()
    sdk = {name: getattr(SyncAPIClient, name) for name in HOOKED}
    tokenmeter.instrument()
    metered = {name: getattr(SyncAPIClient, name) for name in HOOKED}
    tokenmeter.uninstrument()
    least = least_capture(sdk["request"], kept)
    return {
        "bare": sdk,
        "pass-through": {
            **sdk,
            "request": passing(sdk["request"]),
            "_send_request": passing(sdk["_send_request"]),
        },
        "least capture": {**sdk, "request": least},
        "+ attempt ids": {**sdk, "request": tagging(least)},
        "tokenmeter": metered,
    }


def use(methods: Methods) -> None:
    for name, method in methods.items():
        setattr(SyncAPIClient, name, method)


def measure(
    c: OpenAI, by_mode: dict[str, Methods], stream: bool, calls: int, block: int
) -> dict[str, list[float]]:
    """Seconds per call of each round's block, by mode (the modes take turns block by block)."""
    import tokenmeter

    names = list(by_mode)
    timed: dict[str, list[float]] = {name: [] for name in names}
    clock = time.perf_counter
    try:
        for round_no in range(calls // block):
            turn = round_no % len(names)
            for name in names[turn:] + names[:turn]:
                use(by_mode[name])
                with tokenmeter.usage_scope("bench", name):
                    started = clock()
                    for _ in range(block):
                        chat(c, stream)
                    timed[name].append((clock() - started) / block)
    finally:
        use(by_mode["bare"])
    return timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=8000, help="calls per mode and kind")
    parser.add_argument("--block", type=int, default=40, help="calls per block")
    parser.add_argument("--results", type=Path, help="write the Markdown report here")
    args = parser.parse_args()
    if args.calls < args.block or args.block < 1:
        parser.error("--calls must be at least --block, and --block at least 1")

    import logging

    logging.getLogger("tokenmeter").setLevel(logging.WARNING)  # the default sink's line a block
    kept: list[tuple[Any, ...]] = []
    by_mode = modes(kept)
    c = client()
    figures: dict[str, dict[str, list[float]]] = {}
    for kind, stream in (("chat", False), ("stream", True)):
        measure(c, by_mode, stream, len(by_mode) * 20, 20)  # warm up every mode
        figures[kind] = measure(c, by_mode, stream, args.calls, args.block)
        kept.clear()
        print(f"{kind}: done", flush=True)
    report(args, figures)


def report(args: argparse.Namespace, figures: dict[str, dict[str, list[float]]]) -> None:
    def adds(kind: str, name: str) -> float:
        pairs = zip(figures[kind][name], figures[kind]["bare"], strict=True)
        return statistics.median((mine - bare) * 1e6 for mine, bare in pairs)

    rows = []
    for name in figures["chat"]:
        cells = []
        for kind in ("chat", "stream"):
            us = statistics.median(figures[kind][name]) * 1e6
            cells += [f"{us:,.0f}", "" if name == "bare" else f"{adds(kind, name):+,.1f}"]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    command = f".venv/bin/python bench/capture_floor.py --calls {args.calls} --block {args.block}"
    body = "\n".join(
        [
            "### A call's capture in place, against the least any capture costs",
            "",
            f"`{command}`: one process, the openai client on bench/per_task.py's "
            "`httpx.MockTransport`, each block of calls in a fresh `tokenmeter.usage_scope`; "
            "the modes swap the SDK methods a capture wraps between blocks, in turns. "
            "*least capture*: a request wrapper that keeps each answer's usage, model, tier "
            "and request id (a stream's usage chunk, through a generator); *+ attempt ids*: "
            "with an `X-Client-Request-Id` header on the call's attempt. us per call: median "
            "block; "
            "*adds*: median difference to bare in the same round.",
            "",
            "| mode | chat us / call | adds (us) | stream us / call | adds (us) |",
            "| --- | ---: | ---: | ---: | ---: |",
            *rows,
        ]
    )
    from bench.results import publish

    publish(body, args.results, "capture-floor")


if __name__ == "__main__":
    main()
