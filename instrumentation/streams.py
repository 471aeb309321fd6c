"""Streams: usage read from a stream as the caller iterates it, recorded exactly once.

A stream is recorded when it ends, fails, is closed, is garbage-collected, or when the scope it
was opened in closes, whichever comes first, always in the scope it was opened in:

- read to its end: the usage chunk (``include_usage``, injected when the caller did not ask and
  hidden from them) or the Responses API's terminal event;
- the caller stopped reading once the answer was complete (a ``break`` at ``finish_reason``):
  the few events still on the wire are read (at most :data:`MAX_DRAIN_EVENTS`) for the usage,
  and handed to the caller if it reads on;
- closed earlier, or never iterated: ``incomplete``, usage unknown (cost NULL, never $0);
- cut by a transport error: ``billed_unknown`` (the provider bills what it generated).

A chat stream of one choice is read in two places, its first chunk and the last one the caller
was given when it ends, and every chunk between gets one look, for a usage (read as it passes)
and, when the usage chunk was injected, to hide it: its cost hardly grows with the answer.
Other streams are read chunk by chunk.

``with_streaming_response`` bodies are tapped as the caller reads them (``iter_bytes``,
``iter_text``, ``iter_lines``, ``read``) and recorded when the response closes; ``parse()`` any
number of times records once.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import AsyncIterator, Iterator
from operator import attrgetter
from typing import Any

from openai import AsyncStream, Stream

from .capture import (
    BILLED_UNKNOWN,
    ORIGINAL_ATTR,
    PendingCall,
    attribute,
    contain,
    get,
    read_usage,
    record_parsed,
    safe,
    safe_async,
    tool_calls,
)

#: Events read after the caller stopped, looking for the usage of a complete answer.
MAX_DRAIN_EVENTS = 8
WATCHED = "_tokenmeter_watched"
_TERMINAL = frozenset({"response.completed", "response.incomplete", "response.failed"})
_CHUNK_FIELDS = attrgetter("model", "service_tier", "choices", "usage")


class StreamWatch:
    """Reads usage from a stream's items; records the call once."""

    __slots__ = (
        "_unclaimed",
        "ahead",
        "ainner",
        "chat",
        "done",
        "expected",
        "finished",
        "image_quality",
        "image_size",
        "images",
        "inner",
        "last",
        "lazy",
        "model",
        "pending",
        "request_id",
        "service_tier",
        "terminal",
        "tools",
        "usage",
    )

    def __init__(self, pending: PendingCall, request_id: str | None) -> None:
        self.pending = pending
        self.request_id = request_id
        self.usage: Any = None
        self.model: str | None = None
        self.service_tier: str | None = None
        self.tools: dict[str, int] | None = None  # Responses API: billed tool calls
        self.images = 0  # streamed image generation: images completed so far
        self.image_size: str | None = None
        self.image_quality: str | None = None
        self.done = False
        self.terminal = False  # the Responses API said the answer is complete
        #: chat choices that reached their finish_reason (made at the first one)
        self.finished: set[int] | None = None
        n = pending.body.get("n")
        self.expected = max(1, int(n)) if n else 1
        self.chat = pending.operation not in ("responses", "image")  # chunks of choices
        #: read while draining, not yet given to the caller (made by the first drain)
        self.ahead: deque[Any] | None = None
        #: A chat stream of one choice: its first chunk is seen, then only the last one
        #: given to the caller (kept in ``last``, seen when the stream ends, fails, is left or
        #: its scope ends).  The usage chunk ends the stream, its finish_reason is the chunk
        #: before it and every chunk names the model and tier, so a look at the end reads what
        #: a look at every chunk would, at a cost that does not grow with the answer.  When the
        #: usage chunk was injected, each chunk gets a glance for it (to hide it; see
        #: :meth:`glance`).  Several choices and Responses events: every item is seen.
        self.lazy = self.chat and self.expected == 1
        self.last: Any = None  # (lazy) the last item given to the caller, not yet seen
        self.inner: Iterator[Any] | None = None  # a sync stream's own iterator (for draining)
        self.ainner: AsyncIterator[Any] | None = None  # an async stream's own
        #: taken by the one step that records the call (``list.pop`` is atomic: no lock)
        self._unclaimed = [True]
        if pending.scope is not None:
            pending.scope.on_close(self, self.at_scope_end)

    # -- reading -----------------------------------------------------------------------------
    def see(self, item: Any) -> bool:
        """Look at one item; False if it is the injected usage chunk to hide from the caller."""
        if not self.chat:
            return (
                self._see_image(item)
                if self.pending.operation == "image"
                else self._see_event(item)
            )
        try:  # an SDK chunk: read by attribute, the fewest steps (this runs for every chunk)
            model, tier, choices, usage = _CHUNK_FIELDS(item)
            for choice in choices or ():
                if choice.finish_reason:
                    self._finish_choice(choice.index)
        except AttributeError:  # a dict (a raw body's event), an older SDK's chunk
            read = get if isinstance(item, dict) else attribute
            model, tier = read(item, "model"), read(item, "service_tier")
            choices, usage = read(item, "choices"), read(item, "usage")
            for choice in choices or ():
                if get(choice, "finish_reason"):
                    self._finish_choice(get(choice, "index"))
        if model:
            self.model = model
        if tier:
            self.service_tier = tier
        if usage is not None:
            self.usage = usage
            if self.pending.injected_usage and not choices:
                return False
        elif self.pending.injected_usage:
            fields_set = getattr(item, "__pydantic_fields_set__", None)
            if isinstance(fields_set, set):
                fields_set.discard("usage")  # as if the server had never sent the key
        return True

    def glance(self, item: Any) -> bool:
        """(lazy, usage injected) A chat chunk: the usage chunk is seen (and hidden from the
        caller: False); any other is kept as the last, its ``usage`` key unset as if the
        server had never sent it (see :meth:`see`)."""
        if getattr(item, "usage", None) is not None:
            return self.see(item)
        self.last = item
        fields_set = getattr(item, "__pydantic_fields_set__", None)
        if isinstance(fields_set, set):
            fields_set.discard("usage")
        return True

    def catch_up(self) -> None:
        """(lazy) See the last item the caller was given, if it was not seen yet."""
        last = self.last
        if last is not None:
            self.last = None
            self.see(last)

    def _finish_choice(self, index: int | None) -> None:
        if self.finished is None:
            self.finished = set()
        self.finished.add(index or 0)

    def _see_event(self, item: Any) -> bool:
        """A Responses API event: the terminal one carries the response and its usage."""
        response = get(item, "response")
        if get(item, "type") in _TERMINAL and response is not None:
            self.terminal = True
            self.usage, self.model = get(response, "usage"), get(response, "model")
            self.service_tier = get(response, "service_tier")
            self.tools = tool_calls(get(response, "output"))
        return True

    def _see_image(self, item: Any) -> bool:
        """A streamed image generation or edit: each ``*.completed`` event is one image, with
        the token usage of its generation (GPT image models)."""
        if not str(get(item, "type") or "").endswith(".completed"):
            return True
        self.images += 1
        self.image_size, self.image_quality = get(item, "size"), get(item, "quality")
        usage = get(item, "usage")
        if usage is not None:
            total = self.usage or {"input_tokens_details": {}}
            for key in ("input_tokens", "output_tokens"):
                total[key] = total.get(key, 0) + (get(usage, key) or 0)
            for key in ("image_tokens", "text_tokens"):
                got = get(usage, "input_tokens_details", key) or 0
                total["input_tokens_details"][key] = total["input_tokens_details"].get(key, 0) + got
            self.usage = total
        self.terminal = self.images >= self.expected
        return True

    @property
    def answer_complete(self) -> bool:
        if self.pending.operation in ("responses", "image"):
            return self.terminal
        return len(self.finished or ()) >= self.expected

    def _wants_drain(self) -> bool:
        return not self.done and self.usage is None and self.answer_complete

    def drain(self) -> None:
        """The caller stopped after a complete answer: read the usage still on the wire."""
        self.catch_up()
        if self.inner is None or not self._wants_drain():
            return
        for _ in range(MAX_DRAIN_EVENTS):
            try:
                item = next(self.inner)
            except StopIteration:
                return
            if self.see(item):
                self._hold(item)
            if self.usage is not None:
                return

    def _hold(self, item: Any) -> None:
        if self.ahead is None:
            self.ahead = deque()
        self.ahead.append(item)

    async def adrain(self, inner: AsyncIterator[Any] | None) -> None:
        self.catch_up()
        if inner is None or not self._wants_drain():
            return
        for _ in range(MAX_DRAIN_EVENTS):
            try:
                item = await inner.__anext__()
            except StopAsyncIteration:
                return
            if self.see(item):
                self._hold(item)
            if self.usage is not None:
                return

    # -- recording (once) --------------------------------------------------------------------
    def _claim(self) -> bool:
        try:
            self._unclaimed.pop()
        except IndexError:
            return False
        self.done = True
        if self.pending.scope is not None:
            self.pending.scope.discard_on_close(self)
        return True

    def finish(self) -> None:
        self.catch_up()
        if self._claim():
            pending = self.pending
            call = pending.new_call(self.request_id)
            read_usage(call, self.usage)
            call.response_model, call.service_tier = self.model, self.service_tier
            if self.tools:
                for name, count in self.tools.items():
                    setattr(call, name, count)
            if pending.operation == "image":
                call.image_count = self.images
                call.image_size, call.image_quality = self.image_size, self.image_quality
                if not (pending.requested_model or "").startswith("gpt-image"):
                    call.usage_reported = self.images > 0  # dall-e: priced per image
            pending.store(call)

    def fail(self, exc: BaseException) -> None:
        self.catch_up()
        if self.usage is not None:  # the usage arrived before the failure: keep it
            self.finish()
        elif self._claim():
            self.pending.record(
                request_id=self.request_id,
                response_model=self.model,
                service_tier=self.served_tier(),
                status=BILLED_UNKNOWN,
                error_type=type(exc).__name__,
                http_status=200,
                usage_reported=False,
            )

    def abandon(self) -> None:
        self.catch_up()
        if self.usage is not None:  # everything billable was received
            self.finish()
        elif self._claim():
            self.pending.record(
                request_id=self.request_id,
                response_model=self.model,
                service_tier=self.served_tier(),
                status="incomplete",
                error_type="StreamClosedEarly",
                usage_reported=False,
            )

    def served_tier(self) -> str | None:
        """The tier the stream's items named, else the one its request asked for when that
        is served as asked or refused (a cut stream's row is counted there, as billed)."""
        return self.service_tier or self.pending.asked_tier()

    def at_scope_end(self) -> None:
        """Its scope closes: record the stream now, in that scope."""
        self.drain()
        self.abandon()


def _close_sync(original: Any) -> Any:
    def close(self: Any) -> Any:
        watch = self.__dict__.get(WATCHED)
        if isinstance(watch, StreamWatch):  # a watched stream: its usage first, if complete
            safe(watch.drain)
            safe(watch.abandon)
        return original(self)

    close.__doc__ = original.__doc__
    setattr(close, ORIGINAL_ATTR, original)
    return close


def _close_async(original: Any) -> Any:
    async def close(self: Any) -> Any:
        watch = self.__dict__.get(WATCHED)
        if isinstance(watch, StreamWatch):
            await safe_async(watch.adrain, watch.ainner)
            safe(watch.abandon)
        return await original(self)

    close.__doc__ = original.__doc__
    setattr(close, ORIGINAL_ATTR, original)
    return close


def hook_close() -> None:
    """``Stream.close`` and ``AsyncStream.close``, once per process: a watched stream's
    close reads the usage still on the wire (an answer complete) and records the stream
    before it closes.  One patch of each class, where a ``close`` set on every stream
    cost each stream a closure and a weak reference."""
    if not hasattr(Stream.close, ORIGINAL_ATTR):
        Stream.close = _close_sync(Stream.close)  # type: ignore[method-assign]
    if not hasattr(AsyncStream.close, ORIGINAL_ATTR):
        AsyncStream.close = _close_async(AsyncStream.close)  # type: ignore[method-assign]


def unhook_close() -> None:
    for cls in (Stream, AsyncStream):
        original = getattr(cls.close, ORIGINAL_ATTR, None)
        if original is not None:
            cls.close = original  # type: ignore[method-assign]


def watch_sync(pending: PendingCall, stream: Stream[Any]) -> Stream[Any]:
    if getattr(stream, WATCHED, False):  # parse() again, or a decorated function's result
        return stream
    if not hasattr(Stream.close, ORIGINAL_ATTR):  # (the decorator, without instrument())
        hook_close()
    watch = StreamWatch(pending, stream.response.headers.get("x-request-id"))
    inner = watch.inner = stream._iterator

    def iterate() -> Iterator[Any]:
        see = watch.see
        try:
            while watch.ahead:  # drained before the first read (closed, or its scope ended)
                yield watch.ahead.popleft()
            for item in inner:  # every item seen (a lazy watch's first)
                try:
                    keep = see(item)
                except Exception as exc:  # a bug of metering: the caller gets the chunk
                    contain(exc, "read a stream chunk")
                    keep = True
                if keep:
                    yield item
                while watch.ahead:  # drained while the caller held the stream: theirs first
                    yield watch.ahead.popleft()
                if watch.lazy:
                    break
            if watch.pending.injected_usage:  # (lazy) a glance at each for the chunk to hide
                glance = watch.glance
                for item in inner:
                    try:
                        keep = glance(item)
                    except Exception as exc:
                        contain(exc, "read a stream chunk")
                        keep = True
                    if keep:
                        yield item
                    while watch.ahead:
                        yield watch.ahead.popleft()
            for item in inner:  # (lazy) only the last one kept, seen when it is needed,
                watch.last = item
                if getattr(item, "usage", None) is not None:
                    safe(watch.catch_up)  # or at once when it carries a usage (never lost)
                yield item
                while watch.ahead:
                    yield watch.ahead.popleft()
        except GeneratorExit:  # closed or collected before its end
            safe(watch.drain)
            safe(watch.abandon)
            raise
        except BaseException as exc:
            safe(watch.fail, exc)
            raise
        safe(watch.finish)

    stream._iterator = iterate()
    setattr(stream, WATCHED, watch)  # (what the hooked close records)
    return stream


def watch_async(pending: PendingCall, stream: AsyncStream[Any]) -> AsyncStream[Any]:
    if getattr(stream, WATCHED, False):
        return stream
    if not hasattr(AsyncStream.close, ORIGINAL_ATTR):
        hook_close()
    watch = StreamWatch(pending, stream.response.headers.get("x-request-id"))
    inner = watch.ainner = stream._iterator

    async def iterate() -> AsyncIterator[Any]:
        seen_first = False
        try:
            while True:
                if watch.ahead:
                    yield watch.ahead.popleft()
                    continue
                try:
                    item = await inner.__anext__()
                except StopAsyncIteration:
                    break
                if watch.lazy and seen_first and not watch.pending.injected_usage:
                    watch.last = item  # (lazy: seen when the stream ends, fails or is left,
                    if getattr(item, "usage", None) is not None:
                        safe(watch.catch_up)  # or at once when it carries a usage)
                    yield item
                    continue
                look = watch.glance if watch.lazy and seen_first else watch.see
                seen_first = True
                try:
                    keep = look(item)
                except Exception as exc:
                    contain(exc, "read a stream chunk")
                    keep = True
                if keep:
                    yield item
        except GeneratorExit:
            safe(watch.abandon)
            raise
        except BaseException as exc:
            safe(watch.fail, exc)
            raise
        safe(watch.finish)

    stream._iterator = iterate()
    setattr(stream, WATCHED, watch)
    return stream


# -- with_streaming_response -----------------------------------------------------------------------
class BodyTap:
    """Sees a raw response body as the caller reads it; records the call when it closes."""

    def __init__(self, pending: PendingCall, response: Any) -> None:
        self.pending = pending
        self.request_id = response.headers.get("x-request-id")
        self.sse = "text/event-stream" in response.headers.get("content-type", "")
        self.watch = StreamWatch(pending, self.request_id) if self.sse else None
        self.parts: list[str] = []
        self.fed = False
        self.done = False

    def event(self, text: str) -> bool:
        """One SSE event (its lines); False if it is the injected usage event to hide."""
        assert self.watch is not None
        for line in text.splitlines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                continue
            try:
                item = json.loads(data)
            except ValueError:
                continue
            return bool(safe(self.watch.see, item, default=True))
        return True

    def body(self, text: str) -> None:
        self.fed = True
        self.parts.append(text)

    def parsed(self, parsed: Any) -> None:
        """``parse()`` returned an object (not a stream): record it, once."""
        if not self.done:
            self.done = True
            record_parsed(self.pending, parsed, self.request_id)

    def close(self, content: bytes | None) -> None:
        if self.done:
            return
        if self.watch is not None:
            self.done = True
            if content is not None and not self.fed:
                for event in content.decode("utf-8", "replace").split("\n\n"):
                    self.event(event)
            self.watch.finish() if self.watch.answer_complete else self.watch.abandon()
            return
        text = "".join(self.parts) if self.fed else None
        if text is None and content is not None:
            text = content.decode("utf-8", "replace")
        try:
            parsed = json.loads(text) if text else None
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            self.parsed(parsed)
            return
        self.done = True
        self.pending.record(
            request_id=self.request_id,
            status="incomplete",
            error_type="BodyNotRead",
            usage_reported=False,
        )


def _split_events(buffer: Any, chunk: Any) -> tuple[list[Any], Any]:
    """Complete SSE events (with their blank line) in ``buffer + chunk``, and the rest."""
    sep = b"\n\n" if isinstance(chunk, bytes) else "\n\n"
    buffer += chunk
    events: list[Any] = []
    while True:
        at = buffer.find(sep)
        if at < 0:
            return events, buffer
        events.append(buffer[: at + len(sep)])
        buffer = buffer[at + len(sep) :]


def _text(piece: Any) -> str:
    return piece.decode("utf-8", "replace") if isinstance(piece, bytes) else str(piece)


class _Chunks:
    """``iter_bytes`` / ``iter_text`` as the caller reads them: a JSON body is seen as it
    passes; an SSE body is handed on in whole events, the injected usage event left out."""

    def __init__(self, tap: BodyTap) -> None:
        self.tap = tap
        self.buffer: Any = None

    def feed(self, chunk: Any) -> list[Any]:
        if not self.tap.sse:
            self.tap.body(_text(chunk))
            return [chunk]
        self.tap.fed = True
        events, self.buffer = _split_events(
            chunk[:0] if self.buffer is None else self.buffer, chunk
        )
        return [e for e in events if self.tap.event(_text(e))]

    def end(self) -> list[Any]:
        if not self.buffer:
            return []
        self.tap.event(_text(self.buffer))
        return [self.buffer]


class _Lines:
    """``iter_lines``: the same rules, line by line (an event ends at its blank line)."""

    def __init__(self, tap: BodyTap) -> None:
        self.tap = tap
        self.held: list[str] = []

    def feed(self, line: str) -> list[str]:
        if not self.tap.sse:
            self.tap.body(line + "\n")
            return [line]
        self.tap.fed = True
        if line:
            self.held.append(line)
            return []
        event, self.held = self.held, []
        return [*event, line] if self.tap.event("\n".join(event)) else []

    def end(self) -> list[str]:
        event, self.held = self.held, []
        return event if event and self.tap.event("\n".join(event)) else []


def _through(step: _Chunks | _Lines, source: Iterator[Any]) -> Iterator[Any]:
    for item in source:
        yield from step.feed(item)
    yield from step.end()


async def _athrough(step: _Chunks | _Lines, source: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for item in source:
        for out in step.feed(item):
            yield out
    for out in step.end():
        yield out


def _content(http_response: Any) -> bytes | None:
    try:
        return bytes(http_response.content)
    except Exception:  # not read (httpx's ResponseNotRead)
        return None


def watch_response(pending: PendingCall, response: Any) -> Any:
    """Tap a ``with_streaming_response`` APIResponse; records on parse() or close()."""
    if getattr(response, WATCHED, False):
        return response
    tap = BodyTap(pending, response)
    original_parse, original_close = response.parse, response.close

    def parse(*args: Any, **kwargs: Any) -> Any:
        parsed = original_parse(*args, **kwargs)
        if isinstance(parsed, Stream):
            if tap.watch is not None:  # the stream's own watch records it
                tap.watch._claim()
            safe(watch_sync, pending, parsed)
            tap.done = True
        else:
            safe(tap.parsed, parsed)
        return parsed

    def close() -> None:
        safe(tap.close, _content(response.http_response))
        original_close()

    _tap_iterators(response, tap)
    response.parse, response.close = parse, close
    setattr(response, WATCHED, True)
    return response


def watch_async_response(pending: PendingCall, response: Any) -> Any:
    if getattr(response, WATCHED, False):
        return response
    tap = BodyTap(pending, response)
    original_parse, original_close = response.parse, response.close

    async def parse(*args: Any, **kwargs: Any) -> Any:
        parsed = await original_parse(*args, **kwargs)
        if isinstance(parsed, AsyncStream):
            if tap.watch is not None:
                tap.watch._claim()
            safe(watch_async, pending, parsed)
            tap.done = True
        else:
            safe(tap.parsed, parsed)
        return parsed

    async def close() -> None:
        safe(tap.close, _content(response.http_response))
        await original_close()

    _tap_async_iterators(response, tap)
    response.parse, response.close = parse, close
    setattr(response, WATCHED, True)
    return response


def _tap_iterators(response: Any, tap: BodyTap) -> None:
    for name in ("iter_bytes", "iter_text"):
        original = getattr(response, name)
        setattr(response, name, lambda *a, _o=original, **k: _through(_Chunks(tap), _o(*a, **k)))
    original_lines = response.iter_lines
    response.iter_lines = lambda: _through(_Lines(tap), original_lines())


def _tap_async_iterators(response: Any, tap: BodyTap) -> None:
    for name in ("iter_bytes", "iter_text"):
        original = getattr(response, name)
        setattr(response, name, lambda *a, _o=original, **k: _athrough(_Chunks(tap), _o(*a, **k)))
    original_lines = response.iter_lines
    response.iter_lines = lambda: _athrough(_Lines(tap), original_lines())
