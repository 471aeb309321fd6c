"""One OpenAI call in flight: what is known before the answer, each attempt the SDK sends, and
how the provider's ``usage`` becomes a :class:`CallRecord`.

The SDK retries inside one logical call.  An attempt that failed with an answer (429, 500)
billed nothing.  An attempt whose request reached the provider but whose answer never came
back (a read timeout, a connection cut while waiting, a cancelled or interrupted wait) may have
been completed and billed: the provider does not stop working because the client did.  Each
such attempt is its own ledger row, status ``billed_unknown``, cost NULL (never an exact $0),
identified by the ``X-Client-Request-Id`` header the attempt carried, which OpenAI logs with
the request.  An attempt that never left (connect error, pool timeout, a write that failed)
billed nothing.
"""

from __future__ import annotations

import contextvars
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime
from operator import attrgetter
from typing import Any

from openai import APIStatusError

from .context import CallRecord, UsageScope, hand_to_sink, is_interrupt, price_call
from .ids import new_id
from .pricing import served_tier

logger = logging.getLogger("tokenmeter.openai")

#: Where a method tokenmeter wraps (the SDK's request, retry hook, a stream's close) keeps
#: the one it wraps, for ``uninstrument()`` to put back.
ORIGINAL_ATTR = "__tokenmeter_original__"
#: OpenAI's header for the caller's own id of a request (ASCII, at most 512 characters).
CLIENT_REQUEST_ID = "X-Client-Request-Id"
BILLED_UNKNOWN = "billed_unknown"

#: Transport errors raised before the request was fully sent: the provider cannot have
#: processed it (names, so that httpx and httpx2 errors both match).
_NOT_SENT = frozenset(
    {
        "ConnectError",
        "ConnectTimeout",
        "PoolTimeout",
        "WriteError",
        "WriteTimeout",
        "LocalProtocolError",
        "UnsupportedProtocol",
        "ProxyError",
        "InvalidURL",
    }
)
#: Calls recorded inside a ``@track_openai_call`` function (so that it does not count them again).
tracked: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar(
    "tokenmeter_tracked", default=None
)
_IMAGE_DEFAULTS = {"dall-e-2": ("1024x1024", "standard"), "dall-e-3": ("1024x1024", "standard")}


def may_have_been_billed(exc: BaseException) -> bool:
    """True when an attempt that raised ``exc`` may have reached the provider and been billed."""
    return not any(cls.__name__ in _NOT_SENT for cls in type(exc).__mro__)


def new_client_request_id() -> str:
    return f"tm-{new_id()}"


def tag_request(options: Any) -> str:
    """Put a new X-Client-Request-Id in a call's ``options`` (the SDK builds each attempt's
    request from them), in a new headers dict (the caller's may be reused); returns it."""
    given = new_client_request_id()
    headers = options.headers
    tag = {CLIENT_REQUEST_ID: given}
    options.headers = {**headers, **tag} if headers else tag  # (NotGiven is falsy)
    return given


@dataclass(slots=True)
class Attempt:
    """One HTTP request the SDK sent for a call."""

    client_request_id: str | None
    started: float = field(default_factory=time.perf_counter)
    error: BaseException | None = None  # set when it may have been billed but got no answer


@dataclass(slots=True)
class PendingCall:
    """A call in flight: what we know before the answer."""

    operation: str
    requested_model: str | None
    stream: bool
    injected_usage: bool
    scope: UsageScope | None
    body: dict[str, Any]
    started: float = field(default_factory=time.perf_counter)
    attempts: list[Attempt] = field(default_factory=list)
    batch: bool = False  # a line of a Batch API output file
    project: str | None = None  # the OpenAI project the client named
    api_key_hint: str | None = None  # key_hint() of the client's key
    #: True when the attempts carry ids of tokenmeter's (the caller named none)
    own_ids: bool = False
    #: when the provider processed it, where that was not now (a Batch API output line)
    created_at: datetime | None = None

    @property
    def client_request_id(self) -> str | None:
        """The id the last attempt carried (the one that got the answer)."""
        return self.attempts[-1].client_request_id if self.attempts else None

    # -- attempts ------------------------------------------------------------------------------
    def attempt_failed(self, exc: BaseException | None, response: Any) -> None:
        """The SDK retries the call: its last attempt raised ``exc`` while sent, or was
        answered (``response``: an error status, which billed nothing)."""
        if response is None and exc is not None and self.attempts and may_have_been_billed(exc):
            self.attempts[-1].error = exc

    def next_attempt(self, options: Any) -> None:
        """The SDK is about to send the call again, from ``options`` (the call's own, which
        every attempt is built from): the attempt gets an id of its own."""
        given = tag_request(options) if self.own_ids else self.client_request_id
        self.attempts.append(Attempt(given))

    def settle_unanswered(self, final: BaseException | None) -> bool:
        """Record every attempt that may have been billed without an answer.

        Returns True when ``final`` (the exception the caller gets) is the last such attempt's
        own failure, which its ``billed_unknown`` row already records.
        """
        covered = False
        for n, attempt in enumerate(self.attempts):
            if attempt.error is None:
                continue
            error_type = type(attempt.error).__name__
            last = n == len(self.attempts) - 1
            if last and final is not None and attempt.error in (final, final.__cause__):
                covered, error_type = True, type(final).__name__
            self.store(
                CallRecord(
                    operation=self.operation,
                    requested_model=self.requested_model,
                    stream=self.stream,
                    latency_ms=(time.perf_counter() - attempt.started) * 1000,
                    status=BILLED_UNKNOWN,
                    error_type=error_type,
                    usage_reported=False,
                    client_request_id=attempt.client_request_id,
                    service_tier=self.asked_tier(),
                )
            )
        return covered

    def asked_tier(self) -> str | None:
        """The tier the request asked for, for a call that was never answered (no response
        says which served it): ``flex`` and ``priority`` are served as asked or refused, and
        ``fast`` (Fast mode) is served as ``priority``, which its answer would have said;
        ``auto`` and ``default`` leave it to the provider (None: the default)."""
        asked = self.body.get("service_tier") if isinstance(self.body, dict) else None
        tier = served_tier(asked) if isinstance(asked, str) else None  # (pricing's names)
        return tier if tier in ("flex", "priority") else None

    # -- outcomes --------------------------------------------------------------------------------
    def new_call(self, request_id: str | None = None) -> CallRecord:
        """This call's record as answered now (status ``ok``), before its usage is read."""
        call = CallRecord(
            operation=self.operation,
            requested_model=self.requested_model,
            request_id=request_id,
            client_request_id=self.client_request_id,
            batch=self.batch,
            stream=self.stream,
            latency_ms=(time.perf_counter() - self.started) * 1000,
            project=self.project,
            api_key_hint=self.api_key_hint,
        )
        if self.created_at is not None:
            call.created_at = self.created_at
        return call

    def record(self, **fields: Any) -> None:
        """Record this call with ``fields`` (CallRecord's) set on :meth:`new_call`'s record."""
        call = self.new_call()
        for name, value in fields.items():
            setattr(call, name, value)
        self.store(call)

    def store(self, call: CallRecord) -> None:
        """Record ``call`` in the scope the call began in (which prices it when it settles),
        or, priced now, on its own."""
        if call.operation == "image":
            image_details(call, self.body)
        scope = self.scope
        call.unpriced = True
        if scope is None or scope.record(call) is None:
            price_call(call)
            hand_to_sink(call, scope)
        counter = tracked.get()
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

    def failed(self, exc: BaseException) -> None:
        """The call raised ``exc`` to the caller: record what it billed, or may have."""
        last = self.attempts[-1] if self.attempts else None
        if last is not None and last.error is None:
            sent = raised_while_sending(exc)
            if sent is not None and may_have_been_billed(sent):
                last.error = sent
        if not self.settle_unanswered(exc):
            self.error(exc)


def raised_while_sending(exc: BaseException) -> BaseException | None:
    """``exc``, or the error it was raised from (the SDK wraps a transport's), when it was
    raised while an attempt was being sent or its answer awaited: inside the SDK's
    ``_send_request``.  None when it was raised anywhere else (before sending, on an answer)."""
    for candidate in (exc, exc.__cause__):
        tb = None if candidate is None else candidate.__traceback__
        while tb is not None:
            if tb.tb_frame.f_code.co_name == "_send_request":
                return candidate
            tb = tb.tb_next
    return None


def key_hint(key: object) -> str | None:
    """An API key as OpenAI's dashboard shows it (``sk-proj...abcd``): its kind and, for a key
    long enough that four characters give nothing away, its last four.  Never the key."""
    if not isinstance(key, str) or not key.startswith("sk-"):
        return None
    kind = "-".join(key.split("-")[:2]) if key.count("-") >= 2 else "sk"
    return f"{kind}...{key[-4:]}" if len(key) >= 32 else f"{kind}..."


# -- reading usage ---------------------------------------------------------------------------------
def get(obj: Any, *names: str) -> Any:
    """``obj.a.b`` (or ``obj["a"]["b"]``), None where any step is missing."""
    for name in names:
        if obj is None:
            return None
        obj = obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)
    return obj


def attribute(obj: Any, name: str) -> Any:
    """``obj.name``, None when missing (``get`` for one step of an SDK object)."""
    return getattr(obj, name, None)


#: The CallRecord fields :func:`read_usage` sets.
USAGE_FIELDS = (
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    "cache_write_tokens",
    "input_image_tokens",
    "input_audio_tokens",
    "reasoning_tokens",
    "output_audio_tokens",
    "usage_reported",
)


#: The names of each level of a ``usage`` (chat and completions; responses and images; the
#: details of its input and of its output), and their readers of an SDK object.
_CHAT_NAMES = (
    "prompt_tokens",
    "completion_tokens",
    "prompt_tokens_details",
    "completion_tokens_details",
)
_TOKENS_NAMES = ("input_tokens", "output_tokens", "input_tokens_details", "output_tokens_details")
_INPUT_NAMES = ("cached_tokens", "cache_write_tokens", "image_tokens", "audio_tokens")
_OUTPUT_NAMES = ("reasoning_tokens", "audio_tokens")
_CHAT_USAGE = attrgetter(*_CHAT_NAMES)
_TOKENS_USAGE = attrgetter(*_TOKENS_NAMES)
_INPUT_DETAILS = attrgetter(*_INPUT_NAMES)
_OUTPUT_DETAILS = attrgetter(*_OUTPUT_NAMES)


def read_usage(call: CallRecord, usage: Any) -> None:
    """Set ``call``'s counts from the provider's ``usage`` (every billing dimension it
    reports): the SDK's object, read by attribute, or its JSON as a dict."""
    if usage is None:
        call.usage_reported = False
        return
    by_tokens = call.operation in ("responses", "image")
    try:  # the SDK's objects: each level read in one step
        inp, out, details, out_details = (_TOKENS_USAGE if by_tokens else _CHAT_USAGE)(usage)
        cached, written, images, audio = (
            (0, 0, 0, 0) if details is None else _INPUT_DETAILS(details)
        )
        reasoning, audio_out = (0, 0) if out_details is None else _OUTPUT_DETAILS(out_details)
    except AttributeError:  # a dict, an older SDK's object without a field: name by name
        inp, out, details, out_details = _read(usage, _TOKENS_NAMES if by_tokens else _CHAT_NAMES)
        cached, written, images, audio = _read(details, _INPUT_NAMES)
        reasoning, audio_out = _read(out_details, _OUTPUT_NAMES)
    call.input_tokens = inp or 0
    call.output_tokens = out or 0
    call.usage_reported = inp is not None or out is not None
    call.cached_input_tokens = cached or 0
    call.cache_write_tokens = written or 0
    call.input_image_tokens = images or 0
    call.input_audio_tokens = audio or 0
    call.reasoning_tokens = reasoning or 0
    call.output_audio_tokens = audio_out or 0


def _read(obj: Any, names: tuple[str, ...]) -> list[Any]:
    """``obj``'s ``names`` (a dict's keys or an object's attributes), None where missing."""
    if obj is None:
        return [None] * len(names)
    read = get if isinstance(obj, dict) else attribute
    return [read(obj, name) for name in names]


def usage_fields(operation: str, usage: Any) -> dict[str, Any]:
    """The provider's ``usage`` as CallRecord fields (:func:`read_usage`'s, as a dict)."""
    call = CallRecord(operation)
    read_usage(call, usage)
    return {name: getattr(call, name) for name in USAGE_FIELDS}


#: Responses API output items billed per call, by the CallRecord field that counts them.
TOOL_CALLS = {"web_search_call": "web_search_calls", "file_search_call": "file_search_calls"}


def tool_calls(output: Any) -> dict[str, int]:
    """Billed tool calls among a response's output items."""
    counts = dict.fromkeys(TOOL_CALLS.values(), 0)
    for item in output or ():
        name = TOOL_CALLS.get(get(item, "type") or "")
        if name is not None:
            counts[name] += 1
    return counts


def image_details(call: CallRecord, body: dict[str, Any]) -> None:
    default_size, default_quality = _IMAGE_DEFAULTS.get(call.requested_model or "", (None, None))
    size = call.image_size or body.get("size") or default_size
    quality = call.image_quality or body.get("quality") or default_quality
    call.image_size = None if size == "auto" else size
    call.image_quality = None if quality == "auto" else quality


#: What every answer's record reads of it: in one step from the SDK's object.
_ANSWER_NAMES = ("_request_id", "usage", "model", "service_tier")
_ANSWER = attrgetter(*_ANSWER_NAMES)


def record_parsed(pending: PendingCall, parsed: Any, request_id: str | None) -> None:
    """Record a complete (non-streamed) answer, an SDK object or its JSON as a dict."""
    read = get if isinstance(parsed, dict) else attribute
    try:  # most calls: an SDK object with all four (a chat completion, a response)
        given_id, usage, model, tier = _ANSWER(parsed)
    except AttributeError:  # a dict, an answer without one of them: name by name
        given_id, usage, model, tier = (read(parsed, name) for name in _ANSWER_NAMES)
    call = pending.new_call(request_id or given_id)
    read_usage(call, usage)
    operation = call.operation
    if operation == "image":
        call.image_count = len(read(parsed, "data") or [])
        call.image_size = read(parsed, "size")
        call.image_quality = read(parsed, "quality")
        if not call.usage_reported and not (pending.requested_model or "").startswith("gpt-image"):
            call.usage_reported = True  # dall-e has no token usage by design
    else:
        call.response_model = model
        if operation == "responses":
            for name, count in tool_calls(read(parsed, "output")).items():
                setattr(call, name, count)
    call.service_tier = tier
    pending.store(call)


def contain(exc: Exception, what: str = "record an openai call") -> None:
    """A metering step raised ``exc`` (call it in the ``except``): an interrupt goes on to the
    task (a soft time limit must reach it), a bug is logged."""
    if is_interrupt(exc):
        raise exc
    logger.exception("tokenmeter failed to %s", what)


def safe(fn: Any, *args: Any, default: Any = None) -> Any:
    """Run a metering step; a bug in it is logged, an interrupt goes on to the task."""
    try:
        return fn(*args)
    except Exception as exc:
        contain(exc)
        return default


async def safe_async(fn: Any, *args: Any) -> None:
    try:
        await fn(*args)
    except Exception as exc:
        contain(exc)
