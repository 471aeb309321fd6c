"""Side by side: tokenmeter, OpenTelemetry's and Langfuse's OpenAI instrumentation, the naive
tracker and the bare client, against the same loopback sandbox.

    .venv/bin/python bench/peers.py                       # 5 rounds, 600 chat + 200 streamed
    .venv/bin/python bench/peers.py --rounds 3 --results bench/RESULTS.md

Each tool runs in a process of its own (the sandbox in another), in a rotating order over
``--rounds`` rounds.  In its process the tool is switched off and on between blocks of calls
(:class:`PatchToggle` restores the ``openai`` package's own methods), so the bare client and the
tool are timed alternately under the same conditions: overheads are ratios to the bare client of
the same process (the machine is noisy; ratios travel better than microseconds).  Then (first
round) a fixed suite of mixed calls (chat, cached prompt, streams with and without
``include_usage``, reasoning model, Responses plain and streamed, embeddings, dall-e-2 and
gpt-image-1 with ``n`` = 2, the async client) whose captured numbers are compared with what the
sandbox billed for exactly those requests.

Peers (``pip install -e '.[bench]'``): opentelemetry-instrumentation-openai with an in-memory
span exporter; Langfuse's drop-in ``langfuse.openai`` client exporting to a loopback OTLP sink in
the same process (no network); bench/naive_tracker.py.  A peer that is not installed is skipped
with a note.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tokenmeter.sandbox.ground_truth import BilledRequest  # noqa: E402

MODES = ("tokenmeter", "opentelemetry", "langfuse", "naive")
CATEGORIES = (
    "input_tokens",
    "cached_input_tokens",
    "output_tokens",
    "reasoning_tokens",
    "image_count",
)
MARKER = "PEERS-PRIVATE-PROMPT-7f3a"  # in every suite prompt: does a tool keep prompt text?
LONG = "Catalogue of handmade gifts, materials, prices and shipping rules. " * 80


# -- the tools, one adapter each (run in the child process) ----------------------------------
class Patches:
    """Attributes a tool patched, each (class, name, the tool's value, the original one):
    ``on()`` puts the tool's values in, ``off()`` the originals."""

    def __init__(self, changed: list[tuple[Any, str, Any, Any]]) -> None:
        self.changed = changed

    def on(self) -> None:
        for cls, attr, tool, _ in self.changed:
            setattr(cls, attr, tool)

    def off(self) -> None:
        for cls, attr, _, bare in self.changed:
            setattr(cls, attr, bare)


class PatchToggle(Patches):
    """Turns a third-party instrumentation of the ``openai`` package off and on again.

    Snapshots the attributes of every class in the loaded ``openai`` modules before the tool
    patches them and after; ``off()`` puts the originals back, ``on()`` the tool's versions.
    (Instrumentors' own ``uninstrument()`` is not reliable here: OpenTelemetry's, toggled a
    few times, stacks its wrappers.)
    """

    def __init__(self) -> None:
        from openai import AsyncOpenAI, OpenAI

        for client in (OpenAI(api_key="x"), AsyncOpenAI(api_key="x")):  # load lazy modules
            for resource in ("chat", "responses", "embeddings", "images", "completions"):
                getattr(client, resource)
            _ = client.chat.completions
        self.before = self._snapshot()
        super().__init__([])

    @staticmethod
    def _snapshot() -> dict[tuple[Any, str], Any]:
        import inspect

        state: dict[tuple[Any, str], Any] = {}
        for name, module in list(sys.modules.items()):
            if name != "openai" and not name.startswith("openai."):
                continue
            for _, cls in inspect.getmembers(module, inspect.isclass):
                for attr, value in list(vars(cls).items()):
                    state[(cls, attr)] = value
        return state

    def patched(self) -> None:
        """Call once the tool has patched the package."""
        after = self._snapshot()
        self.changed = [
            (cls, attr, value, self.before[(cls, attr)])
            for (cls, attr), value in after.items()
            if (cls, attr) in self.before and self.before[(cls, attr)] is not value
        ]  # (classes the tool loaded itself are not on the path of the calls timed here)
        if not self.changed:
            raise RuntimeError("the tool patched nothing that could be toggled")


class Adapter:
    """A way of calling OpenAI plus what it captured: ``captured()`` sums per category."""

    name = "bare"
    computes_cost = False

    def __init__(self, base_url: str) -> None:
        from openai import AsyncOpenAI, OpenAI

        self.client: Any = OpenAI(base_url=base_url, api_key="sk-sandbox", max_retries=0)
        self.aclient_factory: Callable[[], Any] = lambda: AsyncOpenAI(
            base_url=base_url, api_key="sk-sandbox", max_retries=0
        )

    def call(self, model: str, fn: Callable[[], Any]) -> Any:
        return fn()

    def enable(self) -> None:
        """Turn the tool on (it starts on)."""

    def disable(self) -> None:
        """Turn it off, so the same process can time the bare client in between."""

    @contextmanager
    def session(self) -> Iterator[None]:
        yield

    def settle(self) -> None:
        """Finish the work a batch of calls left behind (a background export, say)."""

    def reset(self) -> None:
        pass

    def captured(self) -> dict[str, Any]:
        return {}

    def kept_text(self) -> bool | None:
        return None


class Tokenmeter(Adapter):
    name = "tokenmeter"
    computes_cost = True

    def __init__(self, base_url: str) -> None:
        from tokenmeter import openai_hooks
        from tokenmeter.context import CallRecord, UsageScope, set_sink

        self.records: list[CallRecord] = []
        records = self.records

        class MemorySink:
            def scope_closed(self, scope: UsageScope) -> None:
                records.extend(scope.all_calls())

            def unscoped_call(self, call: CallRecord) -> None:
                records.append(call)

        set_sink(MemorySink())
        self.enable = openai_hooks.instrument  # type: ignore[method-assign,assignment]
        self.disable = openai_hooks.uninstrument  # type: ignore[method-assign]
        self.enable()
        super().__init__(base_url)

    @contextmanager
    def session(self) -> Iterator[None]:
        from tokenmeter.context import usage_scope

        with usage_scope("bench", "peers"):
            yield

    def reset(self) -> None:
        self.records.clear()

    def captured(self) -> dict[str, Any]:
        out: dict[str, Any] = {c: sum(getattr(r, c) for r in self.records) for c in CATEGORIES}
        out["cost_usd"] = sum((r.cost_usd or Decimal(0) for r in self.records), Decimal(0))
        return out

    def kept_text(self) -> bool:
        return any(MARKER in repr(r) for r in self.records)


class OpenTelemetry(Adapter):
    name = "opentelemetry"

    def __init__(self, base_url: str) -> None:
        from opentelemetry.instrumentation.openai import OpenAIInstrumentor
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        super().__init__(base_url)
        self.toggle = PatchToggle()
        OpenAIInstrumentor().instrument(tracer_provider=self.provider)
        self.toggle.patched()
        self.enable, self.disable = self.toggle.on, self.toggle.off  # type: ignore[method-assign]

    def reset(self) -> None:
        self.exporter.clear()

    def _attributes(self) -> list[dict[str, Any]]:
        return [dict(s.attributes or {}) for s in self.exporter.get_finished_spans()]

    def captured(self) -> dict[str, Any]:
        return _sum_genai([a for a in self._attributes() if "gen_ai.request.model" in a])

    def kept_text(self) -> bool:
        return any(MARKER in str(v) for a in self._attributes() for v in a.values())


class OTLPSink:
    """A loopback OTLP/HTTP endpoint: keeps the spans it is sent, answers 200 to anything."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )

        self.spans: list[dict[str, Any]] = []
        self.raw = bytearray()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                sink.raw += body
                if self.path.endswith("/v1/traces"):
                    request = ExportTraceServiceRequest()
                    request.ParseFromString(body)
                    for resource in request.resource_spans:
                        for scope in resource.scope_spans:
                            for span in scope.spans:
                                sink.spans.append(
                                    {kv.key: _any_value(kv.value) for kv in span.attributes}
                                )
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            do_GET = do_POST

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"


def _any_value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


class Langfuse(Adapter):
    name = "langfuse"

    def __init__(self, base_url: str) -> None:
        self.sink = OTLPSink()
        os.environ.update(
            {
                "LANGFUSE_PUBLIC_KEY": "pk-lf-bench",
                "LANGFUSE_SECRET_KEY": "sk-lf-bench",
                "LANGFUSE_BASE_URL": self.sink.url,
            }
        )
        toggle = PatchToggle()
        from langfuse import Langfuse as Client
        from langfuse.openai import AsyncOpenAI, OpenAI

        toggle.patched()
        self.enable, self.disable = toggle.on, toggle.off  # type: ignore[method-assign]
        self.langfuse = Client()
        self.client = OpenAI(base_url=base_url, api_key="sk-sandbox", max_retries=0)
        self.aclient_factory = lambda: AsyncOpenAI(
            base_url=base_url, api_key="sk-sandbox", max_retries=0
        )

    def settle(self) -> None:
        self.langfuse.flush()

    def reset(self) -> None:
        self.langfuse.flush()
        self.sink.spans.clear()
        self.sink.raw.clear()

    def captured(self) -> dict[str, Any]:
        self.langfuse.flush()
        out = dict.fromkeys(CATEGORIES, 0)
        for attributes in self.sink.spans:
            raw = attributes.get("langfuse.observation.usage_details")
            if not raw:
                continue
            usage = json.loads(raw)
            details_in = usage.get("prompt_tokens_details") or usage.get("input_tokens_details")
            details_out = usage.get("completion_tokens_details") or usage.get(
                "output_tokens_details"
            )
            out["input_tokens"] += (
                usage.get("prompt_tokens") or usage.get("input_tokens") or (usage.get("input") or 0)
            )
            out["output_tokens"] += usage.get("completion_tokens") or usage.get("output_tokens", 0)
            out["cached_input_tokens"] += (details_in or {}).get("cached_tokens", 0)
            out["reasoning_tokens"] += (details_out or {}).get("reasoning_tokens", 0)
        return out

    def kept_text(self) -> bool:
        self.langfuse.flush()
        return MARKER.encode() in bytes(self.sink.raw)


class Naive(Adapter):
    name = "naive"
    computes_cost = True

    enabled = True

    def call(self, model: str, fn: Callable[[], Any]) -> Any:
        from bench.naive_tracker import track_usage

        return track_usage(model)(fn)() if self.enabled else fn()

    def enable(self) -> None:
        self.enabled = True

    def disable(self) -> None:
        self.enabled = False

    def reset(self) -> None:
        from bench import naive_tracker

        naive_tracker.HISTORY.clear()

    def captured(self) -> dict[str, Any]:
        from bench import naive_tracker

        return {"cached_input_tokens": 0, "reasoning_tokens": 0, **naive_tracker.totals()}

    def kept_text(self) -> bool:
        from bench import naive_tracker

        return MARKER in repr(naive_tracker.HISTORY)


ADAPTERS: dict[str, type[Adapter]] = {
    "tokenmeter": Tokenmeter,
    "opentelemetry": OpenTelemetry,
    "langfuse": Langfuse,
    "naive": Naive,
}


def _sum_genai(spans: list[dict[str, Any]]) -> dict[str, Any]:
    """Token totals from OpenTelemetry GenAI span attributes (old and new names)."""

    def first(a: dict[str, Any], *names: str) -> int:
        return next((int(a[n]) for n in names if a.get(n) is not None), 0)

    out = dict.fromkeys(CATEGORIES, 0)
    for a in spans:
        out["input_tokens"] += first(a, "gen_ai.usage.input_tokens", "gen_ai.usage.prompt_tokens")
        out["output_tokens"] += first(
            a, "gen_ai.usage.output_tokens", "gen_ai.usage.completion_tokens"
        )
        out["cached_input_tokens"] += first(
            a, "gen_ai.usage.cache_read_input_tokens", "gen_ai.usage.cache_read.input_tokens"
        )
        out["reasoning_tokens"] += first(
            a, "gen_ai.usage.reasoning_tokens", "llm.usage.reasoning_tokens"
        )
    return out


# -- the workload (child) ------------------------------------------------------------------------
def _consume(stream: Any) -> Any:
    for _ in stream:
        pass
    return stream


def measure(tool: Adapter, n: int, block: int, stream: bool) -> dict[str, float]:
    """``n`` chat calls with the tool and ``n`` without, alternating in blocks in this process.

    Returns the median wall seconds per call and the CPU seconds per call of this process (all
    its threads, so a background exporter counts) for ``bare`` and ``tool``.  Alternating
    blocks in one process cancels the drift of a shared machine, which separate processes
    measured one after the other do not.
    """
    messages = [{"role": "user", "content": "hi"}]
    create = tool.client.chat.completions.create

    def fn() -> Any:
        if stream:
            return _consume(create(model="gpt-4o-mini", messages=messages, stream=True))
        return create(model="gpt-4o-mini", messages=messages)

    times: dict[str, list[float]] = {"bare": [], "tool": []}
    cpu = {"bare": 0.0, "tool": 0.0}
    with tool.session():
        while len(times["tool"]) < n:
            for side in ("bare", "tool"):
                tool.enable() if side == "tool" else tool.disable()
                cpu_started = time.process_time()
                for _ in range(min(block, n - len(times[side]))):
                    started = time.perf_counter()
                    tool.call("gpt-4o-mini", fn)
                    times[side].append(time.perf_counter() - started)
                if side == "tool":
                    tool.settle()  # its export CPU is the tool's, not the next bare block's
                cpu[side] += time.process_time() - cpu_started
    tool.enable()
    return {
        f"{side}_{unit}": (statistics.median(times[side]) if unit == "s" else cpu[side] / n)
        for side in ("bare", "tool")
        for unit in ("s", "cpu")
    }


def suite(tool: Adapter) -> None:
    """The mixed calls every tool is judged on."""
    c = tool.client
    prompt = f"{MARKER} Suggest a handmade gift for a gardener."

    def chat(model: str, content: str, **kw: Any) -> Callable[[], Any]:
        return lambda: c.chat.completions.create(
            model=model, messages=[{"role": "user", "content": content}], **kw
        )

    def stream(**kw: Any) -> Callable[[], Any]:
        return lambda: _consume(
            c.chat.completions.create(
                model="gpt-4o-mini",
                messages=[{"role": "user", "content": prompt}],
                stream=True,
                **kw,
            )
        )

    async def async_chat() -> Any:
        async with tool.aclient_factory() as ac:
            return await ac.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": prompt}]
            )

    def responses_stream() -> Any:
        return _consume(c.responses.create(model="gpt-4.1-mini", input=prompt, stream=True))

    calls: list[tuple[str, Callable[[], Any]]] = [
        ("gpt-4o-mini", chat("gpt-4o-mini", prompt)),
        ("gpt-4o-mini", chat("gpt-4o-mini", LONG + prompt)),
        ("gpt-4o-mini", chat("gpt-4o-mini", LONG + prompt + " Again.")),  # cached prefix
        ("gpt-4o-mini", stream(stream_options={"include_usage": True})),
        ("gpt-4o-mini", stream()),  # no include_usage: the provider sends no usage unless asked
        ("o3-mini", chat("o3-mini", prompt)),
        ("gpt-4.1-mini", lambda: c.responses.create(model="gpt-4.1-mini", input=prompt)),
        ("gpt-4.1-mini", responses_stream),
        (
            "text-embedding-3-small",
            lambda: c.embeddings.create(model="text-embedding-3-small", input=[prompt, "wool"]),
        ),
        (
            "dall-e-2",
            lambda: c.images.generate(model="dall-e-2", prompt=prompt, n=2, size="512x512"),
        ),
        (
            "gpt-image-1",
            lambda: c.images.generate(model="gpt-image-1", prompt=prompt, n=2, quality="low"),
        ),
        ("gpt-4o-mini", lambda: asyncio.run(async_chat())),
    ]
    with tool.session():
        for model, fn in calls:
            tool.call(model, fn)


def _ledger(base_url: str) -> list[BilledRequest]:
    """What the sandbox has billed so far (``GET /_sandbox/ledger``)."""
    root = base_url.removesuffix("/v1")
    with urllib.request.urlopen(f"{root}/_sandbox/ledger") as response:
        return [BilledRequest.from_json(row) for row in json.load(response)]


def child(args: argparse.Namespace) -> None:
    tool = ADAPTERS[args.mode](args.base_url)
    measure(tool, 50, 25, stream=False)  # warm up both paths
    measure(tool, 20, 10, stream=True)
    result: dict[str, Any] = {
        "mode": args.mode,
        "chat": measure(tool, args.calls, args.block, stream=False),
        "stream": measure(tool, args.stream_calls, args.block, stream=True),
    }
    if args.suite:
        tool.reset()
        before = {r.request_id for r in _ledger(args.base_url)}
        suite(tool)
        new = sorted({r.request_id for r in _ledger(args.base_url)} - before)
        result["request_ids"] = new
        result["captured"] = {k: str(v) for k, v in tool.captured().items()}
        result["kept_text"] = tool.kept_text()
    print("RESULT " + json.dumps(result), flush=True)


# -- the comparison (parent) ---------------------------------------------------------------------
def truth_of(base_url: str, request_ids: list[str]) -> dict[str, Any]:
    wanted = set(request_ids)
    rows = [r for r in _ledger(base_url) if r.request_id in wanted]

    out: dict[str, Any] = {c: sum(getattr(r, c) for r in rows) for c in CATEGORIES}
    # what the provider charged: the sandbox's own price list, not tokenmeter's
    out["cost_usd"] = sum((r.cost_usd or Decimal(0) for r in rows), Decimal(0))
    out["requests"] = len(rows)
    return out


def available(mode: str) -> str | None:
    """None if ``mode`` can run here, else why not."""
    needs = {"opentelemetry": "opentelemetry.instrumentation.openai", "langfuse": "langfuse"}
    if mode in needs:
        import importlib.util

        if importlib.util.find_spec(needs[mode].split(".")[0]) is None or (
            mode == "opentelemetry" and importlib.util.find_spec(needs[mode]) is None
        ):
            return f"{needs[mode]} is not installed (pip install -e '.[bench]')"
    return None


def run_child(mode: str, base_url: str, args: argparse.Namespace, with_suite: bool) -> dict:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        mode,
        "--base-url",
        base_url,
        "--calls",
        str(args.calls),
        "--stream-calls",
        str(args.stream_calls),
        "--block",
        str(args.block),
    ] + (["--suite"] if with_suite else [])
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line.removeprefix("RESULT "))
    raise RuntimeError(f"{mode} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")


def accuracy_cell(captured: str | None, truth: Any) -> str:
    if captured is None:
        return "-"
    value = Decimal(captured)
    if value == truth:
        return "exact"
    if truth == 0:
        return f"{value:,} (billed 0)"
    return f"{value / Decimal(truth):.0%}"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=600, help="timed chat calls per round")
    parser.add_argument("--stream-calls", type=int, default=200, help="timed streamed calls")
    parser.add_argument("--block", type=int, default=50, help="calls per alternating block")
    parser.add_argument("--results", type=Path, help="write the Markdown report here")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--base-url", help=argparse.SUPPRESS)
    parser.add_argument("--suite", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.mode = args.child
        child(args)
        return 0
    if min(args.rounds, args.calls, args.stream_calls, args.block) < 1:
        parser.error("--rounds, --calls, --stream-calls and --block must be positive")

    from bench.overhead import start_sandbox
    from bench.results import write_section

    modes = [m for m in MODES if available(m) is None]
    for m in MODES:
        if (why := available(m)) is not None:
            print(f"skipping {m}: {why}")
    proc, base_url = start_sandbox()
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    try:
        for r in range(args.rounds):
            order = modes[r % len(modes) :] + modes[: r % len(modes)]
            for mode in order:
                res = run_child(mode, base_url, args, with_suite=(r == 0))
                runs[mode].append(res)
                c, st = res["chat"], res["stream"]
                print(
                    f"round {r + 1}/{args.rounds} {mode:<14} chat {c['bare_s'] * 1e6:5.0f} -> "
                    f"{c['tool_s'] * 1e6:5.0f} us, stream {st['bare_s'] * 1e6:5.0f} -> "
                    f"{st['tool_s'] * 1e6:5.0f} us (bare -> with the tool, median wall)",
                    flush=True,
                )
        truths = {m: truth_of(base_url, runs[m][0]["request_ids"]) for m in modes}
    finally:
        proc.terminate()
        proc.wait(timeout=10)

    report = render(args, modes, runs, truths)
    print("\n" + report)
    if args.results:
        write_section(args.results, "peers", report)
        print(f"written to {args.results}")
    return 0


def _median(runs: list[dict[str, Any]], kind: str, key: str) -> float:
    return statistics.median(r[kind][key] for r in runs)


def _ratio(runs: list[dict[str, Any]], kind: str, unit: str) -> float:
    """Median over the rounds of tool / bare, both measured in the same process."""
    return statistics.median(r[kind][f"tool_{unit}"] / r[kind][f"bare_{unit}"] for r in runs)


def render(
    args: argparse.Namespace,
    modes: list[str],
    runs: dict[str, list[dict[str, Any]]],
    truths: dict[str, dict[str, Any]],
) -> str:
    lines = [
        "### Per-call overhead",
        "",
        f"`{_command(args)}`: per tool, a process of its own that times {args.calls} chat and "
        f"{args.stream_calls} streamed calls with the tool on and as many with it off, "
        f"alternating in blocks of {args.block}; {args.rounds} rounds, tools in rotating order; "
        "the sandbox in another process. *Wall*: median call time; *CPU*: the calling "
        "process's CPU time per call, all threads, including a background exporter's flush at "
        "the end of each block. Ratios: tool / bare in the same process, median over the "
        "rounds.",
        "",
        "| tool | chat wall | ratio | overhead | chat CPU ratio | stream wall | ratio | overhead "
        "| stream CPU ratio |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    every = [r for m in modes for r in runs[m]]
    bare = {kind: _median(every, kind, "bare_s") * 1e6 for kind in ("chat", "stream")}
    lines.append(
        f"| bare client | {bare['chat']:,.0f} us | 1 | | 1 | {bare['stream']:,.0f} us | 1 | | 1 |"
    )
    for mode in modes:
        cells = []
        for kind in ("chat", "stream"):
            tool_us = _median(runs[mode], kind, "tool_s") * 1e6
            over = statistics.median(
                (r[kind]["tool_s"] - r[kind]["bare_s"]) * 1e6 for r in runs[mode]
            )
            cells += [
                f"{tool_us:,.0f} us",
                f"{_ratio(runs[mode], kind, 's'):.3f}",
                f"{over:+,.0f} us",
                f"{_ratio(runs[mode], kind, 'cpu'):.3f}",
            ]
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    truth = truths[modes[0]]
    lines += [
        "",
        "### Accuracy on the same mixed calls (captured / billed; `exact` = equal)",
        "",
        f"{truth['requests']} requests per tool: chat, a cached prompt, streams with and without "
        "`include_usage`, o3-mini, Responses plain and streamed, embeddings, dall-e-2 and "
        "gpt-image-1 with `n` = 2, the async client.  Cost: what the tool itself reports.",
        "",
        "| tool | input | cached input | output | reasoning | images | cost (USD) "
        "| keeps prompt text |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for mode in modes:
        first = runs[mode][0]
        captured, t = first["captured"], truths[mode]
        cells = [accuracy_cell(captured.get(c), t[c]) for c in CATEGORIES]
        cost = (
            accuracy_cell(captured.get("cost_usd"), t["cost_usd"])
            if "cost_usd" in captured
            else "not computed"
        )
        kept = {True: "yes", False: "no", None: "-"}[first["kept_text"]]
        lines.append(f"| {mode} | " + " | ".join([*cells, cost, kept]) + " |")
    billed = ", ".join(f"{c} {truth[c]:,}" for c in CATEGORIES)
    lines += ["", f"Billed by the sandbox (per tool): {billed}, ${truth['cost_usd']}."]
    return "\n".join(lines)


def _command(args: argparse.Namespace) -> str:
    return (
        f".venv/bin/python bench/peers.py --rounds {args.rounds} --calls {args.calls} "
        f"--stream-calls {args.stream_calls} --block {args.block}"
    )


if __name__ == "__main__":
    sys.exit(main())
