"""Streams are recorded once, in their own scope, whatever the caller does with them.

Never iterated, closed early, left at ``finish_reason``, read raw through
``with_streaming_response``, parsed twice, returned from a ``@track_openai_call`` function: each
ends as exactly one record, in the scope it was opened in, before that scope is flushed.  The
sandbox bills a stream in full whatever the client did, so a usage the meter kept is compared
with what was billed.
"""

from __future__ import annotations

import json

import pytest
from openai import AsyncOpenAI, OpenAI

from tests.helpers import STREAM_DROPPED, wait_for
from tokenmeter import openai_hooks
from tokenmeter.context import close_scope, open_scope, usage_scope
from tokenmeter.openai_hooks import track_openai_call

HI = [{"role": "user", "content": "hi"}]


pytestmark = pytest.mark.usefixtures("hooks")  # instrumented, a collecting sink


def billed(sandbox, request_id: str):
    return wait_for(lambda: sandbox.ledger.get(request_id), 10, f"{request_id} billed")


def assert_exact(call, sandbox) -> None:
    truth = billed(sandbox, call.request_id)
    assert call.status == "ok" and call.usage_reported
    assert (call.input_tokens, call.output_tokens) == (truth.input_tokens, truth.output_tokens)
    assert call.cost_usd == truth.cost_usd


def test_a_stream_never_iterated_is_recorded_when_its_scope_closes(openai_client, hooks) -> None:
    scope, token = open_scope("task", "t-1", task_id="t-1", task_name="shop.ideas")
    openai_client.chat.completions.create(model="gpt-4o-mini", messages=HI, stream=True)
    close_scope(scope, token)
    [flushed] = hooks.scopes
    [call] = flushed.all_calls()  # recorded before the flush, with its task
    assert (call.status, call.task_id, call.task_name) == ("incomplete", "t-1", "shop.ideas")
    assert call.cost_usd is None and flushed.totals.cost_usd is None


def test_closing_a_stream_records_it_at_once(openai_client) -> None:
    with usage_scope("task", "close") as scope:
        stream = openai_client.chat.completions.create(
            model="gpt-4o-mini", messages=HI, stream=True
        )
        stream.close()
        assert [c.status for c in scope.all_calls()] == ["incomplete"]
    assert scope.totals.calls == 1  # the scope's end adds nothing


@pytest.mark.parametrize("closing", ["close", "with", "scope end"])
def test_leaving_at_finish_reason_keeps_the_usage(openai_client, sandbox, closing) -> None:
    with usage_scope("task", "finish") as scope:
        stream = openai_client.chat.completions.create(
            model="gpt-4o-mini", messages=HI, stream=True, n=2
        )
        finished = set()
        with stream if closing == "with" else _nothing():
            for chunk in stream:
                assert chunk.usage is None  # the injected usage chunk stays hidden
                finished |= {c.index for c in chunk.choices if c.finish_reason}
                if len(finished) == 2:
                    break
        if closing == "close":
            stream.close()
    [call] = scope.all_calls()
    assert_exact(call, sandbox)
    assert scope.totals.cost_usd == call.cost_usd


def test_leaving_mid_answer_is_incomplete_and_billed_in_full(openai_client, sandbox) -> None:
    with usage_scope("task", "mid") as scope:
        stream = openai_client.chat.completions.create(
            model="gpt-4o-mini", messages=HI, stream=True
        )
        next(iter(stream))
        stream.close()
    [call] = scope.all_calls()
    assert call.status == "incomplete" and call.cost_usd is None
    assert billed(sandbox, call.request_id).output_tokens > 0  # the provider charged it


def test_a_caller_who_reads_on_after_the_scope_gets_every_chunk(openai_client, sandbox) -> None:
    with usage_scope("task", "outer") as outer:
        with usage_scope("post", "p1"):
            stream = openai_client.chat.completions.create(
                model="gpt-4o-mini",
                messages=HI,
                stream=True,
                stream_options={"include_usage": True},
            )
            for chunk in stream:
                if chunk.choices and chunk.choices[0].finish_reason:
                    break
        rest = list(stream)  # the usage chunk read at the post's end is handed on
    assert rest and rest[-1].usage is not None and rest[-1].choices == []
    [call] = outer.all_calls()
    assert call.scope_kind == "post" and call.output_tokens == rest[-1].usage.completion_tokens
    assert_exact(call, sandbox)


async def test_async_stream_closed_at_finish_reason(
    async_openai_client: AsyncOpenAI, sandbox
) -> None:
    async with usage_scope("task", "async-finish") as scope:
        stream = await async_openai_client.chat.completions.create(
            model="gpt-4o-mini", messages=HI, stream=True
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].finish_reason:
                break
        await stream.close()
        never = await async_openai_client.chat.completions.create(
            model="gpt-4o-mini", messages=HI, stream=True
        )
    first, second = scope.all_calls()
    assert_exact(first, sandbox)
    assert (
        second.status == "incomplete"
        and second.request_id == never.response.headers["x-request-id"]
    )


def test_streaming_response_read_as_lines(openai_client: OpenAI, sandbox) -> None:
    with usage_scope("task", "lines") as scope:
        raw = openai_client.chat.completions.with_streaming_response
        with raw.create(model="gpt-4o-mini", messages=HI) as response:
            body = json.loads("".join(response.iter_lines()))
        with raw.create(model="gpt-4o-mini", messages=HI, stream=True) as response:
            lines = list(response.iter_lines())
        with raw.create(model="gpt-4o-mini", messages=HI, stream=True) as response:
            chunks = b"".join(response.iter_bytes())
    plain, streamed, as_bytes = scope.all_calls()
    assert (
        plain.request_id == body["id"] or plain.output_tokens == body["usage"]["completion_tokens"]
    )
    for call in (plain, streamed, as_bytes):
        assert_exact(call, sandbox)
    # the caller sees the SSE it asked for: no usage chunk it did not ask for
    events = [json.loads(x[5:]) for x in lines if x.startswith("data:") and x != "data: [DONE]"]
    assert events and all(e.get("usage") is None for e in events)
    assert b'"usage":{' not in chunks and b"[DONE]" in chunks


def test_parse_twice_and_a_decorated_stream_count_once(openai_client, sandbox) -> None:
    @track_openai_call(model="gpt-4o-mini")
    def ideas():
        return openai_client.chat.completions.create(model="gpt-4o-mini", messages=HI, stream=True)

    with usage_scope("task", "once") as scope:
        raw = openai_client.chat.completions.with_streaming_response
        with raw.create(model="gpt-4o-mini", messages=HI, stream=True) as response:
            assert response.parse() is response.parse()
            list(response.parse())
        with raw.create(model="gpt-4o-mini", messages=HI) as response:
            response.parse()
            response.parse()
        for _ in ideas():
            pass
    calls = scope.all_calls()
    assert len(calls) == 3 and scope.totals.calls == 3
    for call in calls:
        assert_exact(call, sandbox)


def _decorated_stream_without_the_hooks(sandbox):
    """A ``@track_openai_call`` function returning a stream, ``instrument()`` undone."""
    openai_hooks.uninstrument()
    client = OpenAI(base_url=sandbox.openai_base_url, api_key="sk", max_retries=0)

    @track_openai_call(model="gpt-4o-mini")
    def ideas():
        return client.chat.completions.create(
            model="gpt-4o-mini", messages=HI, stream=True, stream_options={"include_usage": True}
        )

    return ideas


def test_a_decorated_stream_without_the_hooks_is_recorded_when_read(sandbox) -> None:
    ideas = _decorated_stream_without_the_hooks(sandbox)
    with usage_scope("task", "explicit") as scope:
        for _ in ideas():
            pass
    [call] = scope.all_calls()
    assert_exact(call, sandbox)


def test_a_decorated_stream_without_the_hooks_left_at_its_finish_keeps_its_usage(
    sandbox,
) -> None:
    """Without ``instrument()``, a watched stream's close still reads the usage still on the
    wire: the first stream watched hooks ``Stream.close`` (once); ``uninstrument()`` takes it
    out again, the SDK's own close restored."""
    from openai import AsyncStream, Stream

    ideas = _decorated_stream_without_the_hooks(sandbox)
    assert not hasattr(Stream.close, "__tokenmeter_original__")
    assert not hasattr(AsyncStream.close, "__tokenmeter_original__")
    with usage_scope("task", "explicit-close") as scope:
        stream = ideas()
        for chunk in stream:
            if any(c.finish_reason for c in chunk.choices):
                break
        stream.close()
        [call] = scope.all_calls()  # recorded by the close, with the usage it drained
    assert_exact(call, sandbox)
    assert Stream.close.__tokenmeter_original__.__qualname__ == "Stream.close"
    openai_hooks.uninstrument()
    assert Stream.close.__qualname__ == "Stream.close"


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


async def test_async_streaming_response_read_as_lines_and_bytes(
    async_openai_client: AsyncOpenAI, sandbox
) -> None:
    async with usage_scope("task", "async-lines") as scope:
        raw = async_openai_client.chat.completions.with_streaming_response
        async with raw.create(model="gpt-4o-mini", messages=HI, stream=True) as response:
            lines = [line async for line in response.iter_lines()]
        async with raw.create(model="gpt-4o-mini", messages=HI) as response:
            body = b"".join([chunk async for chunk in response.iter_bytes()])
    streamed, plain = scope.all_calls()
    for call in (streamed, plain):
        assert_exact(call, sandbox)
    assert not any('"usage":{' in line for line in lines) and json.loads(body)["usage"]


def _freed_without_the_collector(refs_of) -> list[bool]:
    """Are the objects ``refs_of()`` made (and returned weak references to) freed as soon as
    the caller drops them, with the cyclic collector off?"""
    import gc

    gc.collect()
    gc.disable()
    try:
        return [ref() is None for ref in refs_of()]
    finally:
        gc.enable()


def test_a_stream_read_to_its_end_is_freed_when_the_caller_drops_it(openai_client, sandbox) -> None:
    """Watching a stream adds no reference cycle: read to its end (as the SDK frees it
    unwatched), it goes with the caller's last reference, not at the next collection."""
    import weakref

    def refs():
        stream = openai_client.chat.completions.create(
            model="gpt-4o-mini", messages=HI, stream=True
        )
        list(stream)
        return [weakref.ref(stream), weakref.ref(stream.response)]

    with usage_scope("task", "freed") as scope:
        freed = _freed_without_the_collector(refs)
    [call] = scope.all_calls()
    assert_exact(call, sandbox)
    assert freed == [True, True]


async def test_closing_a_watched_async_stream_closes_its_response(
    async_openai_client: AsyncOpenAI,
) -> None:
    async with usage_scope("task", "closed-async") as scope:
        stream = await async_openai_client.chat.completions.create(
            model="gpt-4o-mini", messages=HI, stream=True
        )
        await stream.close()
        assert stream.response.is_closed
    assert [c.status for c in scope.all_calls()] == ["incomplete"]


def test_a_bug_reading_a_chunk_is_logged_and_the_caller_gets_every_chunk(
    openai_client, monkeypatch, caplog
) -> None:
    """A metering bug in the chunk reader never costs the caller a chunk; an interrupt (a
    soft time limit) raised there still reaches the task."""
    from celery.exceptions import SoftTimeLimitExceeded

    from tokenmeter.streams import StreamWatch

    def chunks() -> list[str]:
        stream = openai_client.chat.completions.create(
            model="gpt-4o-mini", messages=HI, stream=True
        )
        return [c.choices[0].delta.content or "" for c in stream if c.choices]

    with usage_scope("task", "reference"):
        expected = chunks()
    assert len(expected) > 1

    def broken(self, item):
        raise RuntimeError("metering bug")

    monkeypatch.setattr(StreamWatch, "see", broken)
    with usage_scope("task", "bug"):
        assert chunks() == expected
    assert "failed to read a stream chunk" in caplog.text

    def interrupted(self, item):
        raise SoftTimeLimitExceeded()

    monkeypatch.setattr(StreamWatch, "see", interrupted)
    with usage_scope("task", "interrupt"), pytest.raises(SoftTimeLimitExceeded):
        chunks()


ASKED = {"include_usage": True}  # the caller asked for the usage chunk: nothing to hide


@pytest.mark.parametrize("asked", [True, False], ids=["asked", "injected"])
@pytest.mark.parametrize("ending", ["read", "close at finish", "scope end at finish", "mid"])
def test_a_one_choice_stream_is_read_at_its_ends(openai_client, sandbox, ending, asked) -> None:
    """A one-choice chat stream is read in full at its first chunk and at the last one given
    to the caller, however long the answer: what it records is what a look at every chunk
    recorded, however the caller leaves it, and an injected usage chunk stays hidden."""
    with usage_scope("task", "asked") as scope:
        stream = openai_client.chat.completions.create(
            model="gpt-4o-mini",
            messages=HI,
            stream=True,
            **({"stream_options": ASKED} if asked else {}),
        )
        given = []
        for chunk in stream:
            given.append(chunk)
            if ending == "mid" and len(given) == 2:
                break
            if ending != "read" and chunk.choices and chunk.choices[0].finish_reason:
                break
        if ending in ("close at finish", "mid"):
            stream.close()
    [call] = scope.all_calls()
    if ending == "mid":
        assert call.status == "incomplete" and call.cost_usd is None
        assert billed(sandbox, call.request_id).output_tokens > 0
        return
    assert_exact(call, sandbox)
    if ending == "read" and asked:
        assert given[-1].usage is not None and given[-1].choices == []  # the caller's own
    if not asked:
        assert all(chunk.usage is None for chunk in given)


@pytest.mark.parametrize("tier", ["priority", "flex"])
def test_a_stream_that_asked_for_its_usage_and_was_cut_keeps_its_tier(openai_client, tier) -> None:
    with usage_scope("task", "asked-cut") as scope, pytest.raises(STREAM_DROPPED):
        for _ in openai_client.chat.completions.create(
            model="gpt-5-mini",
            messages=HI,
            stream=True,
            stream_options=ASKED,
            service_tier=tier,
            extra_headers={"X-Sandbox-Fault": "drop"},
        ):
            pass
    [call] = scope.all_calls()
    assert (call.status, call.service_tier, call.response_model) == (
        "billed_unknown",
        tier,
        "gpt-5-mini-2025-08-07",
    )


@pytest.mark.parametrize("asked", [True, False])
def test_how_many_chunks_of_a_stream_are_looked_at(
    openai_client, sandbox, monkeypatch, asked
) -> None:
    """Reading a chunk costs the caller's thread for every chunk of an answer: a one-choice
    chat stream is read in full twice however long it is, its first chunk and its last (and,
    when its usage chunk was injected, that one too, to hide it)."""
    from tokenmeter.streams import StreamWatch

    looked = []
    see = StreamWatch.see
    monkeypatch.setattr(StreamWatch, "see", lambda self, item: looked.append(1) or see(self, item))
    with usage_scope("task", "chunks") as scope:
        chunks = list(
            openai_client.chat.completions.create(
                model="gpt-4o-mini",
                messages=HI,
                stream=True,
                **({"stream_options": ASKED} if asked else {}),
            )
        )
    [call] = scope.all_calls()
    assert_exact(call, sandbox)
    assert len(chunks) > 3  # a role chunk, content, the finish_reason (and the usage)
    assert len(looked) == (2 if asked else 3)  # (3: and the hidden usage chunk)
    assert all(c.usage is None for c in chunks) if not asked else chunks[-1].usage is not None


async def test_an_async_stream_that_asked_for_its_usage_is_read_at_its_ends(
    async_openai_client: AsyncOpenAI, sandbox
) -> None:
    async with usage_scope("task", "asked-async") as scope:
        read = await async_openai_client.chat.completions.create(
            model="gpt-4o-mini", messages=HI, stream=True, stream_options=ASKED
        )
        given = [chunk async for chunk in read]
        left = await async_openai_client.chat.completions.create(
            model="gpt-4o-mini", messages=HI, stream=True, stream_options=ASKED
        )
        async for chunk in left:
            if chunk.choices and chunk.choices[0].finish_reason:
                break
        await left.close()
    first, second = scope.all_calls()
    assert given[-1].usage is not None
    assert_exact(first, sandbox)
    assert_exact(second, sandbox)


@pytest.mark.parametrize("asked", [True, False], ids=["asked", "injected"])
def test_a_usage_chunk_followed_by_another_chunk_is_kept(openai_client, sandbox, asked) -> None:
    """Reading a stream at its ends must not lose a usage chunk that is not the last one (an
    OpenAI-compatible server or a proxy may send a chunk after it): a chunk with a usage is
    read when it passes."""
    with usage_scope("task", "trailing") as scope:
        chunks = list(
            openai_client.chat.completions.create(
                model="gpt-4o-mini",
                messages=HI,
                stream=True,
                extra_headers={"X-Sandbox-Fault": "trailing-chunk"},
                **({"stream_options": ASKED} if asked else {}),
            )
        )
    assert chunks[-1].usage is None and chunks[-1].choices  # the trailing chunk came last
    [call] = scope.all_calls()
    assert_exact(call, sandbox)


async def test_an_async_usage_chunk_followed_by_another_chunk_is_kept(
    async_openai_client: AsyncOpenAI, sandbox
) -> None:
    async with usage_scope("task", "trailing-async") as scope:
        stream = await async_openai_client.chat.completions.create(
            model="gpt-4o-mini",
            messages=HI,
            stream=True,
            stream_options=ASKED,
            extra_headers={"X-Sandbox-Fault": "trailing-chunk"},
        )
        chunks = [chunk async for chunk in stream]
    assert chunks[-1].usage is None
    [call] = scope.all_calls()
    assert_exact(call, sandbox)
