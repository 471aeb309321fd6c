"""Capture every call of the real ``openai`` client (3.x) from the provider's own ``usage``.

``instrument()`` wraps ``SyncAPIClient.request`` and ``AsyncAPIClient.request``, the one door
every endpoint of every client (module-level, ``OpenAI``, ``AsyncOpenAI``, Azure, created before
or after) goes through, and ``_sleep_for_retry``, which the SDK calls between two attempts of a
call (only then: an answered call pays nothing for it).  One logical call is one record, plus
one ``billed_unknown`` record (cost NULL) for each attempt that was sent but never answered (a
read timeout, a connection cut while waiting), since the provider may have completed and billed
it; every attempt carries its own ``X-Client-Request-Id`` (see ``capture``), put in the call's
headers before the SDK builds the attempt's request.  What is captured, per operation:

- chat completions (plain, JSON mode, ``n``, tools, ``parse``), streaming included: when the
  caller did not ask for usage, ``stream_options.include_usage`` is added to the request, the
  final usage chunk is read and hidden, and the other chunks look exactly as without it;
- responses (plain and streaming: usage from ``response.completed``);
- embeddings; image generation and edits (images counted from the response, size and quality
  from the response or the request's defaults; gpt-image token usage);
- ``with_raw_response`` and ``with_streaming_response`` (recorded when the body is parsed or
  the response closes, however the body was read).

Streams are recorded once whatever the caller does with them (see ``streams``).  Failures are
recorded too (status ``error``, error type, HTTP status, latency, no tokens).  The request id
comes from ``x-request-id``.  No prompt or output text is read into the record.  A bug in
metering is logged, never raised into the caller; only ``BudgetExceeded`` from a budget guard is
meant to stop a call.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from types import FrameType
from typing import Any, TypeVar, cast

import openai
from openai import AsyncStream, Stream

try:  # private parts of the SDK the capture relies on; checked again by sdk_problems()
    from openai._base_client import AsyncAPIClient, SyncAPIClient
    from openai._legacy_response import LegacyAPIResponse
    from openai._response import APIResponse, AsyncAPIResponse

    _IMPORT_PROBLEM: str | None = None
except ImportError as _exc:  # pragma: no cover - an SDK whose layout changed
    _IMPORT_PROBLEM = str(_exc)

from . import batches
from .capture import (
    CLIENT_REQUEST_ID,
    ORIGINAL_ATTR,
    Attempt,
    PendingCall,
    contain,
    get,
    key_hint,
    record_parsed,
    safe,
    tag_request,
    tracked,
)
from .context import before_call, current_scope, is_interrupt
from .settings import get_settings
from .streams import (
    WATCHED,
    hook_close,
    unhook_close,
    watch_async,
    watch_async_response,
    watch_response,
    watch_sync,
)

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
#: Endpoints OpenAI bills whose answers the capture cannot read yet (transcriptions report
#: tokens or seconds, speech answers with audio bytes only, videos bill by the second): a call
#: to one is not in the ledger, which is said once per kind and process, never passed over.
_UNMETERED = {
    "/audio/transcriptions": "audio transcriptions",
    "/audio/translations": "audio translations",
    "/audio/speech": "text to speech",
    "/videos": "video generation",
}
_said_unmetered: set[str] = set()


_AZURE = (openai.AzureOpenAI, openai.AsyncAzureOpenAI)


def _azure_model(client: Any, body: dict[str, Any]) -> str | None:
    """The model an Azure client's deployment serves: a deployment names the model, and
    responses without a model (images) are priced by ``TOKENMETER_AZURE_DEPLOYMENTS``; a
    deployment it does not list stays its own name (unknown: cost NULL with a warning, never a
    guess)."""
    deployment = getattr(client, "_azure_deployment", None) or body.get("model")
    if not deployment:
        return None
    return get_settings().tokenmeter_azure_deployments.get(deployment, deployment)


_LOWER_ID = CLIENT_REQUEST_ID.lower()


def callers_request_id(options: Any, client: Any) -> tuple[bool, str | None]:
    """Does the caller name an X-Client-Request-Id for this call (its own headers first, then
    its client's defaults, in any spelling), and which: ``(False, None)`` when not, the value
    ``None`` when it removes the header (``Omit``).  A client without the SDK's
    ``_custom_headers`` is read through its public ``default_headers``."""
    client_headers = getattr(client, "_custom_headers", None)
    if client_headers is None and client is not None:
        client_headers = getattr(client, "default_headers", None)
    for headers in (options.headers, client_headers):
        if not headers or not isinstance(headers, Mapping):  # (NotGiven is falsy)
            continue
        for name, value in headers.items():
            if isinstance(name, str) and name.lower() == _LOWER_ID:
                return True, value if isinstance(value, str) else None
    return False, None


def _tag_first_attempt(pending: PendingCall, options: Any, client: Any) -> None:
    """Give the call's first attempt its X-Client-Request-Id in the call's own headers (a new
    dict: the caller's may be reused), unless the caller names one: every attempt then carries
    the caller's."""
    named, given = callers_request_id(options, client)
    if not named:
        given, pending.own_ids = tag_request(options), True
    pending.attempts.append(Attempt(given, pending.started))  # sent now: the call's clock


_HINT_ATTR = "_tokenmeter_key_hint"


def _key_hint_of(client: Any) -> str | None:
    """``key_hint`` of the client's key, kept on the client beside the key it was made from
    (no copy of the key: the same string object), and made again when the key changes."""
    key = getattr(client, "api_key", None)
    kept = getattr(client, _HINT_ATTR, None)
    if kept is not None and kept[0] is key:
        return kept[1]
    hint = key_hint(key)
    with contextlib.suppress(AttributeError, TypeError):  # a client with slots, or frozen
        setattr(client, _HINT_ATTR, (key, hint))
    return hint


def _is_post(options: Any) -> bool:
    method = getattr(options, "method", None)
    return method == "post" or str(method).lower() == "post"  # the SDK spells it "post"


def _begin(options: Any, client: Any = None) -> tuple[PendingCall | None, Any]:
    """Inspect a POST request; returns (pending, options to send).  Budget guards may raise."""
    try:
        url = options.url
        operation = _OPERATIONS.get(url) or _OPERATIONS.get(str(url).rstrip("/"))
        if operation is None:
            _say_unmetered(str(url))
            return None, options
        body = options.json_data
        if not isinstance(body, dict):
            body = {}
        model = body.get("model")
        if isinstance(client, _AZURE):
            model = _azure_model(client, body)
        elif operation == "image" and not model:
            model = "dall-e-2"  # the API's default image model
        stream = bool(body.get("stream"))
        injected = False
        if stream and operation == "chat":
            stream_options = body.get("stream_options") or {}
            if not stream_options.get("include_usage"):
                body = {**body, "stream_options": {**stream_options, "include_usage": True}}
                options = options.model_copy(update={"json_data": body})
                injected = True
        pending = PendingCall(operation, model, stream, injected, current_scope(), body)
        headers = options.headers
        project = headers.get("OpenAI-Project") if isinstance(headers, dict) else None
        pending.project = project or getattr(client, "project", None)
        pending.api_key_hint = _key_hint_of(client)
        _tag_first_attempt(pending, options, client)
    except Exception as exc:
        if is_interrupt(exc):
            raise
        logger.exception("tokenmeter could not inspect an openai request; not metered")
        return None, options
    before_call(operation, model)  # BudgetExceeded propagates: it is meant to stop the call
    return pending, options


def _say_unmetered(path: str) -> None:
    """Warn, once per kind, of a call to an endpoint OpenAI bills that is not metered."""
    what = _UNMETERED.get(path.rstrip("/"))
    if what is None and path.startswith("/videos/"):
        what = _UNMETERED["/videos"]  # a remix (/videos/{id}/remix) bills like a new one
    if what is None or what in _said_unmetered:
        return
    _said_unmetered.add(what)
    logger.warning(
        "tokenmeter does not meter %s yet (POST %s): OpenAI bills these calls and they are NOT "
        "in the ledger; this is said once per process",
        what,
        path,
    )


def _observe(pending: PendingCall, result: Any) -> Any:
    """Record (or arrange to record) ``result``; returns what the caller gets."""
    if isinstance(result, openai.BaseModel):  # most calls: the parsed answer
        record_parsed(pending, result, None)
        return result
    if isinstance(result, Stream):
        return watch_sync(pending, result)
    if isinstance(result, AsyncStream):
        return watch_async(pending, result)
    if isinstance(result, LegacyAPIResponse):  # .with_raw_response: parse is cached
        parsed = result.parse()
        if isinstance(parsed, Stream):
            watch_sync(pending, parsed)
        elif isinstance(parsed, AsyncStream):
            watch_async(pending, parsed)
        else:
            record_parsed(pending, parsed, result.request_id)
        return result
    if isinstance(result, APIResponse):  # .with_streaming_response: record on parse or close
        return watch_response(pending, result)
    if isinstance(result, AsyncAPIResponse):
        return watch_async_response(pending, result)
    record_parsed(pending, result, None)
    return result


def _answered(pending: PendingCall, result: Any) -> Any:
    """The call returned ``result``: record what its attempts and its answer billed; returns
    what the caller gets.  Never raises but an interrupt (safe(), spelled out: one frame less
    on the step every call takes)."""
    attempts = pending.attempts
    if len(attempts) != 1 or attempts[0].error is not None:  # retried, or never answered
        safe(pending.settle_unanswered, None)
    try:
        return _observe(pending, result)
    except Exception as exc:
        contain(exc)
        return result


# -- the wrappers ----------------------------------------------------------------------------------
def _noop(*_args: Any, **_kwargs: Any) -> Any:
    return None


def _wrap_sync(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def request(self: Any, cast_to: Any, options: Any, *args: Any, **kwargs: Any) -> Any:
        if not _is_post(options):
            result = original(self, cast_to, options, *args, **kwargs)
            if batches.is_file_content(options):  # maybe a batch's output: its lines are calls
                safe(batches.record_output, result)
            return result
        pending, options = _begin(options, self)
        if pending is None:
            return original(self, cast_to, options, *args, **kwargs)
        try:  # (a retry reads ``pending`` from this frame: _retried_call)
            result = original(self, cast_to, options, *args, **kwargs)
        except BaseException as exc:
            safe(pending.failed, exc)
            raise
        return _answered(pending, result)

    setattr(request, ORIGINAL_ATTR, original)
    return request


def _wrap_async(original: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    @functools.wraps(original)
    async def request(self: Any, cast_to: Any, options: Any, *args: Any, **kwargs: Any) -> Any:
        if not _is_post(options):
            result = await original(self, cast_to, options, *args, **kwargs)
            if batches.is_file_content(options):
                safe(batches.record_output, result)
            return result
        pending, options = _begin(options, self)
        if pending is None:
            return await original(self, cast_to, options, *args, **kwargs)
        try:
            result = await original(self, cast_to, options, *args, **kwargs)
        except BaseException as exc:
            safe(pending.failed, exc)
            raise
        return _answered(pending, result)

    setattr(request, ORIGINAL_ATTR, original)
    return request


def _wrap_retry_sync(original: Callable[..., Any]) -> Callable[..., Any]:
    """Between two attempts of a metered call: the one that failed is remembered when it may
    have been billed without an answer, and the next gets an X-Client-Request-Id of its own."""

    @functools.wraps(original)
    def _sleep_for_retry(self: Any, *args: Any, **kwargs: Any) -> Any:
        pending = _retried_call()
        if pending is not None:  # called in the SDK's ``except``: the attempt's own error
            safe(pending.attempt_failed, sys.exc_info()[1], kwargs.get("response"))
        result = original(self, *args, **kwargs)
        if pending is not None:
            safe(pending.next_attempt, kwargs.get("options"))
        return result

    setattr(_sleep_for_retry, ORIGINAL_ATTR, original)
    return _sleep_for_retry


def _wrap_retry_async(original: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    @functools.wraps(original)
    async def _sleep_for_retry(self: Any, *args: Any, **kwargs: Any) -> Any:
        pending = _retried_call()
        if pending is not None:
            safe(pending.attempt_failed, sys.exc_info()[1], kwargs.get("response"))
        result = await original(self, *args, **kwargs)
        if pending is not None:
            safe(pending.next_attempt, kwargs.get("options"))
        return result

    setattr(_sleep_for_retry, ORIGINAL_ATTR, original)
    return _sleep_for_retry


#: The code of the two request wrappers: the frame of a call's wrapper holds its ``pending``.
_REQUEST_CODES = frozenset((_wrap_sync(_noop).__code__, _wrap_async(_noop).__code__))
#: How far up the stack a retry looks for its call's wrapper (the SDK's ``request`` calls the
#: retry hook directly; room is left for a few wrappers of other tools in between).
_RETRY_FRAMES = 12


def _retried_call() -> PendingCall | None:
    """The call whose attempt the SDK is about to retry (None: not a metered call).

    The retry hook runs inside the SDK's ``request``, itself inside tokenmeter's wrapper of it
    (the same thread, or the awaiting chain of coroutines), whose frame holds the call's
    ``pending``: found by walking up the stack.  Only a retry pays for the walk; a context
    variable set around every call instead cost each call 4-10 us in place.
    """
    frame: FrameType | None = sys._getframe(2)  # the hook's caller: the SDK's request
    for _ in range(_RETRY_FRAMES):
        if frame is None:
            return None
        if frame.f_code in _REQUEST_CODES:
            found = frame.f_locals.get("pending")
            return found if isinstance(found, PendingCall) else None
        frame = frame.f_back
    return None


SUPPORTED = ">=3.0,<4"
#: The SDK methods ``instrument()`` wraps, on its sync and async clients.
HOOKED = ("request", "_sleep_for_retry")


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
        try:
            send = list(inspect.signature(cls._send_request).parameters)[:2]
        except (AttributeError, TypeError, ValueError):
            send = []
        if send != ["self", "request"]:
            problems.append(f"{cls.__name__}._send_request(self, request, ...) changed")
        try:
            retry = inspect.signature(cls._sleep_for_retry).parameters
        except (AttributeError, TypeError, ValueError):
            retry = {}  # type: ignore[assignment]
        keyword_only = {n for n, p in retry.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
        if not {"options", "response"} <= keyword_only:  # the hook reads them by name
            problems.append(f"{cls.__name__}._sleep_for_retry(self, *, options, response) changed")
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
    return _IMPORT_PROBLEM is None and hasattr(SyncAPIClient.request, ORIGINAL_ATTR)


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
    SyncAPIClient._sleep_for_retry = _wrap_retry_sync(SyncAPIClient._sleep_for_retry)  # type: ignore[method-assign]
    AsyncAPIClient._sleep_for_retry = _wrap_retry_async(AsyncAPIClient._sleep_for_retry)  # type: ignore[method-assign,assignment]
    hook_close()
    return True


def uninstrument() -> None:
    """Restore the client exactly as it was."""
    if _IMPORT_PROBLEM is not None:
        return
    for cls in (SyncAPIClient, AsyncAPIClient):
        for name in HOOKED:
            original = getattr(getattr(cls, name), ORIGINAL_ATTR, None)
            if original is not None:
                setattr(cls, name, original)
    unhook_close()


# -- the explicit decorator --------------------------------------------------------------------
F = TypeVar("F", bound=Callable[..., Any])


def track_openai_call(*, model: str | None = None, operation: str = "chat") -> Callable[[F], F]:
    """Record the call a function makes from the response object it returns.

    For code that wants to be explicit (or runs without ``instrument()``).  The record comes
    from the response's own ``usage``, never an estimate.  If the instrumented client already
    recorded the call(s) the function made, the decorator adds nothing: no double counting.
    """

    def decorate(fn: F) -> F:
        def _after(result: Any, counter: list[int], started: float) -> Any:
            if counter[0] or result is None or getattr(result, WATCHED, False):
                return result  # the hooks recorded it (a stream: they record it when read)
            pending = PendingCall(
                operation, model or get(result, "model"), False, False, current_scope(), {}
            )
            pending.started = started
            if isinstance(result, Stream):
                pending.stream = True
                return watch_sync(pending, result)
            if isinstance(result, AsyncStream):
                pending.stream = True
                return watch_async(pending, result)
            record_parsed(pending, result, get(result, "_request_id"))
            return result

        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                counter = [0]
                token = tracked.set(counter)
                started = time.perf_counter()
                try:
                    result = await fn(*args, **kwargs)
                finally:
                    tracked.reset(token)
                return safe(_after, result, counter, started, default=result)

            return cast(F, async_wrapper)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            counter = [0]
            token = tracked.set(counter)
            started = time.perf_counter()
            try:
                result = fn(*args, **kwargs)
            finally:
                tracked.reset(token)
            return safe(_after, result, counter, started, default=result)

        return cast(F, wrapper)

    return decorate
