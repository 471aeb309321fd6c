"""What metering adds to one task and to one call, with the network taken out: one process.

    .venv/bin/python bench/per_task.py                        # 3 rounds, blocks of 50 tasks
    .venv/bin/python bench/per_task.py --rounds 5 --profile tokenmeter

The openai client talks to an ``httpx.MockTransport`` (a canned chat completion and a canned
stream, each with its ``usage``), so only the SDK and the tool are timed.  A Celery task making
two chat calls runs with ``Task.apply()`` (eager) under a Redis broker URL and a PostgreSQL
ledger in a throwaway database, in blocks of tasks, for each mode in turn:

- ``bare``: nothing installed;
- ``tokenmeter``: ``tokenmeter.install(app)`` with its defaults (write-ahead on), once, as
  in a worker (between its blocks its task signal handlers and client hooks are out); each block
  ends with ``tokenmeter.flush()``, so the background writer's database work is inside it
  (the time after the block's last task, waiting for that commit, is also reported alone);
- ``opentelemetry``: the celery and openai instrumentations, a ``BatchSpanProcessor`` with an
  exporter that keeps nothing; each block ends with ``force_flush()``;
- ``naive``: the seed plan's decorator (``bench/naive_tracker.py``).

Modes rotate within every round, so drift on a noisy machine hits them alike; the figure is the
median over rounds of each block's time per task, and "adds" is that minus bare's in the same
round.  The per-call figures are single chat and streamed calls, each in its mode's context (a
tokenmeter scope, an OpenTelemetry span), the modes taking turns call by call (each tool's
patches put in and taken out around its own calls, and every patched attribute set again before
each call of every mode, so that all start from the same emptied method caches): medians per
round of every call's time.
Targets: tokenmeter adds <= 0.5 ms per task and less than OpenTelemetry; <= 30 us per call.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx2 as httpx  # noqa: E402  (the openai SDK 3.x transport)
from celery import Celery  # noqa: E402
from openai import OpenAI  # noqa: E402

from bench.peers import Patches  # noqa: E402
from bench.pg import SERVER_URL as PG_SERVER_URL  # noqa: E402

CHAT = {
    "id": "chatcmpl-bench",
    "object": "chat.completion",
    "created": 1764547200,
    "model": "gpt-4o-mini-2024-07-18",
    "service_tier": "default",
    "system_fingerprint": "fp_bench",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "7", "refusal": None},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ],
    "usage": {
        "prompt_tokens": 1200,
        "completion_tokens": 40,
        "total_tokens": 1240,
        "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
    },
}


def _stream_body() -> bytes:
    base = {k: CHAT[k] for k in ("id", "created", "model", "system_fingerprint")}
    base["object"] = "chat.completion.chunk"
    events = [
        {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
        {**base, "choices": [{"index": 0, "delta": {"content": "7"}}]},
        {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        {**base, "choices": [], "usage": CHAT["usage"]},
    ]
    lines = [f"data: {json.dumps(e)}\n\n" for e in events] + ["data: [DONE]\n\n"]
    return "".join(lines).encode()


CHAT_BODY = json.dumps(CHAT).encode()
STREAM_BODY = _stream_body()


def handler(request: httpx.Request) -> httpx.Response:
    stream = b'"stream":true' in request.content or b'"stream": true' in request.content
    headers = {"x-request-id": f"req_{time.perf_counter_ns()}"}
    if stream:
        headers["content-type"] = "text/event-stream"
        return httpx.Response(200, content=STREAM_BODY, headers=headers)
    headers["content-type"] = "application/json"
    return httpx.Response(200, content=CHAT_BODY, headers=headers)


def client() -> OpenAI:
    return OpenAI(
        api_key="sk-bench",
        base_url="http://openai.invalid/v1",
        max_retries=0,
        http_client=httpx.Client(transport=httpx.MockTransport(handler)),
    )


# -- the tools ------------------------------------------------------------------------------
class Tool:
    name = "bare"

    def on(self) -> None:
        pass

    def off(self) -> None:
        pass

    def settle(self) -> None:
        """Finish the background work of the block (exporters, writers)."""

    @contextmanager
    def call_scope(self) -> Iterator[None]:
        yield

    def calls_on(self) -> None:
        """Between ``on()`` and ``off()``: the tool's patches of the client put back."""

    def calls_off(self) -> None:
        """... and taken out (the next call is another mode's), its context left open."""

    def patched(self) -> list[tuple[Any, str]]:
        """(class, attribute) of each patch ``calls_on`` and ``calls_off`` set."""
        return []


class TokenmeterTool(Tool):
    """Installed once, as a worker is: between its blocks, its task signal handlers and its
    hooks of the client are taken out (the sink, the writer thread and the write-ahead file
    stay, idle), so each block times the steady state, not a fresh installation's start."""

    name = "tokenmeter"

    def __init__(self, app: Celery) -> None:
        self.app = app
        self.hooks = Patches([])
        self.metering: Any = None

    def _task_signals(self) -> list[tuple[Any, str]]:
        return [(s, h) for s, h in self.metering._SIGNALS if h in ("on_prerun", "on_postrun")]

    def on(self) -> None:
        import tokenmeter

        if self.metering is None:
            self.metering = tokenmeter.install(self.app)
            self.hooks = self._hooks()
            return
        for signal, handler in self._task_signals():
            signal.connect(
                getattr(self.metering, handler), weak=False, dispatch_uid=f"tokenmeter.{handler}"
            )
        self.hooks.on()

    def off(self) -> None:
        import tokenmeter

        tokenmeter.flush()
        for signal, handler in self._task_signals():
            signal.disconnect(dispatch_uid=f"tokenmeter.{handler}")
        self.hooks.off()

    def uninstall(self) -> None:
        import tokenmeter

        if self.metering is not None:
            self.on()  # put back what off() took out, for uninstall() to take it all
            tokenmeter.uninstall()
            self.metering = None

    def settle(self) -> None:
        import tokenmeter

        tokenmeter.flush()

    @contextmanager
    def call_scope(self) -> Iterator[None]:
        import tokenmeter

        with tokenmeter.usage_scope("bench", "per-call"):
            yield

    @staticmethod
    def _hooks() -> Patches:
        """tokenmeter's hooks of the client, each with the SDK's own method it wraps."""
        from openai._base_client import AsyncAPIClient, SyncAPIClient

        from tokenmeter import openai_hooks

        return Patches(
            [
                (cls, name, getattr(cls, name), getattr(cls, name).__tokenmeter_original__)
                for cls in (SyncAPIClient, AsyncAPIClient)
                for name in openai_hooks.HOOKED
            ]
        )

    def calls_on(self) -> None:
        self.hooks.on()

    def calls_off(self) -> None:
        self.hooks.off()

    def patched(self) -> list[tuple[Any, str]]:
        return [(cls, name) for cls, name, _, _ in self.hooks.changed]


class OpenTelemetryTool(Tool):
    name = "opentelemetry"

    def __init__(self) -> None:
        from opentelemetry.instrumentation.celery import CeleryInstrumentor
        from opentelemetry.instrumentation.openai import OpenAIInstrumentor

        from bench.otel_discard import discarding_provider

        self.provider = discarding_provider()
        self.celery = CeleryInstrumentor()
        # the openai instrumentor cannot be undone and redone cleanly (its wrappers stay):
        # toggled by swapping the patched attributes, as bench/peers.py does
        from bench.peers import PatchToggle

        self.toggle = PatchToggle()
        OpenAIInstrumentor().instrument(tracer_provider=self.provider)
        self.toggle.patched()
        self.toggle.off()

    def on(self) -> None:
        self.celery.instrument(tracer_provider=self.provider)
        self.toggle.on()

    def off(self) -> None:
        self.provider.force_flush()
        self.toggle.off()
        self.celery.uninstrument()

    def settle(self) -> None:
        self.provider.force_flush()

    @contextmanager
    def call_scope(self) -> Iterator[None]:
        with self.provider.get_tracer("bench").start_as_current_span("bench"):
            yield

    def calls_on(self) -> None:
        self.toggle.on()

    def calls_off(self) -> None:
        self.toggle.off()

    def patched(self) -> list[tuple[Any, str]]:
        return [(cls, name) for cls, name, _, _ in self.toggle.changed]


class NaiveTool(Tool):
    name = "naive"

    def on(self) -> None:
        global _wrap
        from bench.naive_tracker import HISTORY, track_usage

        HISTORY.clear()
        _wrap = track_usage("gpt-4o-mini")

    def off(self) -> None:
        global _wrap
        _wrap = None

    def calls_on(self) -> None:
        self.on()

    def calls_off(self) -> None:
        self.off()


_wrap: Callable[[Any], Any] | None = None


def chat(c: OpenAI, stream: bool = False) -> Any:
    def go() -> Any:
        if stream:
            s = c.chat.completions.create(
                model="gpt-4o-mini",
                messages=[{"role": "user", "content": "rate post"}],
                stream=True,
                stream_options={"include_usage": True},
            )
            for _ in s:
                pass
            return s
        return c.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "rate post"}]
        )

    return (_wrap(go) if _wrap is not None else go)()


# -- the measurement ------------------------------------------------------------------------
def make_app(broker: str) -> tuple[Celery, Any]:
    app = Celery("tokenmeter_per_task", broker=broker, backend="cache+memory://")
    app.conf.update(task_store_eager_result=False)
    c = client()

    @app.task(name="bench.two_calls")
    def two_calls() -> int:
        chat(c)
        chat(c)
        return 2

    return app, two_calls


def time_block(task: Any, n: int, tool: Tool) -> tuple[float, float]:
    """Seconds per task of a block of ``n`` tasks, the tool's background work included; and
    the part of it spent at the end, waiting for that work to finish (``settle``)."""
    clock = time.perf_counter
    started = clock()
    for _ in range(n):
        task.apply()
    settling = clock()
    tool.settle()
    ended = clock()
    return (ended - started) / n, (ended - settling) / n


def time_calls(c: OpenAI, n: int, tools: list[Tool], stream: bool) -> dict[str, list[float]]:
    """``n`` calls of each mode, the modes taking turns call by call (each call in its mode's
    context: a tokenmeter scope, an OpenTelemetry span): seconds per call, by mode.

    Interleaving puts every mode's calls in the same moments of a noisy machine, and each call
    runs with the others' code in between, as calls do in an application.

    Putting a tool's patches in and out sets attributes of the SDK's classes, which empties
    the interpreter's caches of those classes' methods; the next call then pays to fill them
    again (about 6 us a call here), which an application, patched once, never pays.  So every
    mode's call starts from the same state: each attribute any tool patches is set again (to
    what it is) just before every timed call, whichever the mode.  Otherwise a tool whose
    patches are on the client's classes would pay it on every call and bare on none."""
    timed: dict[str, list[float]] = {t.name: [] for t in tools}
    clock = time.perf_counter
    with ExitStack() as contexts:
        for tool in tools:
            tool.on()
            tool.calls_off()
            contexts.enter_context(tool.call_scope())
        patched = {(cls, name) for tool in tools for cls, name in tool.patched()}
        for i in range(n):
            turn = i % len(tools)
            for tool in tools[turn:] + tools[:turn]:
                tool.calls_on()
                for cls, name in patched:  # the same emptied caches for every mode
                    setattr(cls, name, cls.__dict__[name])
                started = clock()
                chat(c, stream)
                elapsed = clock() - started
                tool.calls_off()
                timed[tool.name].append(elapsed)
    for tool in tools:
        tool.calls_on()
        tool.off()
    return timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--block", type=int, default=50, help="tasks (or calls) per block")
    parser.add_argument("--blocks", type=int, default=4, help="blocks per mode per round")
    parser.add_argument(
        "--pg-url",
        default=PG_SERVER_URL,
    )
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379")
    parser.add_argument("--profile", help="cProfile this mode's task blocks instead")
    parser.add_argument("--results", type=Path, help="write the Markdown report here")
    args = parser.parse_args()

    from bench.pg import create_database, drop_database
    from bench.redisdb import claimed_databases

    db_url = create_database(args.pg_url, "tokenmeter_per_task")
    data_dir = Path(f"/tmp/tokenmeter-per-task-{os.getpid()}")
    try:
        with claimed_databases(args.redis_url, 1) as (broker,):
            os.environ.update(
                DATABASE_URL=db_url,
                CELERY_BROKER_URL=broker.url,
                TOKENMETER_DATA_DIR=str(data_dir),
                TOKENMETER_RECOVERY_INTERVAL_S="0",
            )
            from tokenmeter.migrate import upgrade

            upgrade(db_url)
            run(args, broker.url)
    finally:
        drop_database(args.pg_url, db_url)


def run(args: argparse.Namespace, broker: str) -> None:
    import tokenmeter

    tokenmeter.uninstall()
    app, task = make_app(broker)
    tools: list[Tool] = [Tool(), TokenmeterTool(app), OpenTelemetryTool(), NaiveTool()]
    c = client()
    for tool in tools:  # warm up: imports, connections, the ledger's identity
        tool.on()
        time_block(task, 20, tool)
        tool.off()
    time_calls(c, 20, tools, False)
    time_calls(c, 20, tools, True)

    if args.profile:
        import cProfile
        import pstats

        tool = next(t for t in tools if t.name == args.profile)
        tool.on()
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(args.blocks * args.rounds):
            time_block(task, args.block, tool)
        profiler.disable()
        tool.off()
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(
            r"tokenmeter|instrumentation/|celery/app/trace|celery/utils/dispatch", 40
        )
        return

    kinds = ("task", "settle", "chat", "stream")
    figures: dict[str, dict[str, list[float]]] = {k: {t.name: [] for t in tools} for k in kinds}
    for round_no in range(args.rounds):
        order = tools[round_no % len(tools) :] + tools[: round_no % len(tools)]
        per_round: dict[str, dict[str, list[float]]] = {k: {} for k in kinds}
        for _ in range(args.blocks):
            for tool in order:
                tool.on()
                per_task, settle = time_block(task, args.block, tool)
                per_round["task"].setdefault(tool.name, []).append(per_task)
                per_round["settle"].setdefault(tool.name, []).append(settle)
                tool.off()
        for kind, stream in (("chat", False), ("stream", True)):
            per_round[kind] = time_calls(c, args.block * args.blocks, order, stream)
        for kind in kinds:
            for name, values in per_round[kind].items():
                figures[kind][name].append(statistics.median(values))
        print(
            f"round {round_no + 1}: "
            + "  ".join(f"{t.name} {per_round['task'][t.name][-1] * 1e3:.2f} ms" for t in tools),
            flush=True,
        )
    for tool in tools:
        if isinstance(tool, TokenmeterTool):
            tool.uninstall()
    report(args, tools, figures)


def report(
    args: argparse.Namespace, tools: list[Tool], figures: dict[str, dict[str, list[float]]]
) -> None:
    def adds(kind: str, name: str, scale: float) -> float:
        return statistics.median(
            (mine - bare) * scale
            for mine, bare in zip(figures[kind][name], figures[kind]["bare"], strict=True)
        )

    rows = []
    for tool in tools:
        task = statistics.median(figures["task"][tool.name]) * 1e3
        chat_us = statistics.median(figures["chat"][tool.name]) * 1e6
        stream_us = statistics.median(figures["stream"][tool.name]) * 1e6
        if tool.name == "bare":
            rows.append(f"| bare | {task:.2f} | | | {chat_us:,.0f} | | {stream_us:,.0f} | |")
            continue
        settle = statistics.median(figures["settle"][tool.name]) * 1e3
        rows.append(
            f"| {tool.name} | {task:.2f} | {adds('task', tool.name, 1e3):+.2f} | {settle:.2f} "
            f"| {chat_us:,.0f} | {adds('chat', tool.name, 1e6):+,.0f} "
            f"| {stream_us:,.0f} | {adds('stream', tool.name, 1e6):+,.0f} |"
        )
    command = (
        f".venv/bin/python bench/per_task.py --rounds {args.rounds} --block {args.block} "
        f"--blocks {args.blocks}"
    )
    body = "\n".join(
        [
            "### Per task and per call, network taken out",
            "",
            f"`{command}`: one process; the openai client on an `httpx.MockTransport`; a "
            "task of two chat calls run with `Task.apply()` under a Redis broker URL and a "
            "PostgreSQL ledger; blocks include the tool's background work (tokenmeter's "
            "writer, OpenTelemetry's batch exporter). Per task: medians over rounds of each "
            "mode's median block. Per call: single calls in the mode's context (a scope, a "
            "span), the modes taking turns call by call, every patched attribute of the SDK's "
            "classes set again before each call of every mode (the same emptied method caches "
            "for all); medians over rounds of each mode's median call. *adds* = the mode "
            "minus bare in the same round; *last wait*: the "
            "part of a block's time per task spent after its last task, waiting for the "
            "tool's background work (tokenmeter: the writer's one commit of the block's "
            "calls, at the default 0.2 s flush interval; OpenTelemetry: the exporter's "
            "flush), medians like the block's.",
            "",
            "| mode | ms / task | adds (ms) | last wait (ms) | chat us / call | adds (us) "
            "| stream us / call | adds (us) |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
            *rows,
        ]
    )
    from bench.results import publish

    publish(body, args.results, "per-task")


if __name__ == "__main__":
    main()
