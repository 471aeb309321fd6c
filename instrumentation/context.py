"""The usage context: which scope an OpenAI call belongs to, carried by a ``ContextVar``.

A scope is opened around a unit of work (a Celery task, a pipeline run, one scanned post, a
script) with :func:`usage_scope`.  Scopes nest; a call is recorded in its innermost scope and
its numbers roll up to every ancestor.  A call is recorded unpriced, so that pricing costs its
caller nothing: the tree is *settled* (each call priced and added up) when its totals or calls
are read, when a listener needs the price, and by the ledger's writer
(:meth:`UsageScope.settle`).  When a *root* scope closes, the whole tree is handed to
the configured :class:`Sink` (the database sink in a worker).  A call made outside any scope is
handed to the sink on its own (``scope_kind`` None): recorded, never dropped.

Because the current scope lives in a ``ContextVar`` it follows ``asyncio`` tasks by itself; a
thread started inside a scope gets it by running under ``contextvars.copy_context()`` (see
:func:`run_in_scope_thread`).  Nothing here keeps a process-global history.
"""

from __future__ import annotations

import contextvars
import itertools
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from types import TracebackType
from typing import Any, Protocol, TypeVar

from .ids import new_id

logger = logging.getLogger(__name__)

_current: contextvars.ContextVar[UsageScope | None] = contextvars.ContextVar(
    "tokenmeter_usage_scope", default=None
)


#: Exceptions a worker raises *into* running code to stop it (Celery/billiard's soft time
#: limit, termination).  They derive from Exception, so a broad ``except Exception`` in metering
#: code would swallow them and the task would run on: metering re-raises them instead.
INTERRUPTS = frozenset({"SoftTimeLimitExceeded", "TimeLimitExceeded", "Terminated"})


def is_interrupt(exc: BaseException) -> bool:
    """True for an exception meant to stop the task, which metering must never swallow."""
    if not isinstance(exc, Exception):
        return True  # KeyboardInterrupt, SystemExit, GeneratorExit...
    return any(cls.__name__ in INTERRUPTS for cls in type(exc).__mro__)


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(slots=True)
class CallRecord:
    """One OpenAI API call as the provider billed it.  Becomes one ``openai_calls`` row.

    Token numbers come from the response's ``usage`` only (0 with ``usage_reported=False`` when
    the provider sent none).  No prompt or completion text is ever held here.
    """

    operation: str  # "chat" | "responses" | "embedding" | "image" | "completion" | ...
    requested_model: str | None = None
    response_model: str | None = None
    request_id: str | None = None
    client_request_id: str | None = None  # the X-Client-Request-Id the request carried
    service_tier: str | None = None  # as the response says it was served (not as asked)
    batch: bool = False  # billed at the Batch API's price
    input_tokens: int = 0  # every input token; the next four are parts of it
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    input_image_tokens: int = 0
    input_audio_tokens: int = 0
    output_tokens: int = 0  # every output token; reasoning and audio are parts of it
    reasoning_tokens: int = 0
    output_audio_tokens: int = 0
    image_count: int = 0
    image_size: str | None = None
    image_quality: str | None = None
    web_search_calls: int = 0  # tool calls billed per call (Responses API output items)
    file_search_calls: int = 0
    usage_reported: bool = True
    stream: bool = False
    cost_usd: Decimal | None = None
    price_source: str | None = None  # "genai-prices 0.2.3", "tokenmeter", "file:..."
    price_version: str | None = None  # the row (and variant) that priced it
    latency_ms: float | None = None
    #: "ok" | "error" (answered with an error: billed nothing) | "incomplete" (a stream closed
    #: early: usage unknown) | "billed_unknown" (sent, never answered: the provider may have
    #: billed it) | "blocked" (refused by a budget before it was sent)
    status: str = "ok"
    error_type: str | None = None
    http_status: int | None = None
    created_at: datetime = field(default_factory=_utcnow)
    # attribution: filled in when the call is recorded in a scope
    task_id: str | None = None
    task_name: str | None = None
    attempt: int = 0
    execution_id: str = ""  # set when recorded: the scope's, or a fresh one when unscoped
    seq: int = 0
    scope_kind: str | None = None
    scope_ref: str | None = None
    hostname: str | None = None
    project: str | None = None  # the OpenAI project the client named (OpenAI-Project)
    api_key_hint: str | None = None  # which key called, as OpenAI shows it: never the key
    #: True from its capture until it is priced (off the task's path: see UsageScope.settle)
    unpriced: bool = False

    @property
    def model(self) -> str | None:
        """The model billed: what the response says it was, else what was asked for."""
        return self.response_model or self.requested_model

    @property
    def image_tokens(self) -> int:
        """Tokens spent on images: image input, plus the output of an image generation."""
        return self.input_image_tokens + (self.output_tokens if self.operation == "image" else 0)


#: The counts a call reports that add up over a scope (and a rollup can sum).
SUMMED_FIELDS = (
    "input_tokens",
    "cached_input_tokens",
    "cache_write_tokens",
    "input_image_tokens",
    "input_audio_tokens",
    "output_tokens",
    "reasoning_tokens",
    "output_audio_tokens",
    "image_count",
    "web_search_calls",
    "file_search_calls",
)


@dataclass(slots=True)
class UsageTotals:
    """Running sums over calls.  ``cost_usd`` is exact; ``uncosted_calls`` counts unknown prices."""

    calls: int = 0
    errors: int = 0
    input_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    input_image_tokens: int = 0
    input_audio_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    output_audio_tokens: int = 0
    image_count: int = 0
    web_search_calls: int = 0
    file_search_calls: int = 0
    priced_cost_usd: Decimal = Decimal(0)
    uncosted_calls: int = 0

    def add(self, call: CallRecord) -> None:
        self.calls += 1
        if call.status != "ok":
            self.errors += 1
        # SUMMED_FIELDS, spelled out (twice as fast as a loop of getattr/setattr, on every
        # call and every ancestor scope); test_context checks the two lists agree
        self.input_tokens += call.input_tokens
        self.cached_input_tokens += call.cached_input_tokens
        self.cache_write_tokens += call.cache_write_tokens
        self.input_image_tokens += call.input_image_tokens
        self.input_audio_tokens += call.input_audio_tokens
        self.output_tokens += call.output_tokens
        self.reasoning_tokens += call.reasoning_tokens
        self.output_audio_tokens += call.output_audio_tokens
        self.image_count += call.image_count
        self.web_search_calls += call.web_search_calls
        self.file_search_calls += call.file_search_calls
        if call.cost_usd is not None:
            self.priced_cost_usd += call.cost_usd
        elif _is_billable(call):
            self.uncosted_calls += 1

    @property
    def cost_usd(self) -> Decimal | None:
        """Exact total, or None when any billable call's price is unknown (never a false 0)."""
        return None if self.uncosted_calls else self.priced_cost_usd

    @classmethod
    def of(cls, calls: list[CallRecord]) -> UsageTotals:
        totals = cls()
        for call in calls:
            totals.add(call)
        return totals


def _is_billable(call: CallRecord) -> bool:
    """Did the provider (maybe) bill this call?  Failed and refused calls bill nothing."""
    if call.status in ("error", "blocked"):
        return bool(call.input_tokens or call.output_tokens)
    return True


class Sink(Protocol):
    """Where closed root scopes and unscoped calls go (``tokenmeter.sink`` in a worker)."""

    def scope_closed(self, scope: UsageScope) -> None: ...

    def unscoped_call(self, call: CallRecord) -> None: ...


class Rollup(Protocol):
    """A row the application wants kept equal to a scope's totals (see ``rollups.TableRollup``).

    ``apply`` runs inside the flush transaction with the calls of the bound scope's subtree that
    were newly inserted into the ledger; ``to_json`` lets it survive the spool and write-ahead log.
    """

    def apply(self, session: Any, new_calls: list[CallRecord]) -> None: ...

    def to_json(self) -> dict[str, Any]: ...


CallListener = Callable[["UsageScope", CallRecord], None]
RollupListener = Callable[["UsageScope", Rollup], None]
CallGuard = Callable[["UsageScope | None", str, "str | None"], None]


#: Set (to True) on a call listener that takes a call before it is priced (a write-ahead
#: log: what recovers its lines prices them); a scope with any other listener prices each
#: call as it is recorded, for that listener.
TAKES_UNPRICED = "tokenmeter_takes_unpriced"


F = TypeVar("F", bound=Callable[..., Any])


def takes_unpriced(listener: F) -> F:
    """Mark a call listener as one that takes calls before they are priced (see
    :data:`TAKES_UNPRICED`)."""
    setattr(listener, TAKES_UNPRICED, True)
    return listener


def price_call(call: CallRecord) -> None:
    """Set ``call``'s cost and what priced it, from the process's prices.  A bug in pricing
    leaves the cost unknown (NULL, never $0) and is logged: the call is written all the same."""
    from .pricing import prices  # (pricing imports this module)

    try:
        call.cost_usd, call.price_source, call.price_version = prices().cost_of(call)
    except Exception as exc:
        if is_interrupt(exc):
            raise
        logger.exception(
            "could not price a %s call to %s: its cost is unknown", call.operation, call.model
        )
        call.cost_usd = call.price_source = call.price_version = None
    call.unpriced = False


def price_unpriced(calls: list[CallRecord]) -> None:
    """Price each of ``calls`` captured and not priced yet."""
    for call in calls:
        if call.unpriced:
            price_call(call)


def _by_seq(call: CallRecord) -> int:
    return call.seq


class UsageScope:
    """A unit of work whose OpenAI calls are counted together.  Open one with `usage_scope`."""

    def __init__(
        self,
        kind: str,
        ref: str | None = None,
        *,
        parent: UsageScope | None = None,
        task_id: str | None = None,
        task_name: str | None = None,
        attempt: int = 0,
        hostname: str | None = None,
        labels: dict[str, str] | None = None,
    ) -> None:
        self.kind = kind
        self.ref = None if ref is None else str(ref)
        self.parent = parent
        self.labels: dict[str, str] = dict(labels or {})
        self.children: list[UsageScope] = []
        self._calls: list[CallRecord] = []  # recorded directly in this scope
        self._totals = UsageTotals()  # this scope and all its descendants (settled ones)
        self.rollups: list[Rollup] = []
        self.closed = False
        self._on_close: dict[object, Callable[[], None]] = {}
        self.error: BaseException | None = None
        self.opened_at = _utcnow()
        self._root: UsageScope = self if parent is None else parent._root
        if parent is None:
            self.execution_id = new_id()
            self._scope_ids = itertools.count(0)
            self.task_id, self.task_name, self.attempt, self.hostname = (
                task_id,
                task_name,
                attempt,
                hostname,
            )
            self._lock = threading.Lock()
            self._seq = itertools.count(1)
            self.listeners: list[CallListener] = []
            self.rollup_listeners: list[RollupListener] = []
            #: Calls recorded and not yet priced nor counted in the totals, with their scope
            #: (see :meth:`settle`): the whole tree's, kept by its root.
            self._unsettled: list[tuple[UsageScope, CallRecord]] = []
        else:
            self.execution_id = parent.root.execution_id
            self._scope_ids = parent.root._scope_ids
            self.task_id = task_id or parent.task_id
            self.task_name = task_name or parent.task_name
            self.attempt = attempt or parent.attempt
            self.hostname = hostname or parent.hostname
            self._lock = parent.root._lock
            self._seq = parent.root._seq
            self.listeners = parent.root.listeners
            self.rollup_listeners = parent.root.rollup_listeners
            with self._lock:
                parent.children.append(self)
        self.scope_id: int = next(self._scope_ids)  # 0 for the root, unique in the execution
        #: Scope ids from the root down to this scope (every write-ahead line carries it).
        self.path: tuple[int, ...] = (
            (self.scope_id,) if parent is None else (*parent.path, self.scope_id)
        )

    # -- tree -----------------------------------------------------------------------------
    @property
    def root(self) -> UsageScope:
        """The scope this tree was opened with (its task's, usually)."""
        return self._root

    def walk(self) -> Iterator[UsageScope]:
        """This scope and every descendant, depth first."""
        yield self
        for child in list(self.children):
            yield from child.walk()

    def all_calls(self) -> list[CallRecord]:
        """Every call of this scope and its descendants, in the order they were recorded
        (priced: see :meth:`settle`)."""
        self._root.settle()
        return self.recorded_calls()

    def recorded_calls(self) -> list[CallRecord]:
        """:meth:`all_calls` as recorded: a call not settled yet has no price (the ledger's
        writer prices it; see :meth:`settle`)."""
        with self._lock:
            calls = [c for s in self.walk() for c in s._calls]
        return sorted(calls, key=_by_seq)

    @property
    def calls(self) -> list[CallRecord]:
        """The calls recorded directly in this scope (priced: see :meth:`settle`)."""
        self._root.settle()
        return self._calls

    @property
    def totals(self) -> UsageTotals:
        """The sums over this scope and all its descendants (every call settled first)."""
        self._root.settle()
        return self._totals

    # -- recording --------------------------------------------------------------------------
    def record(self, call: CallRecord) -> CallRecord | None:
        """Attribute ``call`` to this scope; its price and its numbers in the totals of this
        scope and every ancestor follow when the tree is settled (:meth:`settle`).

        None when the root has already been flushed (a thread that outlived its task): the
        caller then records the call in a flush of its own.
        """
        root = self._root
        with self._lock:
            if root.closed:
                return None
            call.seq = next(self._seq)
            call.execution_id = self.execution_id
            self._attribute(call)
            self._calls.append(call)
            root._unsettled.append((self, call))
        listeners = self.listeners
        if listeners and not all(getattr(f, TAKES_UNPRICED, False) for f in listeners):
            root.settle()  # a listener wants the call's price (a budget, the metrics): now
        for listener in listeners:
            try:
                listener(self, call)
            except Exception as exc:  # a metering add-on must never break the caller
                if is_interrupt(exc):
                    raise
                logger.exception("usage listener failed")
        return call

    def settle(self) -> None:
        """Price every call of this scope's tree captured and not priced yet, and add each
        recorded since the last settling to the totals of its scope and every ancestor.

        A call is recorded as the provider's answer reached the caller, and priced and
        counted here: when the totals or the calls are read, when a listener needs the
        price, and for the ledger by its writer (``sink.write_batches`` prices what it
        writes), off the task's path.  Pricing is a function of the call alone (its model,
        tier and day), so when and where it runs changes nothing; a call the writer priced
        first is only counted here.
        """
        root = self._root
        if not root._unsettled:
            return
        with self._lock:
            unsettled, root._unsettled = root._unsettled, []
            for scope, call in unsettled:
                if call.unpriced:
                    price_call(call)
                node: UsageScope | None = scope
                while node is not None:
                    node._totals.add(call)
                    node = node.parent

    def _attribute(self, call: CallRecord) -> None:
        call.task_id, call.task_name = self.task_id, self.task_name
        call.attempt, call.hostname = self.attempt, self.hostname
        call.scope_kind, call.scope_ref = self.kind, self.ref

    def on_close(self, key: object, callback: Callable[[], None]) -> None:
        """Run ``callback`` when this scope closes, before it is flushed (an open stream
        records itself there); ``discard_on_close(key)`` takes it back.  Both without the
        lock (every stream calls them): a dict's item set or popped is atomic, and the
        closing step takes its snapshot of them under the lock."""
        self._on_close[key] = callback

    def discard_on_close(self, key: object) -> None:
        self._on_close.pop(key, None)

    def _run_on_close(self) -> None:
        with self._lock:
            callbacks = list(self._on_close.values())
            self._on_close.clear()
        for callback in callbacks:
            try:
                callback()
            except Exception as exc:
                if is_interrupt(exc):
                    raise
                logger.exception("a closing callback of scope %r failed", self)

    def bind_rollup(self, rollup: Rollup) -> None:
        """Keep an application row equal to this scope's totals when the tree is flushed."""
        with self._lock:
            self.rollups.append(rollup)
        for listener in self.rollup_listeners:
            try:
                listener(self, rollup)
            except Exception as exc:
                if is_interrupt(exc):
                    raise
                logger.exception("rollup listener failed")

    def __repr__(self) -> str:
        return f"<UsageScope {self.kind}:{self.ref} calls={self.totals.calls}>"


# -- sink configuration ------------------------------------------------------------------------
class _LoggingSink:
    """Default until a real sink is configured: says what it got, keeps nothing."""

    def scope_closed(self, scope: UsageScope) -> None:
        t = scope.totals
        logger.info(
            "usage scope %s:%s closed: %d calls, %d in / %d out tokens, cost %s USD (no sink set)",
            scope.kind,
            scope.ref,
            t.calls,
            t.input_tokens,
            t.output_tokens,
            t.cost_usd,
        )

    def unscoped_call(self, call: CallRecord) -> None:
        logger.info("unscoped %s call to %s (no sink set)", call.operation, call.model)


_sink: Sink = _LoggingSink()
_guards: list[CallGuard] = []


def set_sink(sink: Sink | None) -> Sink:
    """Install ``sink`` (None: the logging default); returns the previous one."""
    global _sink
    previous, _sink = _sink, (sink or _LoggingSink())
    return previous


def get_sink() -> Sink:
    return _sink


def add_call_guard(guard: CallGuard) -> None:
    """Run ``guard(scope, operation, model)`` before every call; it may raise to stop the call."""
    if guard not in _guards:
        _guards.append(guard)


def remove_call_guard(guard: CallGuard) -> None:
    if guard in _guards:
        _guards.remove(guard)


def before_call(operation: str, model: str | None) -> None:
    """Called by the hooks before a request is sent; guards (budgets) may raise here."""
    if _guards:
        scope = _current.get()
        for guard in list(_guards):
            guard(scope, operation, model)


_CURRENT = object()


def record_call(call: CallRecord, scope: UsageScope | object | None = _CURRENT) -> CallRecord:
    """Record a finished call in ``scope`` (default: the current one), or hand it to the sink.

    Pass the scope captured when the call *started* when it finishes elsewhere (a stream read
    in another thread or task).
    """
    if scope is _CURRENT:
        scope = _current.get()
    assert scope is None or isinstance(scope, UsageScope)
    if scope is not None and scope.record(call) is not None:
        return call
    return hand_to_sink(call, scope)


def hand_to_sink(call: CallRecord, scope: UsageScope | None) -> CallRecord:
    """Flush a call on its own: made outside any scope, or in ``scope`` after its task's root
    scope was flushed (a thread that outlived the task), whose attribution it then keeps."""
    if scope is not None:
        logger.warning(
            "call in scope %r recorded after its task was flushed; flushing it on its own", scope
        )
        scope._attribute(call)
        call.execution_id = ""
    if not call.execution_id:
        call.execution_id = new_id()  # an unscoped call is an execution of its own
    try:
        _sink.unscoped_call(call)
    except Exception as exc:
        if is_interrupt(exc):
            raise
        logger.exception("sink failed to record an unscoped call")
    return call


# -- opening and closing scopes ----------------------------------------------------------------
def current_scope() -> UsageScope | None:
    """The innermost open scope in this context, or None."""
    return _current.get()


def open_scope(kind: str, ref: str | None = None, **kwargs: Any) -> tuple[UsageScope, Any]:
    """Open a scope under the current one and make it current.  Returns (scope, token).

    For code that cannot use a ``with`` block (Celery signal handlers): pair it with
    :func:`close_scope` in the same context.
    """
    scope = UsageScope(kind, ref, parent=_current.get(), **kwargs)
    return scope, _current.set(scope)


def close_scope(
    scope: UsageScope, token: Any | None = None, error: BaseException | None = None
) -> None:
    """Close ``scope``; a root scope goes to the sink.  Never raises because of the sink."""
    if scope.closed:
        return
    scope._run_on_close()  # what is still open in it (a stream) records itself in it first
    with scope._lock:  # a call recorded from now on sees the root closed (record())
        scope.closed = True
    scope.error = error
    if token is not None:
        try:
            _current.reset(token)
        except ValueError:  # closed from another context (e.g. a different signal thread)
            _current.set(scope.parent)
    elif _current.get() is scope:
        _current.set(scope.parent)
    if scope.parent is None:
        try:
            _sink.scope_closed(scope)
        except Exception as exc:
            if is_interrupt(exc):
                raise
            logger.exception("sink failed to take scope %r", scope)


class usage_scope:
    """Open a usage scope for a block, sync or async::

    with usage_scope("pipeline_run", run.id) as scope:
        client.chat.completions.create(...)
    scope.totals.input_tokens

    async with usage_scope("scanned_post", post.id):
        await aclient.chat.completions.create(...)
    """

    def __init__(self, kind: str, ref: object = None, **labels: str) -> None:
        self._kind = kind
        self._ref = None if ref is None else str(ref)
        self._labels = labels
        self._scope: UsageScope | None = None
        self._token: Any = None

    def __enter__(self) -> UsageScope:
        self._scope, self._token = open_scope(self._kind, self._ref, labels=self._labels)
        return self._scope

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._scope is not None
        close_scope(self._scope, self._token, exc)

    async def __aenter__(self) -> UsageScope:
        return self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, tb)


def run_in_scope_thread(target: Callable[..., Any], *args: Any, **kwargs: Any) -> threading.Thread:
    """Start a thread that runs ``target`` inside the caller's current scope."""
    ctx = contextvars.copy_context()
    thread = threading.Thread(target=ctx.run, args=(target, *args), kwargs=kwargs, daemon=True)
    thread.start()
    return thread
