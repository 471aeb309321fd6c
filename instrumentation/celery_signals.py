"""Make every Celery task a usage scope, and persist it whatever the outcome.

::

    from .celery_signals import install
    install(app)                      # every task; or install(app, tasks=["shop.*"])

- ``task_prerun`` opens a root scope (kind ``task``, task id and name, attempt =
  ``request.retries``, worker hostname) and keeps it on the task's request.
- ``task_postrun`` closes it whatever the state (SUCCESS, FAILURE, RETRY, REVOKED...), which
  flushes it to the database in one transaction (or to the spool).
- ``worker_process_init`` drops database engines inherited through fork and re-instruments the
  openai client in the child.
- with task events on (``celery worker -E`` or ``worker_send_task_events``), a ``task-usage``
  event carries the task's totals to monitors; ``reporting/flowerconfig.py`` makes Flower
  show them.
- ``worker_ready`` runs recovery once (spool replay, write-ahead orphans) and then every
  ``TOKENMETER_RECOVERY_INTERVAL_S`` seconds in a daemon thread of the main process.

Handlers stay tiny; state lives on the scope and the request, not in module globals.  Works
under the prefork, threads and solo pools: the scope is in a ``ContextVar`` set and reset in
the same frame Celery runs the task in.
"""

from __future__ import annotations

import atexit
import fnmatch
import logging
import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from celery import Celery, Task, signals

from .budgets import BUDGET_LABEL, Budgets, parse_budget
from .context import (
    CallRecord,
    UsageScope,
    close_scope,
    get_sink,
    is_interrupt,
    open_scope,
    set_sink,
)
from .db import dispose_after_fork
from .filewal import FileWriteAheadLog
from .identity import fallback_identity, ledger_identity, redis_namespace
from .recovery import Recovery, RecoveryReport
from .settings import get_settings, write_ahead_mode
from .sink import DatabaseSink, RedisSpool, connect_redis, default_spool
from .wal import WriteAheadLog, attach_write_ahead
from .writer import BackgroundWriter

logger = logging.getLogger("tokenmeter.celery")

_REQUEST_ATTR = "_tokenmeter_scope"
_BUDGET_OPTION = "tokenmeter_budget_usd"


def _redis_url(app: Celery) -> str | None:
    """TOKENMETER_REDIS_URL, else the broker's URL (used only when it is Redis)."""
    return get_settings().tokenmeter_redis_url or str(app.conf.broker_url or "") or None


class CeleryMetering:
    """The integration for one Celery app: ``install()`` wires it, ``uninstall()`` unwires it.

    Building one does no I/O: settings are read, Redis is connected and the sink is built by
    :meth:`install`.  :meth:`uninstall` undoes exactly what :meth:`install` did (signals, the
    openai patch if it made it, the budget guard, the sink, the recovery thread, the metrics
    server, the Redis connection).  One installation is active per process: installing the
    same one again changes nothing, installing a second one is an error.
    """

    def __init__(
        self,
        app: Celery,
        tasks: Iterable[str] | Callable[[Task], bool] | None = None,
        *,
        sink: DatabaseSink | None = None,
        write_ahead: bool | str | None = None,
        redis_client: Any | None = None,
        budgets: Budgets | None = None,
        recovery_interval_s: float | None = None,
        instrument_openai: bool = True,
    ) -> None:
        self.app = app
        self._wanted = self._task_filter(tasks)
        self._options_sink = sink
        self._options_write_ahead = write_ahead
        self._options_redis = redis_client
        self._options_budgets = budgets
        self._options_recovery_interval_s = recovery_interval_s
        self.instrument_openai = instrument_openai
        # set by install(), cleared by uninstall()
        self.installed = False
        self.redis: Any = None
        self.sink: DatabaseSink | None = None
        self.wal: WriteAheadLog | None = None
        self.file_wal: FileWriteAheadLog | None = None
        self.writer: BackgroundWriter | None = None
        self.namespace = "tokenmeter"  # Redis keys: tokenmeter:<ledger id>:...
        self._provisional: Recovery | None = None
        self.budgets: Budgets | None = None
        self.recovery_interval_s = 0.0
        self.metrics_port: int | None = None
        self._data_dir: Path | None = None
        self._metrics_ready = False
        self._metrics: Any = None
        self._otel: Any = None
        self.otel = False
        self._metrics_server: Any = None
        self._patched_openai = False
        self._owns_redis = False
        self._previous_sink: Any = None
        self._stop = threading.Event()
        self._wake = threading.Event()  # a child was lost: recover now, not at the next tick
        self._thread: threading.Thread | None = None
        #: Send ``task-usage`` events?  The worker's own answer (``-E`` or the setting), taken
        #: at worker_init; else the setting, read at a process's first task (once: Celery's
        #: configuration lookup costs a task more than the rest of its end does).
        self._task_events: bool | None = None

    @staticmethod
    def _task_filter(
        tasks: Iterable[str] | Callable[[Task], bool] | None,
    ) -> Callable[[Task], bool]:
        if callable(tasks):
            return tasks
        if tasks is None:
            return lambda task: not task.name.startswith("celery.")
        patterns = list(tasks)
        return lambda task: any(fnmatch.fnmatchcase(task.name, p) for p in patterns)

    # -- signal handlers ---------------------------------------------------------------------
    def on_prerun(self, task_id: str, task: Task, **_: Any) -> None:
        if not self._wanted(task):
            return
        request = task.request
        labels = {}
        budget = getattr(task, _BUDGET_OPTION, None) or getattr(request, _BUDGET_OPTION, None)
        if budget is None and isinstance(request.headers, dict):
            budget = request.headers.get(_BUDGET_OPTION)
        if budget is not None:
            try:
                labels[BUDGET_LABEL] = str(parse_budget(budget))
            except ValueError as exc:
                logger.error(
                    "task %s (%s): %s; it runs without a task budget", task_id, task.name, exc
                )
        scope, token = open_scope(
            "task",
            task_id,
            task_id=task_id,
            task_name=task.name,
            attempt=request.retries or 0,
            hostname=request.hostname,
            labels=labels,
        )
        setattr(request, _REQUEST_ATTR, (scope, token))
        if scope.parent is not None:
            # a task run eagerly inside another (``.apply()``): its calls are the outer task's
            # execution, whose listeners are already there; adding them again would count
            # every later call twice in the write-ahead log, the budget and the metrics
            return
        for log in (self.file_wal, self.wal):
            if log is None:
                continue
            try:
                log.attach(scope)
            except Exception as exc:
                if is_interrupt(exc):
                    raise
                logger.warning("write-ahead log unavailable for task %s", task_id, exc_info=True)
        if self.budgets is not None:
            scope.listeners.append(self.budgets.on_call)
        if self.metrics_port:
            scope.listeners.append(self._metrics_listener)
        if self.otel:
            scope.listeners.append(self._otel_listener)

    def _otel_listener(self, scope: UsageScope, call: CallRecord) -> None:
        if self._otel is None:  # created in the process that records (after fork)
            try:
                from .otel import OTelExport

                self._otel = OTelExport()
            except ImportError:
                self.otel = False  # said once; the task's next calls are not exported
                logger.warning(
                    "TOKENMETER_OTEL is on but opentelemetry-api is not installed: "
                    "pip install 'tokenmeter[otel]' (calls are metered, not exported)"
                )
                return
        self._otel.export(call)

    def _metrics_listener(self, scope: UsageScope, call: CallRecord) -> None:
        if self._metrics is None:  # created in the process that records (after fork)
            from .metrics import Metrics

            self._metrics = Metrics()
        self._metrics.observe_call(call)

    def on_postrun(self, task_id: str, task: Task, state: str | None = None, **kw: Any) -> None:
        pair = getattr(task.request, _REQUEST_ATTR, None)
        if pair is None:
            return
        delattr(task.request, _REQUEST_ATTR)
        scope, token = pair
        scope.labels["state"] = state or "UNKNOWN"
        retval = kw.get("retval")
        close_scope(scope, token, retval if isinstance(retval, BaseException) else None)
        events = self._task_events
        if events is None:
            events = self._task_events = bool(self.app.conf.worker_send_task_events)
        if events and not task.request.is_eager:
            self._send_usage_event(task, scope)

    @staticmethod
    def _send_usage_event(task: Task, scope: UsageScope) -> None:
        """A ``task-usage`` event, so monitors (Flower) show each task's usage."""
        totals = scope.totals
        try:
            task.send_event(
                "task-usage",
                retry=False,
                openai_calls=totals.calls,
                input_tokens=totals.input_tokens,
                cached_input_tokens=totals.cached_input_tokens,
                output_tokens=totals.output_tokens,
                reasoning_tokens=totals.reasoning_tokens,
                image_count=totals.image_count,
                cost_usd=None if totals.cost_usd is None else str(totals.cost_usd),
            )
        except Exception:
            logger.debug("could not send the task-usage event", exc_info=True)

    def on_worker_init(self, sender: Any = None, **_: Any) -> None:
        """In the worker's main process, before the pool starts: the price data, loaded whole
        for the pool's children to inherit (see ``maintained.load``); whether it sends task
        events (``celery worker -E`` turns them on without the setting); the metrics folder."""
        try:
            from .maintained import load

            load()
        except Exception:  # pricing loads it again where it is needed, and says so there
            logger.exception("could not load the maintained price data")
        events = getattr(sender, "task_events", None)
        if isinstance(events, bool):
            self._task_events = events
        if not self.metrics_port:
            return
        from .metrics import prepare_multiprocess

        assert self._data_dir is not None
        self._metrics_ready = prepare_multiprocess(self._data_dir) is not None

    def on_process_shutdown(self, pid: int | None = None, **_: Any) -> None:
        if self.writer is not None:  # what is left is in the write-ahead file if this fails
            self.writer.close(timeout=get_settings().database_timeout_s * 2)
        if self.metrics_port and self._metrics is not None:
            from .metrics import mark_process_dead

            mark_process_dead(pid or os.getpid())

    def on_process_init(self, **_: Any) -> None:
        dispose_after_fork()
        if self.instrument_openai:  # idempotent: a forked child already has the patch
            from . import openai_hooks

            openai_hooks.instrument()

    def on_worker_ready(self, sender: Any = None, **_: Any) -> None:
        self._watch_children(sender)
        if self.metrics_port and self._metrics_ready:
            from .metrics import serve

            self._metrics_server = serve(self.metrics_port)
            logger.info("metrics on http://127.0.0.1:%d/metrics", self.metrics_port)
        self.recover_once()
        if self.recovery_interval_s > 0 and self._thread is None:
            self._thread = threading.Thread(
                target=self._recovery_loop, name="tokenmeter-recovery", daemon=True
            )
            self._thread.start()

    def on_worker_shutdown(self, **_: Any) -> None:
        self._stop.set()
        self._wake.set()
        if self.writer is not None:  # solo and threads pools run tasks in this process
            self.writer.close(timeout=get_settings().database_timeout_s * 2)
        if self.wal is not None:
            self.wal.stop()
        if self.sink is not None:  # a child killed just before the stop: its calls, now
            try:
                self.recover_once()
            except Exception:
                logger.exception("recovery at shutdown failed")

    def _watch_children(self, consumer: Any) -> None:
        """Recover as soon as the pool reports a child gone (prefork), not at the next tick."""
        pool = getattr(getattr(consumer, "pool", None), "_pool", None)
        original = getattr(pool, "on_process_down", None)
        if pool is None or not callable(original) or getattr(original, "_tokenmeter", False):
            return
        wake = self._wake

        def on_process_down(proc: Any) -> Any:
            try:
                return original(proc)
            finally:
                wake.set()

        on_process_down._tokenmeter = True  # type: ignore[attr-defined]
        pool.on_process_down = on_process_down

    # -- the writer ----------------------------------------------------------------------------
    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every task that ended in this process so far is in the ledger (or
        spooled); False if that took longer than ``timeout`` seconds."""
        return self.writer is None or self.writer.flush(timeout)

    # -- recovery ----------------------------------------------------------------------------
    def recover_once(self) -> RecoveryReport:
        """Replay the spool and flush orphaned write-ahead executions."""
        if self.sink is None:
            raise RuntimeError("tokenmeter is not installed: call install() first")
        report = Recovery(self.sink, self.wal, self.file_wal).run_once()
        if self._provisional is not None:
            self._provisional.run_once()
        return report

    def _provisional_recovery(self, ledger: str | None) -> Recovery | None:
        """What a start before the ledger's id was known left under its provisional name
        (``tokenmeter:url-...``): recovered into this ledger, which that name stands for."""
        if self.redis is None or not ledger or ledger.startswith("url-"):
            return None
        namespace = redis_namespace(fallback_identity())
        sink = DatabaseSink(
            self.sink.database_url if self.sink is not None else None,
            spool=RedisSpool(self.redis, f"{namespace}:spool"),
            ledger_id=ledger,
        )
        lease = get_settings().tokenmeter_wal_lease_s
        return Recovery(sink, attach_write_ahead(sink, self.redis, lease, namespace))

    def _recovery_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.recovery_interval_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.recover_once()
            except Exception:
                logger.exception("recovery failed")

    # -- wiring ----------------------------------------------------------------------------
    _SIGNALS = (
        (signals.task_prerun, "on_prerun"),
        (signals.task_postrun, "on_postrun"),
        (signals.worker_init, "on_worker_init"),
        (signals.worker_process_init, "on_process_init"),
        (signals.worker_process_shutdown, "on_process_shutdown"),
        (signals.worker_ready, "on_worker_ready"),
        (signals.worker_shutdown, "on_worker_shutdown"),
    )

    def _build(self) -> None:
        """Connect Redis and build the sink, write-ahead log and budgets (install's I/O)."""
        settings = get_settings()
        self._owns_redis = self._options_redis is None
        self.redis = self._options_redis or connect_redis(_redis_url(self.app))
        given = self._options_sink
        ledger = given.ledger_id if given is not None else ledger_identity()
        self.namespace = namespace = redis_namespace(ledger)
        self.sink = given or DatabaseSink(
            spool=default_spool(self.redis, ledger, namespace), ledger_id=ledger
        )
        mode = write_ahead_mode(
            settings.tokenmeter_write_ahead
            if self._options_write_ahead is None
            else self._options_write_ahead
        )
        self.wal = (
            attach_write_ahead(self.sink, self.redis, settings.tokenmeter_wal_lease_s, namespace)
            if mode == "redis" and self.redis is not None
            else None
        )
        self.file_wal = FileWriteAheadLog(settings.wal_dir, ledger) if mode != "off" else None
        self._provisional = self._provisional_recovery(ledger)
        if self.file_wal is not None:
            self.sink.after_flush.append(self.file_wal.after_flush)
            if settings.tokenmeter_flush == "background":  # the writer runs behind the log
                self.writer = BackgroundWriter(
                    self.sink,
                    on_queued=[self.file_wal.closed],
                    on_committed=[self.file_wal.committed],
                    linger_s=settings.tokenmeter_flush_interval_s,
                )
                self.file_wal.defer_done = True
                self.sink.writer = self.writer
        self.budgets = self._options_budgets
        if self.budgets is None and (
            settings.tokenmeter_task_budget_usd is not None
            or settings.tokenmeter_daily_budget_usd is not None
        ):
            self.budgets = Budgets(
                settings.tokenmeter_task_budget_usd,
                settings.tokenmeter_daily_budget_usd,
                self.redis,
                fail_open=settings.tokenmeter_budget_fail_open,
                namespace=namespace,
            )
        self.recovery_interval_s = (
            settings.tokenmeter_recovery_interval_s
            if self._options_recovery_interval_s is None
            else self._options_recovery_interval_s
        )
        self.metrics_port = settings.tokenmeter_metrics_port
        self.otel = settings.tokenmeter_otel
        self._data_dir = settings.tokenmeter_data_dir

    def install(self) -> CeleryMetering:
        global _active
        with _active_lock:
            if _active is self:
                return self
            if _active is not None:
                raise RuntimeError(
                    f"tokenmeter is already installed on Celery app {_active.app.main!r}; "
                    "call tokenmeter.uninstall() first"
                )
            self._build()
            assert self.sink is not None
            self._stop = threading.Event()
            self._previous_sink = set_sink(self.sink)
            if self.budgets is not None:
                self.budgets.install()
            for signal, handler in self._SIGNALS:
                signal.connect(
                    getattr(self, handler), weak=False, dispatch_uid=f"tokenmeter.{handler}"
                )
            if self.instrument_openai:
                self._patched_openai = _instrument_openai()
            from .reporting.tasks import register

            register(self.app)  # tokenmeter.audit, for beat
            self.installed = True
            _active = self
        return self

    def uninstall(self) -> None:
        """Undo :meth:`install`, in the reverse order.  A no-op when not installed."""
        global _active
        with _active_lock:
            if not self.installed:
                return
            self._stop.set()
            self._task_events = None
            if self._thread is not None:
                self._thread.join(timeout=5)
                self._thread = None
            if self._metrics_server is not None:
                server, thread = self._metrics_server
                server.shutdown()
                server.server_close()
                thread.join(timeout=5)
                self._metrics_server = None
            if self._patched_openai:
                _uninstrument_openai()
                self._patched_openai = False
            for signal, handler in reversed(self._SIGNALS):
                signal.disconnect(dispatch_uid=f"tokenmeter.{handler}")
            if self.budgets is not None:
                self.budgets.uninstall()
            if self.writer is not None:
                self.writer.close()
                if self.sink is not None and self.sink.writer is self.writer:
                    self.sink.writer = None
            if self.wal is not None:
                self.wal.stop()
            if self.file_wal is not None:
                self.file_wal.close()
                if self.sink is not None and self.file_wal.after_flush in self.sink.after_flush:
                    self.sink.after_flush.remove(self.file_wal.after_flush)
            if get_sink() is self.sink:
                set_sink(self._previous_sink)
            if self._owns_redis and self.redis is not None:
                self.redis.close()
            self.redis = self.sink = self.wal = self.file_wal = self.budgets = None
            self.writer = None
            self._provisional = None
            self.installed = False
            if _active is self:
                _active = None


_active_lock = threading.RLock()
_active: CeleryMetering | None = None


def active() -> CeleryMetering | None:
    """The installation active in this process, if any."""
    return _active


def _instrument_openai() -> bool:
    """Patch the openai client; True when this call patched it (so uninstall restores it)."""
    from . import openai_hooks

    if openai_hooks.is_instrumented():
        return False
    return openai_hooks.instrument()


def _uninstrument_openai() -> None:
    from . import openai_hooks

    openai_hooks.uninstrument()


def install(
    app: Celery,
    tasks: Iterable[str] | Callable[[Task], bool] | None = None,
    **options: Any,
) -> CeleryMetering:
    """Meter every task of ``app`` (or those matching ``tasks``).  Returns the handle."""
    return CeleryMetering(app, tasks, **options).install()


def uninstall() -> None:
    """Undo :func:`install` (signals, the openai patch, threads).  A no-op if not installed."""
    current = _active
    if current is not None:
        current.uninstall()


def flush(timeout: float | None = None) -> bool:
    """Wait until every task that ended in this process so far is durable in the ledger (or,
    with the database down, in the spool).  False if ``timeout`` seconds passed first.

    The worker writes closed tasks from a background thread, so a row is visible shortly after
    its task ends (milliseconds when idle; see the README for the latency under load); tests
    and scripts that read the ledger right after running tasks call this first.
    """
    from .writer import flush_all

    return flush_all(timeout)


@atexit.register
def _drain_at_exit() -> None:
    """A script or an eager run ending: write what its writer still holds."""
    current = _active
    if current is not None and current.writer is not None:
        current.writer.close(timeout=get_settings().database_timeout_s * 2)
