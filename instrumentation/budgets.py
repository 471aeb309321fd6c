"""Spending caps checked before every OpenAI call.

Two caps, both optional:

- **per task** (the root scope): ``TOKENMETER_TASK_BUDGET_USD``, or per task with the task
  option ``tokenmeter_budget_usd`` / the message header of the same name.
- **per day, shared by every worker**: ``TOKENMETER_DAILY_BUDGET_USD``, an atomic Redis counter
  of 1e-10 USD units per UTC day (``INCRBY`` of integers: exact, no float).

A call's cost is only known once the provider answers, so the guard projects it: what was
spent plus the largest cost this process has seen for a call to the same model.  If that projection
would exceed the cap, the call is not made: :class:`BudgetExceeded` is raised from the client
call and the refusal is recorded in the ledger (status ``blocked``), so "we stopped here" is
auditable.

When Redis cannot be reached the daily cap cannot be checked: by default the call goes ahead
and an error is logged (``TOKENMETER_BUDGET_FAIL_OPEN=false`` refuses it instead); metering
never fails a task because Redis is down.  A malformed per-task budget (``"$5"``) is logged
with what is wrong and the task runs without that cap.  A call whose price is unknown counts
$0 toward both caps (its cost is unknown, shown as NULL in the ledger, never guessed): a
budget bounds what tokenmeter can price.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from .context import (
    CallRecord,
    UsageScope,
    add_call_guard,
    is_interrupt,
    record_call,
    remove_call_guard,
)
from .money import MONEY_SCALE, to_money

logger = logging.getLogger("tokenmeter.budgets")

BUDGET_LABEL = "budget_usd"
DAILY_KEY = "{namespace}:budget:daily:{day}"


class BudgetExceeded(RuntimeError):
    """An OpenAI call was refused because it would exceed a spending cap.

    Its ``args`` are plain strings, so Celery can carry it through a JSON result backend and
    rebuild the same exception on the caller's side.
    """

    def __init__(
        self,
        kind: str,
        limit: Decimal | str,
        spent: Decimal | str,
        projected: Decimal | str,
    ) -> None:
        self.kind = kind
        self.limit, self.spent, self.projected = Decimal(limit), Decimal(spent), Decimal(projected)
        super().__init__(kind, str(limit), str(spent), str(projected))

    def __str__(self) -> str:
        return (
            f"{self.kind} budget of ${self.limit} would be exceeded: ${self.spent} spent, "
            f"next call projected to reach ${self.projected}"
        )


def _units(amount: Decimal) -> int:
    return int(to_money(amount).scaleb(MONEY_SCALE))


def _from_units(units: int) -> Decimal:
    return Decimal(units).scaleb(-MONEY_SCALE)


class Budgets:
    """The installed guard: per-task and daily caps.  ``install()`` / ``uninstall()``."""

    def __init__(
        self,
        task_budget_usd: Decimal | None = None,
        daily_budget_usd: Decimal | None = None,
        redis_client: Any | None = None,
        *,
        fail_open: bool = True,
        namespace: str = "tokenmeter",
    ) -> None:
        self.namespace = namespace  # the ledger's: two ledgers on one Redis keep two counters
        self.task_budget_usd = task_budget_usd
        self.daily_budget_usd = daily_budget_usd
        self.redis = redis_client
        self.fail_open = fail_open
        self.unchecked = 0  # daily-budget checks or updates that could not reach Redis
        # Largest cost seen per model: the projection of the next call (bounded by #models).
        self._max_cost: dict[str, Decimal] = {}
        if daily_budget_usd is not None and redis_client is None:
            raise ValueError("a daily budget needs Redis (shared by every worker)")

    # guard: before each call
    def __call__(self, scope: UsageScope | None, operation: str, model: str | None) -> None:
        next_cost = self._max_cost.get(model or "", Decimal(0))
        if scope is not None:
            cap = self._task_cap(scope)
            spent = scope.root.totals.priced_cost_usd
            if cap is not None and spent + next_cost > cap:
                self._refuse("task", cap, spent, spent + next_cost, operation, model)
        if self.daily_budget_usd is not None:
            try:
                spent = _from_units(int(self.redis.get(self._daily_key()) or 0))  # type: ignore[union-attr]
            except Exception as exc:
                if is_interrupt(exc):
                    raise
                self.unchecked += 1
                logger.error(
                    "daily budget not checked (%s: %s); %s",
                    type(exc).__name__,
                    exc,
                    "the call goes ahead (TOKENMETER_BUDGET_FAIL_OPEN)"
                    if self.fail_open
                    else "the call is refused (TOKENMETER_BUDGET_FAIL_OPEN=false)",
                )
                if self.fail_open:
                    return
                raise BudgetExceeded("daily (unchecked)", self.daily_budget_usd, "0", "0") from exc
            if spent + next_cost > self.daily_budget_usd:
                self._refuse(
                    "daily", self.daily_budget_usd, spent, spent + next_cost, operation, model
                )

    # listener: after each recorded call
    def on_call(self, _scope: UsageScope, call: CallRecord) -> None:
        if not call.cost_usd:
            return
        model = call.requested_model or ""
        if call.cost_usd > self._max_cost.get(model, Decimal(0)):
            self._max_cost[model] = call.cost_usd
        if self.daily_budget_usd is None:
            return
        key = self._daily_key()
        try:
            pipe = self.redis.pipeline(transaction=False)  # type: ignore[union-attr]
            pipe.incrby(key, _units(call.cost_usd))
            pipe.expire(key, 3 * 86400)
            pipe.execute()
        except Exception as exc:
            if is_interrupt(exc):
                raise
            self.unchecked += 1
            logger.error("daily budget counter not updated (%s: %s)", type(exc).__name__, exc)

    def spent_today(self) -> Decimal:
        if self.redis is None:
            return Decimal(0)
        return _from_units(int(self.redis.get(self._daily_key()) or 0))

    def _task_cap(self, scope: UsageScope) -> Decimal | None:
        label = scope.root.labels.get(BUDGET_LABEL)
        return Decimal(label) if label is not None else self.task_budget_usd

    def _daily_key(self) -> str:
        return DAILY_KEY.format(namespace=self.namespace, day=datetime.now(UTC).date().isoformat())

    @staticmethod
    def _refuse(
        kind: str,
        cap: Decimal,
        spent: Decimal,
        projected: Decimal,
        operation: str,
        model: str | None,
    ) -> None:
        error = BudgetExceeded(kind, cap, spent, projected)
        record_call(
            CallRecord(
                operation=operation,
                requested_model=model,
                status="blocked",
                error_type="BudgetExceeded",
                usage_reported=False,
            )
        )
        logger.warning("%s", error)
        raise error

    def install(self) -> None:
        add_call_guard(self)

    def uninstall(self) -> None:
        remove_call_guard(self)


def parse_budget(value: object) -> Decimal:
    """A budget in dollars: ``5``, ``"0.25"``; ValueError with what is wrong otherwise."""
    if isinstance(value, float):
        value = repr(value)
    try:
        amount = Decimal(str(value).strip())
    except ArithmeticError:
        raise ValueError(
            f"tokenmeter_budget_usd={value!r} is not an amount of dollars (write 5 or '0.25')"
        ) from None
    if not amount.is_finite() or amount < 0:
        raise ValueError(f"tokenmeter_budget_usd={value!r} must be a non-negative amount")
    return amount
