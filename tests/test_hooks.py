"""Capture: every endpoint and mode of the real openai client, sync and async, over HTTP.

Each test compares what tokenmeter recorded with what the sandbox billed for the same request
ids, category by category, and the cost with the Decimal arithmetic written out by hand.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from decimal import Decimal

import openai
import pytest
from openai import AsyncOpenAI, OpenAI

from tests.helpers import STREAM_DROPPED, CollectingSink
from tokenmeter import maintained, openai_hooks
from tokenmeter.context import UsageScope, usage_scope
from tokenmeter.openai_hooks import track_openai_call
from tokenmeter.sandbox.ground_truth import TOKEN_FIELDS

HI = [{"role": "user", "content": "hi"}]
M = Decimal(1_000_000)


pytestmark = pytest.mark.usefixtures("hooks")  # instrumented, a collecting sink


def assert_matches_ground_truth(scope: UsageScope, sandbox) -> None:
    calls = [c for c in scope.all_calls() if c.status == "ok"]
    assert calls
    for call in calls:
        billed = sandbox.ledger.get(call.request_id)
        assert billed is not None, call
        for name in TOKEN_FIELDS:
            assert getattr(call, name) == getattr(billed, name), (call.operation, name)
        assert call.model == billed.model
        # what the provider charged, from the sandbox's own price list
        assert call.cost_usd == billed.cost_usd, (call.model, call.cost_usd, billed.cost_usd)
    truth = sandbox.ledger.totals([c.request_id for c in calls])
    assert truth["input_tokens"] == scope.totals.input_tokens
    assert truth["output_tokens"] == scope.totals.output_tokens
    assert truth["cached_input_tokens"] == scope.totals.cached_input_tokens
    assert truth["reasoning_tokens"] == scope.totals.reasoning_tokens
    assert truth["image_count"] == scope.totals.image_count


# -- every endpoint, sync -----------------------------------------------------------------------
def test_chat_plain_json_n_and_tools(openai_client: OpenAI, sandbox) -> None:
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {}}}]
    with usage_scope("task", "chat") as scope:
        plain = openai_client.chat.completions.create(model="gpt-4o-mini", messages=HI)
        openai_client.chat.completions.create(
            model="gpt-4o-mini", messages=HI, response_format={"type": "json_object"}
        )
        openai_client.chat.completions.create(model="gpt-4o-mini", messages=HI, n=3)
        openai_client.chat.completions.create(model="gpt-4o", messages=HI, tools=tools)
    assert_matches_ground_truth(scope, sandbox)
    first = scope.all_calls()[0]
    assert first.request_id == plain._request_id
    u = plain.usage
    assert (
        first.cost_usd
        == (
            Decimal(u.prompt_tokens) * Decimal("0.15")
            + Decimal(u.completion_tokens) * Decimal("0.60")
        )
        / M
    )
    assert (first.price_source, first.price_version) == (maintained.source(), "gpt-4o-mini@listed")
    assert first.requested_model == "gpt-4o-mini" and first.model == "gpt-4o-mini-2024-07-18"


def test_cached_and_reasoning_tokens_are_priced_right(openai_client: OpenAI, sandbox) -> None:
    context = "Our shop sells hand-thrown mugs and knitted scarves. " * 100
    with usage_scope("task", "cache") as scope:
        for q in ("one", "two"):
            openai_client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": context + q}]
            )
        reasoning = openai_client.chat.completions.create(model="o3-mini", messages=HI)
    assert_matches_ground_truth(scope, sandbox)
    _, cached_call, o3 = scope.all_calls()
    assert cached_call.cached_input_tokens > 0
    expected = (
        Decimal(cached_call.input_tokens - cached_call.cached_input_tokens) * Decimal("0.15")
        + Decimal(cached_call.cached_input_tokens) * Decimal("0.075")
        + Decimal(cached_call.output_tokens) * Decimal("0.60")
    ) / M
    assert cached_call.cost_usd == expected
    # reasoning is already inside completion_tokens: billed once, as output
    r = reasoning.usage
    assert o3.reasoning_tokens == r.completion_tokens_details.reasoning_tokens > 0
    assert (
        o3.cost_usd
        == (
            Decimal(r.prompt_tokens) * Decimal("1.10")
            + Decimal(r.completion_tokens) * Decimal("4.40")
        )
        / M
    )


def test_responses_embeddings_and_images(openai_client: OpenAI, sandbox) -> None:
    with usage_scope("task", "mixed") as scope:
        resp = openai_client.responses.create(model="o4-mini", input="hello")
        with openai_client.responses.stream(model="gpt-4o", input="hello") as stream:
            for _ in stream:
                pass
        emb = openai_client.embeddings.create(model="text-embedding-3-large", input=["a", "bb"])
        openai_client.images.generate(model="dall-e-2", prompt="fox", n=3, size="512x512")
        openai_client.images.generate(
            model="dall-e-3", prompt="fox", quality="hd", size="1792x1024"
        )
        gi = openai_client.images.generate(model="gpt-image-1", prompt="a fox", n=2, quality="high")
    assert_matches_ground_truth(scope, sandbox)
    r, rs, e, d2, d3, g = scope.all_calls()
    assert (
        r.cost_usd
        == (
            Decimal(resp.usage.input_tokens) * Decimal("1.10")
            + Decimal(resp.usage.output_tokens) * Decimal("4.40")
        )
        / M
    )
    assert rs.stream and rs.operation == "responses" and rs.output_tokens > 0
    assert e.cost_usd == Decimal(emb.usage.prompt_tokens) * Decimal("0.13") / M
    assert (d2.image_count, d2.image_size, d2.cost_usd) == (3, "512x512", 3 * Decimal("0.018"))
    assert (d3.image_quality, d3.image_size, d3.cost_usd) == ("hd", "1792x1024", Decimal("0.12"))
    assert (g.image_count, g.image_quality, g.output_tokens) == (2, "high", 2 * 4160)
    assert (
        g.cost_usd
        == (Decimal(gi.usage.input_tokens) * Decimal("5.00") + Decimal(2 * 4160) * Decimal("40.00"))
        / M
    )


def test_image_edit_bills_image_input_tokens(openai_client: OpenAI, sandbox) -> None:
    """gpt-image-1 edits: the input images are image input tokens, priced at their own rate
    (https://platform.openai.com/docs/pricing, read 2025-08-15: text $5, image $10, output $40
    per 1M tokens)."""
    png = b"\x89PNG\r\n\x1a\n" + b"\0" * 64
    with usage_scope("task", "edit") as scope:
        edited = openai_client.images.edit(
            model="gpt-image-1",
            image=[("a.png", png, "image/png"), ("b.png", png, "image/png")],
            prompt="make it knitted",
            quality="low",
        )
    assert_matches_ground_truth(scope, sandbox)
    (call,) = scope.all_calls()
    details = edited.usage.input_tokens_details
    assert call.input_image_tokens == details.image_tokens == 2 * 323
    assert call.input_tokens == details.text_tokens + details.image_tokens
    assert (
        call.cost_usd
        == (
            Decimal(details.text_tokens) * Decimal("5.00")
            + Decimal(details.image_tokens) * Decimal("10.00")
            + Decimal(272) * Decimal("40.00")
        )
        / M
    )
    assert call.cost_usd == sandbox.ledger.get(call.request_id).cost_usd


def test_raw_and_streaming_response_paths(openai_client: OpenAI, sandbox) -> None:
    with usage_scope("task", "raw") as scope:
        raw = openai_client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=HI
        )
        with openai_client.chat.completions.with_streaming_response.create(
            model="gpt-4o-mini", messages=HI
        ) as streaming:
            parsed = streaming.parse()
    assert raw.parse().usage is not None and parsed.usage is not None
    assert [c.request_id for c in scope.all_calls()] == [
        raw.headers["x-request-id"],
        streaming.headers["x-request-id"],
    ]
    assert_matches_ground_truth(scope, sandbox)


# -- streaming ----------------------------------------------------------------------------------
def _visible(chunks) -> list[dict]:
    return [{k: v for k, v in c.to_dict().items() if k not in ("id", "created")} for c in chunks]


def test_stream_caller_sees_exactly_what_it_would_without_tokenmeter(
    openai_client: OpenAI, sandbox
) -> None:
    kwargs = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "stream me"}],
        "stream": True,
    }
    openai_hooks.uninstrument()
    bare = list(openai_client.chat.completions.create(**kwargs))
    openai_hooks.instrument()
    with usage_scope("task", "stream") as scope:
        metered = list(openai_client.chat.completions.create(**kwargs))
    assert _visible(metered) == _visible(bare)
    assert all(c.usage is None for c in metered)
    [call] = scope.all_calls()
    assert call.stream and call.usage_reported and call.output_tokens > 0
    assert_matches_ground_truth(scope, sandbox)


def test_stream_caller_who_asked_for_usage_gets_the_usage_chunk(openai_client, sandbox) -> None:
    with usage_scope("task", "asked") as scope:
        chunks = list(
            openai_client.chat.completions.create(
                model="gpt-4o-mini",
                messages=HI,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
    assert chunks[-1].usage is not None and chunks[-1].choices == []
    assert scope.totals.output_tokens == chunks[-1].usage.completion_tokens
    assert_matches_ground_truth(scope, sandbox)


def test_abandoned_stream_is_recorded_as_incomplete(openai_client) -> None:
    with usage_scope("task", "abandon") as scope:
        stream = openai_client.chat.completions.create(
            model="gpt-4o-mini", messages=HI, stream=True
        )
        next(iter(stream))
        stream.close()
        stream._iterator.close()
    [call] = scope.all_calls()
    assert call.status == "incomplete" and not call.usage_reported and call.cost_usd is None
    assert scope.totals.cost_usd is None and scope.totals.uncosted_calls == 1


# -- async ---------------------------------------------------------------------------------------
async def test_async_every_endpoint(async_openai_client: AsyncOpenAI, sandbox) -> None:
    c = async_openai_client
    async with usage_scope("task", "async") as scope:
        await c.chat.completions.create(model="gpt-4o-mini", messages=HI)
        stream = await c.chat.completions.create(model="o3-mini", messages=HI, stream=True)
        seen = [chunk async for chunk in stream]
        await c.responses.create(model="gpt-4.1-mini", input="hi")
        async with c.responses.stream(model="gpt-4.1", input="hi") as rstream:
            async for _ in rstream:
                pass
        await c.embeddings.create(model="text-embedding-3-small", input="hi")
        await c.images.generate(model="gpt-image-1", prompt="fox", quality="medium")
        raw = await c.chat.completions.with_raw_response.create(model="gpt-4o", messages=HI)
    assert all(ch.usage is None for ch in seen)
    assert raw.parse().usage is not None
    assert len(scope.all_calls()) == 7
    assert_matches_ground_truth(scope, sandbox)
    assert all(call.cost_usd is not None for call in scope.all_calls())


# -- concurrency --------------------------------------------------------------------------------
def test_200_concurrent_calls_threads_and_asyncio_each_in_own_scope(sandbox) -> None:
    def thread_work(i: int, out: dict[str, UsageScope]) -> None:
        client = OpenAI(base_url=sandbox.openai_base_url, api_key="sk", max_retries=0)
        with usage_scope("task", f"thread-{i}") as scope:
            for n in range(10):
                client.chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": f"t{i} {n}"}]
                )
        out[f"thread-{i}"] = scope

    async def task_work(i: int, client: AsyncOpenAI) -> UsageScope:
        async with usage_scope("task", f"async-{i}") as scope:
            for n in range(2):
                await client.chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": f"a{i} {n}"}]
                )
        return scope

    async def all_tasks() -> list[UsageScope]:
        client = AsyncOpenAI(base_url=sandbox.openai_base_url, api_key="sk", max_retries=0)
        return list(await asyncio.gather(*(task_work(i, client) for i in range(50))))

    scopes: dict[str, UsageScope] = {}
    threads = [
        threading.Thread(target=contextvars.copy_context().run, args=(thread_work, i, scopes))
        for i in range(8)
    ]
    for t in threads:
        t.start()
    async_scopes = asyncio.run(all_tasks())
    for t in threads:
        t.join()
    every = list(scopes.values()) + async_scopes
    assert sum(s.totals.calls for s in every) == 8 * 10 + 50 * 2
    ids = [c.request_id for s in every for c in s.all_calls()]
    assert len(ids) == len(set(ids)) == 180
    for s in every:
        assert all(c.scope_ref == s.ref for c in s.all_calls())
        assert_matches_ground_truth(s, sandbox)


# -- scopes, unscoped, uninstrument ----------------------------------------------------------------
def test_nested_scopes_roll_up_and_unscoped_calls_are_recorded(
    openai_client: OpenAI, hooks: CollectingSink, sandbox
) -> None:
    with usage_scope("task", "scan") as task:
        for post in ("p1", "p2"):
            with usage_scope("scanned_post", post):
                openai_client.chat.completions.create(model="gpt-4o-mini", messages=HI)
    assert task.totals.calls == 2 and [s.totals.calls for s in task.children] == [1, 1]
    assert task.totals.priced_cost_usd == sum(c.totals.priced_cost_usd for c in task.children)
    outside = openai_client.chat.completions.create(model="gpt-4o-mini", messages=HI)
    [unscoped] = hooks.unscoped
    assert unscoped.request_id == outside._request_id and unscoped.scope_kind is None


def test_a_call_is_priced_after_it_returns_and_read_priced(openai_client: OpenAI, sandbox) -> None:
    """A call's price costs its caller nothing: it is recorded unpriced and priced when its
    tree settles (its totals or calls read, a listener that needs the price, the ledger's
    writer), at the price the provider billed, and counted once in every scope above it."""
    with usage_scope("task", "priced-later") as task:
        with usage_scope("scanned_post", "p1") as post:
            first = openai_client.chat.completions.create(model="gpt-4o-mini", messages=HI)
            [captured] = task.recorded_calls()
            assert captured.unpriced and captured.cost_usd is None and captured.price_source is None
            billed = sandbox.ledger.get(first._request_id).cost_usd
            assert billed > 0
            assert post.totals.priced_cost_usd == billed  # reading settles the whole tree
            assert not captured.unpriced and captured.cost_usd == billed
            assert captured.price_source is not None
        second = openai_client.chat.completions.create(model="gpt-4o-mini", messages=HI)
        again = sandbox.ledger.get(second._request_id).cost_usd
        assert [c.cost_usd for c in task.calls] == [again]  # the task's own call, priced
    assert (task.totals.calls, task.totals.cost_usd) == (2, billed + again)
    assert (post.totals.calls, post.totals.cost_usd) == (1, billed)


def test_a_listener_sees_a_call_priced_unless_it_takes_it_unpriced(
    openai_client: OpenAI, sandbox
) -> None:
    from tokenmeter.context import takes_unpriced

    priced: list[tuple[bool, Decimal | None]] = []
    raw: list[tuple[bool, Decimal | None]] = []
    with usage_scope("task", "listened") as task:
        task.listeners.append(takes_unpriced(lambda _, c: raw.append((c.unpriced, c.cost_usd))))
        answer = openai_client.chat.completions.create(model="gpt-4o-mini", messages=HI)
    assert raw == [(True, None)]  # a write-ahead log: its recovery prices the line
    with usage_scope("task", "budgeted") as task:
        task.listeners.append(lambda _, c: priced.append((c.unpriced, c.cost_usd)))
        task.listeners.append(takes_unpriced(lambda _, c: raw.append((c.unpriced, c.cost_usd))))
        second = openai_client.chat.completions.create(model="gpt-4o-mini", messages=HI)
    billed = sandbox.ledger.get(second._request_id).cost_usd
    assert priced == [(False, billed)] and raw[1:] == [(False, billed)]
    assert sandbox.ledger.get(answer._request_id).cost_usd > 0


def test_uninstrument_restores_the_client(openai_client: OpenAI, hooks: CollectingSink) -> None:
    from openai import AsyncStream, Stream
    from openai._base_client import AsyncAPIClient, SyncAPIClient

    openai_hooks.instrument()  # idempotent: still one layer
    wrapped = SyncAPIClient.request
    assert wrapped.__tokenmeter_original__.__qualname__ == "SyncAPIClient.request"
    assert Stream.close.__tokenmeter_original__.__qualname__ == "Stream.close"
    openai_hooks.uninstrument()
    assert not hasattr(SyncAPIClient.request, "__tokenmeter_original__")
    assert not hasattr(AsyncAPIClient.request, "__tokenmeter_original__")
    assert Stream.close.__qualname__ == "Stream.close"
    assert AsyncStream.close.__qualname__ == "AsyncStream.close"
    with usage_scope("task", "bare") as scope:
        openai_client.chat.completions.create(model="gpt-4o-mini", messages=HI)
    assert scope.totals.calls == 0 and hooks.unscoped == []


# -- failures ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fault", "error", "status"),
    [("429", openai.RateLimitError, 429), ("500", openai.InternalServerError, 500)],
)
def test_failed_calls_are_recorded_as_errors(openai_client, fault, error, status) -> None:
    with usage_scope("task", "fail") as scope, pytest.raises(error):
        openai_client.chat.completions.create(
            model="gpt-4o-mini", messages=HI, extra_headers={"X-Sandbox-Fault": fault}
        )
    [call] = scope.all_calls()
    assert (call.status, call.error_type, call.http_status) == ("error", error.__name__, status)
    assert call.request_id and call.input_tokens == 0 and call.cost_usd == 0
    assert call.latency_ms is not None and call.latency_ms > 0


def test_dropped_stream_is_recorded_as_billed_unknown_and_the_client_error_propagates(
    openai_client, sandbox
) -> None:
    received = []
    with usage_scope("task", "drop") as scope, pytest.raises(STREAM_DROPPED) as raised:
        for chunk in openai_client.chat.completions.create(
            model="gpt-4o-mini",
            messages=HI,
            stream=True,
            extra_headers={"X-Sandbox-Fault": "drop"},
        ):
            received.append(chunk)
    [call] = scope.all_calls()
    assert len(received) == 2
    # recorded as the very error the caller got (its type differs across openai 3.x); a stream
    # cut after the provider began answering may have been billed: cost unknown, never $0
    assert (call.status, call.error_type) == ("billed_unknown", type(raised.value).__name__)
    assert call.cost_usd is None and scope.totals.cost_usd is None
    assert call.request_id and call.client_request_id


@pytest.mark.parametrize("tier", ["priority", "flex"])
def test_a_stream_cut_half_way_keeps_the_tier_it_was_served_on(openai_client, tier) -> None:
    """A stream cut after its first chunks may have been billed, on the tier that served it
    (the provider's Usage API counts it there, and an audit by tier looks for it there): its
    row says the tier the chunks named, not none."""
    served = []
    with usage_scope("task", "cut") as scope, pytest.raises(STREAM_DROPPED):
        for chunk in openai_client.chat.completions.create(
            model="gpt-5-mini",
            messages=HI,
            stream=True,
            service_tier=tier,
            extra_headers={"X-Sandbox-Fault": "drop"},
        ):
            served.append(chunk.service_tier)
    [call] = scope.all_calls()
    assert call.status == "billed_unknown" and served and set(served) == {tier}
    assert call.service_tier == tier


def test_missing_or_null_usage_is_flagged_not_guessed(openai_client) -> None:
    with usage_scope("task", "nousage") as scope:
        for fault in ("no-usage", "null-usage"):
            openai_client.chat.completions.create(
                model="gpt-4o-mini", messages=HI, extra_headers={"X-Sandbox-Fault": fault}
            )
    for call in scope.all_calls():
        assert not call.usage_reported and call.input_tokens == call.output_tokens == 0
        assert call.cost_usd is None  # unknown, never 0
    assert scope.totals.cost_usd is None


def test_a_billed_endpoint_the_capture_cannot_read_is_said_once_never_passed_over(
    openai_client: OpenAI, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Audio and video calls are billed but not metered yet: one warning per kind says their
    calls are not in the ledger, and nothing is recorded in their place.  (The sandbox does not
    serve these endpoints and answers them with an error; the warning comes before the request
    is sent, and the caller gets the client's own outcome.)"""
    monkeypatch.setattr(openai_hooks, "_said_unmetered", set())
    caplog.set_level("WARNING", logger="tokenmeter.openai")
    with usage_scope("task", "audio") as scope:
        for _ in range(2):
            with pytest.raises(openai.APIStatusError):
                openai_client.audio.speech.create(model="tts-1", voice="alloy", input="hi")
        with pytest.raises(openai.APIStatusError):
            openai_client.audio.transcriptions.create(
                model="gpt-4o-transcribe", file=("hi.wav", b"RIFF0000WAVE", "audio/wav")
            )
        openai_client.chat.completions.create(model="gpt-4o-mini", messages=HI)
    said = [r.getMessage() for r in caplog.records if "NOT in the ledger" in r.getMessage()]
    assert len(said) == 2, said  # once per kind, however many calls
    assert "text to speech yet (POST /audio/speech)" in said[0]
    assert "audio transcriptions yet (POST /audio/transcriptions)" in said[1]
    assert [c.operation for c in scope.all_calls()] == ["chat"]  # nothing made up for them


# -- the explicit decorator ------------------------------------------------------------------------
def test_track_openai_call_records_once(sandbox) -> None:
    client = OpenAI(base_url=sandbox.openai_base_url, api_key="sk", max_retries=0)

    @track_openai_call(model="gpt-4o-mini", operation="chat")
    def ideas() -> object:
        return client.chat.completions.create(model="gpt-4o-mini", messages=HI)

    with usage_scope("task", "instrumented") as instrumented:
        ideas()
    assert instrumented.totals.calls == 1  # the hook recorded it; the decorator added nothing

    openai_hooks.uninstrument()
    with usage_scope("task", "explicit") as explicit:
        result = ideas()
    [call] = explicit.all_calls()
    assert call.request_id == result._request_id
    assert (call.input_tokens, call.output_tokens) == (
        result.usage.prompt_tokens,
        result.usage.completion_tokens,
    )
    assert_matches_ground_truth(explicit, sandbox)


async def test_track_openai_call_async(sandbox) -> None:
    openai_hooks.uninstrument()
    client = AsyncOpenAI(base_url=sandbox.openai_base_url, api_key="sk", max_retries=0)

    @track_openai_call(operation="embedding")
    async def embed() -> object:
        return await client.embeddings.create(model="text-embedding-3-small", input="hi")

    async with usage_scope("task", "embed") as scope:
        await embed()
    [call] = scope.all_calls()
    assert call.operation == "embedding" and call.input_tokens == 1
    assert call.cost_usd == Decimal("0.02") / M


# -- billing dimensions: the served tier and tool calls -----------------------------------------
def test_the_served_tier_and_web_search_are_priced_as_billed(openai_client, sandbox) -> None:
    """gpt-5 family on default, flex and priority, plain and streamed, and a web search: each
    call's cost equals what the sandbox charged from its own list (billing.py)."""
    with usage_scope("task", "tiers") as scope:
        for tier in ("default", "flex", "priority", "fast"):
            openai_client.chat.completions.create(
                model="gpt-5-mini", messages=HI, service_tier=tier
            )
            for _ in openai_client.chat.completions.create(
                model="gpt-5", messages=HI, service_tier=tier, stream=True
            ):
                pass
        openai_client.responses.create(
            model="gpt-5-mini", input="gift", tools=[{"type": "web_search"}], service_tier="flex"
        )
        with openai_client.responses.stream(
            model="gpt-4.1-mini", input="gift", tools=[{"type": "web_search"}]
        ) as events:
            for _ in events:
                pass
        openai_client.chat.completions.create(
            model="gpt-4o-mini",
            messages=HI,
            service_tier="flex",  # served on default
        )
    assert_matches_ground_truth(scope, sandbox)
    calls = scope.all_calls()
    served = [sandbox.ledger.get(c.request_id).service_tier for c in calls]
    assert [c.service_tier for c in calls] == served
    assert served == ["default", "default", "flex", "flex", "priority", "priority"] * 1 + [
        "priority",
        "priority",
        "flex",
        "default",
        "default",
    ]
    assert [c.web_search_calls for c in calls][-3:] == [1, 1, 0]
    assert scope.totals.web_search_calls == 2


async def test_async_tier_is_priced_as_billed(async_openai_client: AsyncOpenAI, sandbox) -> None:
    async with usage_scope("task", "async-tier") as scope:
        await async_openai_client.chat.completions.create(
            model="gpt-5-nano", messages=HI, service_tier="flex"
        )
        stream = await async_openai_client.chat.completions.create(
            model="gpt-5-mini", messages=HI, service_tier="priority", stream=True
        )
        async for _ in stream:
            pass
    assert_matches_ground_truth(scope, sandbox)
    assert [c.service_tier for c in scope.all_calls()] == ["flex", "priority"]


def test_usage_details_become_their_own_categories() -> None:
    """Every billing dimension the SDK's usage types carry (openai.types.CompletionUsage,
    ResponseUsage): cache writes, audio in and out, image input."""
    from tokenmeter.capture import usage_fields

    chat_usage = {
        "prompt_tokens": 900,
        "completion_tokens": 300,
        "prompt_tokens_details": {
            "cached_tokens": 256,
            "cache_write_tokens": 128,
            "audio_tokens": 64,
            "image_tokens": 32,
        },
        "completion_tokens_details": {"reasoning_tokens": 100, "audio_tokens": 50},
    }
    assert usage_fields("chat", chat_usage) == {
        "input_tokens": 900,
        "output_tokens": 300,
        "cached_input_tokens": 256,
        "cache_write_tokens": 128,
        "input_image_tokens": 32,
        "input_audio_tokens": 64,
        "reasoning_tokens": 100,
        "output_audio_tokens": 50,
        "usage_reported": True,
    }
    responses_usage = {
        "input_tokens": 500,
        "output_tokens": 20,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 384},
        "output_tokens_details": {"reasoning_tokens": 0},
    }
    fields = usage_fields("responses", responses_usage)
    assert fields["cache_write_tokens"] == 384 and fields["input_tokens"] == 500


def test_the_sdks_usage_objects_read_as_their_json() -> None:
    """The SDK's own usage types (read a level at a time) give what their JSON gives; an
    object without one of the fields (an older SDK's) is read name by name, None as 0."""
    from types import SimpleNamespace

    from openai.types import CompletionUsage
    from openai.types.responses import ResponseUsage

    from tokenmeter.capture import usage_fields

    chat = {
        "prompt_tokens": 900,
        "completion_tokens": 300,
        "total_tokens": 1200,
        "prompt_tokens_details": {"cached_tokens": 256, "audio_tokens": 64},
        "completion_tokens_details": {"reasoning_tokens": 100, "audio_tokens": 50},
    }
    responses = {
        "input_tokens": 500,
        "output_tokens": 20,
        "total_tokens": 520,
        "input_tokens_details": {"cached_tokens": 128, "cache_write_tokens": 64},
        "output_tokens_details": {"reasoning_tokens": 7},
    }
    from_object = usage_fields("chat", CompletionUsage.model_validate(chat))
    assert from_object == usage_fields("chat", chat)
    assert (from_object["cached_input_tokens"], from_object["output_audio_tokens"]) == (256, 50)
    from_object = usage_fields("responses", ResponseUsage.model_validate(responses))
    assert from_object == usage_fields("responses", responses)
    assert (from_object["cached_input_tokens"], from_object["reasoning_tokens"]) == (128, 7)
    old = SimpleNamespace(prompt_tokens=40, completion_tokens=2)  # no details at all
    assert usage_fields("chat", old) == usage_fields(
        "chat", {"prompt_tokens": 40, "completion_tokens": 2}
    )
    assert usage_fields("chat", old)["output_tokens"] == 2
    assert usage_fields("chat", SimpleNamespace())["usage_reported"] is False


def test_streamed_image_generation_and_edit_count_their_images(openai_client, sandbox) -> None:
    with usage_scope("task", "image-stream") as scope:
        events = list(
            openai_client.images.generate(
                model="gpt-image-1", prompt="a fox", quality="low", stream=True, partial_images=2
            )
        )
        for _ in openai_client.images.edit(
            model="gpt-image-1",
            image=[("in.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 64, "image/png")],
            prompt="the fox in wool",
            quality="low",
            stream=True,
        ):
            pass
    assert [e.type for e in events] == [
        "image_generation.partial_image",
        "image_generation.partial_image",
        "image_generation.completed",
    ]
    generated, edited = scope.all_calls()
    assert generated.image_count == edited.image_count == 1
    assert (generated.image_size, generated.image_quality) == ("1024x1024", "low")
    assert edited.input_image_tokens == 323  # the sandbox's image input tokens per input image
    assert_matches_ground_truth(scope, sandbox)


def test_a_long_prompt_bills_the_whole_call_at_the_long_context_rate(
    openai_client, sandbox
) -> None:
    """gpt-5.4: $2.50 / $15 per 1M tokens; a prompt of more than 272,000 input tokens is billed
    at 2x input and 1.5x output for the whole request ($5 / $22.50;
    https://developers.openai.com/api/docs/models/gpt-5.4, read 2026-12-01)."""
    with usage_scope("task", "long") as scope:
        # text tokens (the prompt adds 7: 3 + 4 per message); other letters: no cache hit
        for letter, tokens in (("x", 271_990), ("y", 272_010)):
            openai_client.chat.completions.create(
                model="gpt-5.4", messages=[{"role": "user", "content": letter * (4 * tokens)}]
            )
    short, long = scope.all_calls()
    assert short.cached_input_tokens == long.cached_input_tokens == 0
    assert (short.input_tokens, long.input_tokens) == (271_997, 272_017)
    assert (
        short.cost_usd
        == (short.input_tokens * Decimal("2.5") + short.output_tokens * Decimal(15)) / M
    )
    assert (
        long.cost_usd == (long.input_tokens * Decimal(5) + long.output_tokens * Decimal("22.5")) / M
    )
    assert_matches_ground_truth(scope, sandbox)


CATALOGUE = "Catalogue of handmade gifts, one per line: wool foxes, felt owls. " * 80


def test_cache_writes_are_captured_and_priced_as_billed(openai_client, sandbox) -> None:
    """gpt-5.6-sol writes a long prompt to the cache on the first call and reads it on the
    next; it bills writes at 1.25x the uncached input rate ($4 -> $5 per 1M; cached $0.40,
    output $20; flex $2 -> $2.50, priority $8 -> $10;
    https://developers.openai.com/api/docs/guides/prompt-caching, read 2026-12-01).  Chat and
    Responses, plain and streamed, on three tiers."""
    with usage_scope("task", "writes") as scope:
        first = openai_client.chat.completions.create(
            model="gpt-5.6-sol", messages=[{"role": "user", "content": CATALOGUE + " one"}]
        )
        for _ in openai_client.chat.completions.create(
            model="gpt-5.6-sol",
            messages=[{"role": "user", "content": CATALOGUE + " two"}],
            stream=True,
            stream_options={"include_usage": True},
        ):
            pass
        for tier in ("flex", "priority"):
            openai_client.responses.create(
                model="gpt-5.6-sol", input=f"{tier} " + CATALOGUE, service_tier=tier
            )
        with openai_client.responses.stream(
            model="gpt-5.6-sol", input="streamed " + CATALOGUE
        ) as events:
            for _ in events:
                pass
    assert_matches_ground_truth(scope, sandbox)
    calls = scope.all_calls()
    assert first.usage.prompt_tokens_details.cache_write_tokens == calls[0].cache_write_tokens
    write, read = calls[0], calls[1]
    assert write.cache_write_tokens == write.input_tokens // 128 * 128 > 1024
    assert write.cached_input_tokens == 0
    assert read.cached_input_tokens > 1024 and read.cache_write_tokens < 128
    plain = write.input_tokens - write.cache_write_tokens
    assert (
        write.cost_usd == (plain * 4 + write.cache_write_tokens * 5 + write.output_tokens * 20) / M
    )
    flex = calls[2]
    flex_plain = flex.input_tokens - flex.cache_write_tokens - flex.cached_input_tokens
    assert flex.service_tier == "flex" and flex.cache_write_tokens > 0
    assert (
        flex.cost_usd
        == (
            flex_plain * 2
            + flex.cache_write_tokens * Decimal("2.5")
            + flex.cached_input_tokens * Decimal("0.2")
            + flex.output_tokens * 10
        )
        / M
    )
    assert [c.service_tier for c in calls] == ["default", "default", "flex", "priority", "default"]
    assert all(c.cache_write_tokens > 0 for c in calls if c.cached_input_tokens == 0)


async def test_async_cache_writes(async_openai_client: AsyncOpenAI, sandbox) -> None:
    async with usage_scope("task", "async-writes") as scope:
        await async_openai_client.responses.create(model="gpt-5.6-sol", input="async " + CATALOGUE)
        await async_openai_client.chat.completions.create(
            model="gpt-5.6", messages=[{"role": "user", "content": "async " + CATALOGUE}]
        )
    assert_matches_ground_truth(scope, sandbox)
    assert all(c.cache_write_tokens > 1024 for c in scope.all_calls())


def test_an_older_model_bills_no_writes(openai_client, sandbox) -> None:
    """Before the GPT-5.6 family a cache write costs nothing extra: the sandbox reports none
    and bills the prompt as input, and so does the meter."""
    with usage_scope("task", "old-writes") as scope:
        openai_client.chat.completions.create(
            model="gpt-5-mini", messages=[{"role": "user", "content": CATALOGUE}]
        )
        openai_client.responses.create(model="gpt-4.1-mini", input="again " + CATALOGUE)
    assert_matches_ground_truth(scope, sandbox)
    assert [c.cache_write_tokens for c in scope.all_calls()] == [0, 0]


def test_usage_is_read_alike_from_the_sdk_s_objects_and_from_their_json() -> None:
    """usage_fields reads the SDK's usage objects by attribute and JSON (batch output lines,
    raw bodies) as dicts: the same fields either way, details missing or present."""
    from openai.types import CompletionUsage
    from openai.types.responses import ResponseUsage

    from tokenmeter.capture import usage_fields

    chats = [
        CompletionUsage(prompt_tokens=120, completion_tokens=7, total_tokens=127),
        CompletionUsage.model_validate(
            {
                "prompt_tokens": 1200,
                "completion_tokens": 40,
                "total_tokens": 1240,
                "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 3},
                "completion_tokens_details": {"reasoning_tokens": 9, "audio_tokens": 2},
            }
        ),
    ]
    responses = ResponseUsage.model_validate(
        {
            "input_tokens": 50,
            "output_tokens": 20,
            "total_tokens": 70,
            "input_tokens_details": {"cached_tokens": 10, "cache_write_tokens": 4},
            "output_tokens_details": {"reasoning_tokens": 5},
        }
    )
    for operation, usage in [("chat", chats[0]), ("chat", chats[1]), ("responses", responses)]:
        as_json = usage.model_dump()
        assert usage_fields(operation, usage) == usage_fields(operation, as_json)
    assert usage_fields("chat", chats[1])["cached_input_tokens"] == 1024
    assert usage_fields("responses", responses)["reasoning_tokens"] == 5
