"""Capture every call of the real ``openai`` client (3.x) from the provider's own ``usage``.

``instrument()`` wraps ``SyncAPIClient.request`` and ``AsyncAPIClient.request``, the one door
every endpoint of every client (module-level, ``OpenAI``, ``AsyncOpenAI``, Azure, created before
or after) goes through.  One logical call is one record: the SDK's own retries happen inside the
door, and failed attempts bill nothing.  What is captured, per operation:

- chat completions (plain, JSON mode, ``n``, tools, ``parse``), streaming included: when the
  caller did not ask for usage, ``stream_options.include_usage`` is added to the request, the
  final usage chunk is read and hidden, and the other chunks look exactly as without it;
- responses (plain and streaming: usage from ``response.completed``);
- embeddings; image generation and edits (images counted from the response, size and quality
  from the response or the request's defaults; gpt-image token usage);
- ``with_raw_response`` and ``with_streaming_response`` (captured when the body is parsed).

Failures are recorded too (status ``error``, error type, HTTP status, latency, no tokens); a
stream abandoned before its end is ``incomplete`` with unknown usage.  The request id comes from
``x-request-id``.  No prompt or output text is read into the record.  A bug in metering is
logged, never raised into the caller; only ``BudgetExceeded`` from a budget guard is meant to
stop a call.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import openai
from openai import APIStatusError, AsyncStream, Stream

try:  # private parts of the SDK the capture relies on; checked again by sdk_problems()
    from openai._base_client import AsyncAPIClient, SyncAPIClient
    from openai._legacy_response import LegacyAPIResponse
    from openai._response import APIResponse, AsyncAPIResponse

    _IMPORT_PROBLEM: str | None = None
except ImportError as _exc:  # pragma: no cover - an SDK whose layout changed
    _IMPORT_PROBLEM = str(_exc)

from .context import (
    CallRecord,
    UsageScope,
    before_call,
    current_scope,
    is_interrupt,
    record_call,
)
from .pricing import cost_of

logger = logging.getLogger("tokenmeter.openai")

_OPERATIONS = {
    "/chat/completions": "chat",
    "/responses": "responses",
    "/embeddings": "embedding",
    "/images/generations": "image",
    "/images/edits": "image",
    "/images/variations": "image",
    "/completions": "completion",
}
_IMAGE_DEFAULTS = {"dall-e-2": ("1024x1024", "standard"), "dall-e-3": ("1024x1024", "standard")}
_ORIGINAL_ATTR = "__tokenmeter_original__"

# Calls recorded by the hooks inside a @track_openai_call function (to avoid double counting).
_tracked: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar(
    "tokenmeter_tracked", default=None
)


# -- per-call state -------------------------------------------------------------------------------
@dataclass
class _Pending:
    """A call in flight: what we know before the answer."""

    operation: str
    requested_model: str | None
    stream: bool
    injected_usage: bool
    scope: UsageScope | None
    body: dict[str, Any]
    started: float = field(default_factory=time.perf_counter)

    def record(self, **fields: Any) -> None:
        call = CallRecord(
            operation=self.operation,
            requested_model=self.requested_model,
            stream=self.stream,
            latency_ms=(time.perf_counter() - self.started) * 1000,
            **fields,
        )
        if call.operation == "image":
            _image_details(call, self.body)
        call.cost_usd, call.price_version = cost_of(call)
        record_call(call, self.scope)
        counter = _tracked.get()
        if counter is not None:
            counter[0] += 1

    def error(self, exc: BaseException, http_status: int | None = None) -> None:
        status = http_status
        request_id = None
        if isinstance(exc, APIStatusError):
            status, request_id = exc.status_code, exc.request_id
        self.record(
            request_id=request_id,
            status="error",
            error_type=type(exc).__name__,
            http_status=status,
            usage_reported=False,
        )


def _begin(options: Any) -> tuple[_Pending | None, Any]:
    """Inspect a request; returns (pending, options to send).  Budget guards may raise."""
    try:
        if str(getattr(options, "method", "")).lower() != "post":
            return None, options
        operation = _OPERATIONS.get(str(options.url).rstrip("/"))
        if operation is None:
            return None, options
        body = options.json_data if isinstance(options.json_data, dict) else {}
        model = body.get("model")
        if operation == "image" and not model:
            model = "dall-e-2"
        stream = bool(body.get("stream"))
        injected = False
        if operation == "chat" and stream:
            stream_options = body.get("stream_options") or {}
            if not stream_options.get("include_usage"):
                body = {**body, "stream_options": {**stream_options, "include_usage": True}}
                options = options.model_copy(update={"json_data": body})
                injected = True
        pending = _Pending(operation, model, stream, injected, current_scope(), body)
    except Exception as exc:
        if is_interrupt(exc):
            raise
        logger.exception("tokenmeter could not inspect an openai request; not metered")
        return None, options
    before_call(operation, model)  # BudgetExceeded propagates: it is meant to stop the call
    return pending, options


# -- reading usage ---------------------------------------------------------------------------------
def _get(obj: Any, *names: str) -> Any:
    for name in names:
        if obj is None:
            return None
        obj = obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)
    return obj


def _usage_fields(operation: str, usage: Any) -> dict[str, Any]:
    if usage is None:
        return {"usage_reported": False}
    if operation in ("responses", "image"):
        inp, out = _get(usage, "input_tokens"), _get(usage, "output_tokens")
        fields = {
            "input_tokens": inp or 0,
            "output_tokens": out or 0,
            "cached_input_tokens": _get(usage, "input_tokens_details", "cached_tokens") or 0,
            "input_image_tokens": _get(usage, "input_tokens_details", "image_tokens") or 0,
            "reasoning_tokens": _get(usage, "output_tokens_details", "reasoning_tokens") or 0,
        }
    else:
        inp, out = _get(usage, "prompt_tokens"), _get(usage, "completion_tokens")
        fields = {
            "input_tokens": inp or 0,
            "output_tokens": out or 0,
            "cached_input_tokens": _get(usage, "prompt_tokens_details", "cached_tokens") or 0,
            "reasoning_tokens": _get(usage, "completion_tokens_details", "reasoning_tokens") or 0,
        }
    fields["usage_reported"] = inp is not None or out is not None
    return fields


def _image_details(call: CallRecord, body: dict[str, Any]) -> None:
    default_size, default_quality = _IMAGE_DEFAULTS.get(call.requested_model or "", (None, None))
    size = call.image_size or body.get("size") or default_size
    quality = call.image_quality or body.get("quality") or default_quality
    call.image_size = None if size == "auto" else size
    call.image_quality = None if quality == "auto" else quality


def _record_parsed(pending: _Pending, parsed: Any, request_id: str | None) -> None:
    fields = _usage_fields(pending.operation, _get(parsed, "usage"))
    if pending.operation == "image":
        fields["image_count"] = len(_get(parsed, "data") or [])
        fields["image_size"] = _get(parsed, "size")
        fields["image_quality"] = _get(parsed, "quality")
        fields["response_model"] = None
        if not fields["usage_reported"] and not (pending.requested_model or "").startswith(
            "gpt-image"
        ):
            fields["usage_reported"] = True  # dall-e has no token usage by design
    else:
        fields["response_model"] = _get(parsed, "model")
    pending.record(request_id=request_id or _get(parsed, "_request_id"), **fields)


class _StreamWatch:
    """Reads usage from a stream's items as the caller iterates; records once at the end."""

    def __init__(self, pending: _Pending, request_id: str | None) -> None:
        self.pending = pending
        self.request_id = request_id
        self.usage: Any = None
        self.model: str | None = None
        self.done = False

    def see(self, item: Any) -> bool:
        """Look at one item; False if it is the injected usage chunk to hide from the caller."""
        if self.pending.operation == "responses":
            response = _get(item, "response")
            if (
                _get(item, "type")
                in {
                    "response.completed",
                    "response.incomplete",
                    "response.failed",
                }
                and response is not None
            ):
                self.usage, self.model = _get(response, "usage"), _get(response, "model")
            return True
        self.model = _get(item, "model") or self.model
        usage = _get(item, "usage")
        if usage is not None:
            self.usage = usage
            if self.pending.injected_usage and not _get(item, "choices"):
                return False
        elif self.pending.injected_usage:
            fields_set = getattr(item, "__pydantic_fields_set__", None)
            if isinstance(fields_set, set):
                fields_set.discard("usage")  # as if the server had never sent the key
        return True

    def finish(self) -> None:
        if self.done:
            return
        self.done = True
        fields = _usage_fields(self.pending.operation, self.usage)
        self.pending.record(request_id=self.request_id, response_model=self.model, **fields)

    def fail(self, exc: BaseException) -> None:
        if not self.done:
            self.done = True
            self.pending.error(exc, http_status=200)

    def abandon(self) -> None:
        if not self.done:
            self.done = True
            self.pending.record(
                request_id=self.request_id,
                response_model=self.model,
                status="incomplete",
                error_type="StreamClosedEarly",
                usage_reported=False,
            )


def _watch_sync(pending: _Pending, stream: Stream[Any]) -> Stream[Any]:
    watch = _StreamWatch(pending, stream.response.headers.get("x-request-id"))
    inner = stream._iterator

    def iterate() -> Iterator[Any]:
        try:
            for item in inner:
                if _safe(watch.see, item, default=True):
                    yield item
        except GeneratorExit:
            _safe(watch.abandon)
            raise
        except BaseException as exc:
            _safe(watch.fail, exc)
            raise
        _safe(watch.finish)

    stream._iterator = iterate()
    return stream


def _watch_async(pending: _Pending, stream: AsyncStream[Any]) -> AsyncStream[Any]:
    watch = _StreamWatch(pending, stream.response.headers.get("x-request-id"))
    inner = stream._iterator

    async def iterate() -> AsyncIterator[Any]:
        try:
            async for item in inner:
                if _safe(watch.see, item, default=True):
                    yield item
        except GeneratorExit:
            _safe(watch.abandon)
            raise
        except BaseException as exc:
            _safe(watch.fail, exc)
            raise
        _safe(watch.finish)

    stream._iterator = iterate()
    return stream


T = TypeVar("T")


def _safe(fn: Callable[..., T], *args: Any, default: Any = None) -> T:
    try:
        return fn(*args)
    except Exception as exc:
        if is_interrupt(exc):  # a soft time limit must reach the task
            raise
        logger.exception("tokenmeter failed to record an openai call")
        return cast(T, default)


def _observe(pending: _Pending, result: Any) -> Any:
    """Record (or arrange to record) ``result``; returns what the caller gets."""
    if isinstance(result, Stream):
        return _watch_sync(pending, result)
    if isinstance(result, AsyncStream):
        return _watch_async(pending, result)
    if isinstance(result, LegacyAPIResponse):  # .with_raw_response: parse is cached
        parsed = result.parse()
        if isinstance(parsed, Stream):
            _watch_sync(pending, parsed)
        elif isinstance(parsed, AsyncStream):
            _watch_async(pending, parsed)
        else:
            _record_parsed(pending, parsed, result.request_id)
        return result
    if isinstance(result, APIResponse):  # .with_streaming_response: record on parse
        original_parse = result.parse

        @functools.wraps(original_parse)
        def parse(*args: Any, **kwargs: Any) -> Any:
            parsed = original_parse(*args, **kwargs)
            if isinstance(parsed, Stream):
                _safe(_watch_sync, pending, parsed)
            elif not getattr(parse, "done", False):
                parse.done = True  # type: ignore[attr-defined]
                _safe(_record_parsed, pending, parsed, result.request_id)
            return parsed

        result.parse = parse  # type: ignore[method-assign]
        return result
    if isinstance(result, AsyncAPIResponse):
        original_aparse = result.parse

        @functools.wraps(original_aparse)
        async def aparse(*args: Any, **kwargs: Any) -> Any:
            parsed = await original_aparse(*args, **kwargs)
            if isinstance(parsed, AsyncStream):
                _safe(_watch_async, pending, parsed)
            elif not getattr(aparse, "done", False):
                aparse.done = True  # type: ignore[attr-defined]
                _safe(_record_parsed, pending, parsed, result.request_id)
            return parsed

        result.parse = aparse  # type: ignore[method-assign]
        return result
    _record_parsed(pending, result, None)
    return result


# -- the wrappers ----------------------------------------------------------------------------------
def _wrap_sync(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def request(self: Any, cast_to: Any, options: Any, *args: Any, **kwargs: Any) -> Any:
        pending, options = _begin(options)
        if pending is None:
            return original(self, cast_to, options, *args, **kwargs)
        try:
            result = original(self, cast_to, options, *args, **kwargs)
        except BaseException as exc:
            _safe(pending.error, exc)
            raise
        return _safe(_observe, pending, result, default=result)

    setattr(request, _ORIGINAL_ATTR, original)
    return request


def _wrap_async(original: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    @functools.wraps(original)
    async def request(self: Any, cast_to: Any, options: Any, *args: Any, **kwargs: Any) -> Any:
        pending, options = _begin(options)
        if pending is None:
            return await original(self, cast_to, options, *args, **kwargs)
        try:
            result = await original(self, cast_to, options, *args, **kwargs)
        except BaseException as exc:
            _safe(pending.error, exc)
            raise
        return _safe(_observe, pending, result, default=result)

    setattr(request, _ORIGINAL_ATTR, original)
    return request


SUPPORTED = ">=3.0,<4"


def sdk_problems() -> list[str]:
    """What of the SDK's private parts the capture relies on is missing or changed (none: ok)."""
    if _IMPORT_PROBLEM is not None:
        return [_IMPORT_PROBLEM]
    problems = []
    for cls in (SyncAPIClient, AsyncAPIClient):
        try:
            params = list(inspect.signature(cls.request).parameters)[:3]
        except (AttributeError, TypeError, ValueError):
            params = []
        if params != ["self", "cast_to", "options"]:
            problems.append(f"{cls.__name__}.request(self, cast_to, options, ...) changed")
    for stream in (Stream, AsyncStream):
        code = getattr(stream.__init__, "__code__", None)
        if code is None or "_iterator" not in code.co_names:
            problems.append(f"{stream.__name__} no longer keeps its _iterator")
    fields = getattr(getattr(openai, "_models", None), "FinalRequestOptions", None)
    names = getattr(fields, "model_fields", {})
    if not {"json_data", "url", "method"} <= set(names):
        problems.append("FinalRequestOptions lost json_data / url / method")
    for response in (LegacyAPIResponse, APIResponse, AsyncAPIResponse):
        if not all(hasattr(response, a) for a in ("parse", "request_id")):
            problems.append(f"{response.__name__} lost parse / request_id")
    return problems


def is_instrumented() -> bool:
    return _IMPORT_PROBLEM is None and hasattr(SyncAPIClient.request, _ORIGINAL_ATTR)


def instrument() -> bool:
    """Capture every openai call in this process.  Idempotent and cheap to call again.

    Returns False, with one warning and the client left as it is (calls work, unmetered), when
    the installed SDK's private parts differ from what the capture relies on.
    """
    if is_instrumented():
        return True
    problems = sdk_problems()
    if problems:
        logger.warning(
            "tokenmeter does not capture calls with openai %s (supported: openai%s): %s; "
            "OpenAI calls will work but are NOT metered",
            getattr(openai, "__version__", "?"),
            SUPPORTED,
            "; ".join(problems),
        )
        return False
    SyncAPIClient.request = _wrap_sync(SyncAPIClient.request)  # type: ignore[method-assign]
    AsyncAPIClient.request = _wrap_async(AsyncAPIClient.request)  # type: ignore[method-assign,assignment]
    return True


def uninstrument() -> None:
    """Restore the client exactly as it was."""
    if _IMPORT_PROBLEM is not None:
        return
    for cls in (SyncAPIClient, AsyncAPIClient):
        original = getattr(cls.request, _ORIGINAL_ATTR, None)
        if original is not None:
            cls.request = original  # type: ignore[method-assign]


# -- the explicit decorator --------------------------------------------------------------------
F = TypeVar("F", bound=Callable[..., Any])


def track_openai_call(*, model: str | None = None, operation: str = "chat") -> Callable[[F], F]:
    """Record the call a function makes from the response object it returns.

    For code that wants to be explicit (or runs without ``instrument()``).  The record comes
    from the response's own ``usage``, never an estimate.  If the instrumented client already
    recorded the call(s) the function made, the decorator adds nothing: no double counting.
    """

    def decorate(fn: F) -> F:
        def _after(result: Any, counter: list[int], started: float) -> None:
            if counter[0] or result is None:
                return
            pending = _Pending(
                operation, model or _get(result, "model"), False, False, current_scope(), {}
            )
            pending.started = started
            _record_parsed(pending, result, _get(result, "_request_id"))

        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                counter = [0]
                token = _tracked.set(counter)
                started = time.perf_counter()
                try:
                    result = await fn(*args, **kwargs)
                finally:
                    _tracked.reset(token)
                _safe(_after, result, counter, started)
                return result

            return cast(F, async_wrapper)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            counter = [0]
            token = _tracked.set(counter)
            started = time.perf_counter()
            try:
                result = fn(*args, **kwargs)
            finally:
                _tracked.reset(token)
            _safe(_after, result, counter, started)
            return result

        return cast(F, wrapper)

    return decorate
