"""The ledger against the provider's own books: OpenAI's organization Usage and Costs APIs.

``tokenmeter audit`` reads, with an admin key (``OPENAI_ADMIN_KEY``; never logged or stored),
``GET /v1/organization/usage/completions`` and ``GET /v1/organization/costs`` through the
openai SDK (``client.admin.organization.usage``), every page of them, and compares them bucket
by bucket and group by group with the ledger's chat and Responses calls:

- requests (``num_model_requests``) and input, cached input, cache-write
  (``input_cache_write_tokens``) and output tokens, per bucket and
  per served model, tier, batch and project (``--by model,service_tier,batch,project_id``;
  the ledger knows a call's project when its client named one: ``OpenAI(project=...)`` or
  ``OPENAI_PROJECT_ID``; a call whose client named none went to its key's own project, which
  the provider knows and the meter cannot: say which with ``default_project``);
- dollars per day against the Costs API.

Only closed buckets are compared: a bucket that ended less than ``settle`` ago (the provider's
data lags) is skipped and said so.  Each difference is named: **unmetered** (the provider saw
more: calls made outside metered processes), **missing upstream** (the ledger has more),
**usage unknown** (the ledger's calls billed for an amount the meter could not see: an answer
never received, a stream left before its usage; or as many requests more in the ledger as it
has calls never answered, which the provider may never have received), **priced differently**
(the day's tokens agree, its dollars do not).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from tokenmeter.ledger import AuditRun, OpenAICall

WIDTHS = {"1m": 60, "1h": 3600, "1d": 86400}
GROUPS = ("model", "service_tier", "batch", "project_id")
TOKENS = ("requests", "input_tokens", "cached_input_tokens", "cache_write_tokens", "output_tokens")
#: Operations the Usage API's completions endpoint counts (chat completions and Responses).
TEXT_OPERATIONS = ("chat", "responses")
#: Dollars may differ by this much per day before the audit calls it a difference: the Costs
#: API's amounts are JSON numbers (floats), rounded by the provider.
DOLLAR_TOLERANCE = Decimal("0.000001")
#: The page size asked for per bucket width (each API's maximum).
PAGE_LIMITS = {"1m": 1440, "1h": 168, "1d": 31}


class AuditError(Exception):
    """The audit could not be made (a bad key, the provider failing): one line for the user."""


@dataclass
class Counts:
    requests: int = 0
    input_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    output_tokens: int = 0
    usage_unknown: int = 0  # calls in the group billed for tokens the meter could not see

    def get(self, name: str) -> int:
        return int(getattr(self, name))


@dataclass(frozen=True)
class Difference:
    bucket_start: int
    group: tuple[Any, ...]
    what: str  # "requests", "input_tokens", ..., "usd"
    provider: Decimal
    ledger: Decimal
    kind: str  # "unmetered" | "missing upstream" | "usage unknown" | "priced differently"

    @property
    def delta(self) -> Decimal:
        return self.provider - self.ledger


@dataclass
class AuditReport:
    start: int
    end: int
    bucket: str
    groups: tuple[str, ...]
    compared: int = 0  # closed buckets compared
    skipped: list[int] = field(default_factory=list)  # bucket starts left out (still open)
    days_compared: int = 0  # closed UTC days whose dollars were compared with the Costs API
    provider: dict[tuple[int, tuple[Any, ...]], Counts] = field(default_factory=dict)
    ledger: dict[tuple[int, tuple[Any, ...]], Counts] = field(default_factory=dict)
    provider_usd: dict[int, Decimal] = field(default_factory=dict)
    ledger_usd: dict[int, Decimal] = field(default_factory=dict)
    differences: list[Difference] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.differences

    @property
    def unnamed_projects(self) -> bool:
        """Grouped by project, the ledger has calls whose client named no project: they went
        to their key's project, which only the provider knows (``--default-project``)."""
        if "project_id" not in self.groups:
            return False
        at = self.groups.index("project_id")
        return any(key[1][at] is None for key in self.ledger)


# -- the provider's side --------------------------------------------------------------------------
def _pages(fetch: Any, **params: Any) -> Iterator[Any]:
    """Every page of a Usage/Costs query, following ``next_page`` to the end."""
    page = fetch(**params)
    while True:
        yield page
        if not page.has_more:
            return
        if not page.next_page:
            raise AuditError("the provider said there is more but gave no next page")
        page = fetch(**params, page=page.next_page)


def provider_usage(
    admin: Any, start: int, end: int, bucket: str, groups: tuple[str, ...]
) -> dict[tuple[int, tuple[Any, ...]], Counts]:
    """The Usage API's completions per (bucket start, group)."""
    out: dict[tuple[int, tuple[Any, ...]], Counts] = {}
    for page in _pages(
        admin.completions,
        start_time=start,
        end_time=end,
        bucket_width=bucket,
        limit=PAGE_LIMITS[bucket],
        **({"group_by": list(groups)} if groups else {}),
    ):
        for b in page.data:
            for r in b.results:
                key = (b.start_time, tuple(_norm(g, getattr(r, g)) for g in groups))
                counts = out.setdefault(key, Counts())
                counts.requests += r.num_model_requests
                counts.input_tokens += r.input_tokens
                counts.cached_input_tokens += r.input_cached_tokens or 0
                counts.cache_write_tokens += getattr(r, "input_cache_write_tokens", None) or 0
                counts.output_tokens += r.output_tokens
    return out


def provider_costs(admin: Any, start: int, end: int) -> dict[int, Decimal]:
    """The Costs API's dollars per day (bucket start)."""
    out: dict[int, Decimal] = {}
    for page in _pages(admin.costs, start_time=start, end_time=end, bucket_width="1d", limit=180):
        for b in page.data:
            for r in b.results:
                value = r.amount.value if r.amount is not None else None
                if value is not None:  # a JSON number: read back through its shortest repr
                    out[b.start_time] = out.get(b.start_time, Decimal(0)) + Decimal(str(value))
    return out


def _norm(group: str, value: Any) -> Any:
    if group == "service_tier":
        return value or "default"
    if group == "batch":
        return bool(value)
    return value


# -- the ledger's side ----------------------------------------------------------------------------
def ledger_usage(
    session: Session,
    start: int,
    end: int,
    width: int,
    groups: tuple[str, ...],
    default_project: str | None = None,
) -> tuple[dict[tuple[int, tuple[Any, ...]], Counts], dict[int, Decimal]]:
    """The ledger's calls per (bucket start, group), and its dollars per day.

    A call never answered has only the model its client asked for (``gpt-4o-mini``), and the
    provider counts it under the one it served (``gpt-4o-mini-2024-07-18``): it is counted
    under the model the answered calls asking for the same name were last served by.
    """
    usage: dict[tuple[int, tuple[Any, ...]], Counts] = {}
    usd: dict[int, Decimal] = {}
    stmt = select(
        OpenAICall.created_at,
        OpenAICall.operation,
        OpenAICall.requested_model,
        OpenAICall.response_model,
        OpenAICall.model,
        OpenAICall.service_tier,
        OpenAICall.batch,
        OpenAICall.project,
        OpenAICall.status,
        OpenAICall.usage_reported,
        OpenAICall.input_tokens,
        OpenAICall.cached_input_tokens,
        OpenAICall.cache_write_tokens,
        OpenAICall.output_tokens,
        OpenAICall.cost_usd,
    ).where(
        OpenAICall.created_at >= datetime.fromtimestamp(start // WIDTHS["1d"] * WIDTHS["1d"], UTC),
        OpenAICall.created_at < datetime.fromtimestamp(end, UTC),
        OpenAICall.status.in_(("ok", "billed_unknown")),
    )
    served: dict[str, tuple[int, str]] = {}  # asked-for name -> (when, the model served)
    unanswered: list[tuple[int, Any]] = []

    def count(moment: int, row: Any, model: str | None) -> None:
        values = {
            "model": model,
            "service_tier": row.service_tier,
            "batch": row.batch,
            "project_id": row.project or default_project,
        }
        key = (
            start + (moment - start) // width * width,
            tuple(_norm(g, values[g]) for g in groups),
        )
        counts = usage.setdefault(key, Counts())
        counts.requests += 1
        if row.status == "billed_unknown" or not row.usage_reported:
            counts.usage_unknown += 1
            return
        counts.input_tokens += row.input_tokens
        counts.cached_input_tokens += row.cached_input_tokens
        counts.cache_write_tokens += row.cache_write_tokens
        counts.output_tokens += row.output_tokens

    for row in session.execute(stmt.execution_options(yield_per=5000)):
        at = row.created_at if row.created_at.tzinfo else row.created_at.replace(tzinfo=UTC)
        moment = int(at.timestamp())
        day = moment // WIDTHS["1d"] * WIDTHS["1d"]  # UTC days, as the Costs API's buckets
        if row.cost_usd is not None:
            usd[day] = usd.get(day, Decimal(0)) + row.cost_usd
        if row.operation not in TEXT_OPERATIONS or moment < start:
            continue
        if row.response_model is None and row.requested_model:
            unanswered.append((moment, row))
            continue
        if row.requested_model and row.response_model:
            last = served.get(row.requested_model)
            if last is None or last[0] <= moment:
                served[row.requested_model] = (moment, row.response_model)
        count(moment, row, row.model)
    for moment, row in unanswered:
        count(moment, row, served.get(row.requested_model, (0, row.model))[1])
    return usage, usd


# -- the comparison -------------------------------------------------------------------------------
def audit(
    session: Session,
    admin: Any,
    start: int,
    end: int,
    bucket: str = "1d",
    groups: Iterable[str] = ("model",),
    settle_s: int = 3600,
    now: float | None = None,
    default_project: str | None = None,
) -> AuditReport:
    """Compare the ledger with the provider over ``[start, end)`` (see the module's docstring)."""
    if bucket not in WIDTHS:
        raise AuditError(f"--bucket must be one of {', '.join(WIDTHS)}, not {bucket!r}")
    groups = tuple(groups)
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        raise AuditError(f"--by takes {', '.join(GROUPS)}; not {', '.join(unknown)}")
    width = WIDTHS[bucket]
    moment = datetime.now(UTC).timestamp() if now is None else now
    closed_until = int(moment) - settle_s
    report = AuditReport(start, end, bucket, groups)
    report.provider = provider_usage(admin, start, end, bucket, groups)
    report.provider_usd = provider_costs(admin, start // WIDTHS["1d"] * WIDTHS["1d"], end)
    report.ledger, report.ledger_usd = ledger_usage(
        session, start, end, width, groups, default_project
    )
    starts = range(start, end, width)
    closed = {s for s in starts if s + width <= closed_until}
    report.skipped = [s for s in starts if s not in closed]
    report.compared = len(closed)
    keys = sorted({k for k in (*report.provider, *report.ledger) if k[0] in closed}, key=repr)
    for key in keys:
        theirs, ours = report.provider.get(key, Counts()), report.ledger.get(key, Counts())
        for name in TOKENS:
            a, b = theirs.get(name), ours.get(name)
            if a == b:
                continue
            if a > b and name != "requests" and ours.usage_unknown:
                kind = "usage unknown"
            elif a < b and name == "requests" and b - a <= ours.usage_unknown:
                # calls never answered: the connection may have broken before the provider
                # took them, which the meter cannot tell from a lost answer
                kind = "usage unknown"
            else:
                kind = "unmetered" if a > b else "missing upstream"
            report.differences.append(
                Difference(key[0], key[1], name, Decimal(a), Decimal(b), kind)
            )
    day_width = WIDTHS["1d"]
    for day in range(start // day_width * day_width, end, day_width):
        if day + day_width > closed_until:
            continue
        report.days_compared += 1
        theirs_usd = report.provider_usd.get(day, Decimal(0))
        ours_usd = report.ledger_usd.get(day, Decimal(0))
        if abs(theirs_usd - ours_usd) <= DOLLAR_TOLERANCE:
            continue
        same_day = [
            d for d in report.differences if d.bucket_start // day_width == day // day_width
        ]
        if not same_day:
            kind = "priced differently"  # the day's requests and tokens agree
        elif theirs_usd > ours_usd and {d.kind for d in same_day} == {"usage unknown"}:
            kind = "usage unknown"  # the dollars of the calls the ledger holds at NULL
        else:
            kind = "unmetered" if theirs_usd > ours_usd else "missing upstream"
        report.differences.append(Difference(day, ("(all)",), "usd", theirs_usd, ours_usd, kind))
    return report


def difference_json(d: Difference) -> dict[str, Any]:
    return {
        "bucket_start": datetime.fromtimestamp(d.bucket_start, UTC).isoformat(),
        "group": [v if isinstance(v, str | bool) or v is None else str(v) for v in d.group],
        "what": d.what,
        "provider": str(d.provider),
        "ledger": str(d.ledger),
        "kind": d.kind,
    }


def store(session: Session, report: AuditReport) -> AuditRun:
    """Keep ``report`` (in ``session``'s transaction): the API shows the latest run."""
    worst_first = sorted(report.differences, key=lambda d: abs(d.delta), reverse=True)
    run = AuditRun(
        window_start=datetime.fromtimestamp(report.start, UTC),
        window_end=datetime.fromtimestamp(report.end, UTC),
        bucket=report.bucket,
        group_by=",".join(report.groups),
        compared=report.compared,
        skipped=len(report.skipped),
        clean=report.clean,
        differences=json.dumps([difference_json(d) for d in worst_first]),
    )
    session.add(run)
    return run


#: The kinds of difference nothing in the ledger accounts for (a billed-unknown call explains
#: its own tokens: the meter knows it was billed, not for how much).
UNEXPLAINED = ("unmetered", "missing upstream", "priced differently")


def unexplained(report: AuditReport) -> dict[str, Decimal]:
    """Per measure (``requests``, token categories, ``usd``): the sum of the absolute
    differences no known cause explains.  0 in every measure is a clean audit."""
    out = {name: Decimal(0) for name in (*TOKENS, "usd")}
    for d in report.differences:
        if d.kind in UNEXPLAINED:
            out[d.what] += abs(d.delta)
    return out


def window(since_s: int, bucket: str, now: float | None = None) -> tuple[int, int]:
    """``[start, end)`` on bucket boundaries covering the last ``since_s`` seconds, the current
    (still open) bucket included so that the report can say it was skipped."""
    if bucket not in WIDTHS:
        raise AuditError(f"--bucket must be one of {', '.join(WIDTHS)}, not {bucket!r}")
    width = WIDTHS[bucket]
    moment = int(datetime.now(UTC).timestamp() if now is None else now)
    end = moment // width * width + width
    return (end - since_s) // width * width, end


def run(
    *,
    since_s: int,
    bucket: str = "1d",
    groups: Iterable[str] = ("model",),
    settle_s: int = 3600,
    default_project: str | None = None,
    admin_key: str | None = None,
    database_url: str | None = None,
    base_url: str | None = None,
    keep: bool = True,
    max_retries: int = 5,
) -> AuditReport:
    """One audit, end to end, as ``tokenmeter audit`` and the ``tokenmeter.audit`` task run it:
    read the provider with the admin key (default ``OPENAI_ADMIN_KEY``), compare, keep the run.

    Every failure is an :class:`AuditError` with one line for the user; the key is never in it.
    """
    import os

    import openai

    from tokenmeter.db import get_engine
    from tokenmeter.migrate import LedgerUnavailable, require_ledger

    key = admin_key or os.environ.get("OPENAI_ADMIN_KEY")
    if not key:
        raise AuditError("set OPENAI_ADMIN_KEY to an admin key (platform.openai.com > admin keys)")
    start, end = window(since_s, bucket)
    try:
        engine = require_ledger(database_url)
    except LedgerUnavailable as exc:
        raise AuditError(str(exc)) from None
    client = openai.OpenAI(
        api_key="unused", admin_api_key=key, base_url=base_url, max_retries=max_retries
    )
    try:
        with Session(engine) as session:
            report = audit(
                session,
                client.admin.organization.usage,
                start,
                end,
                bucket,
                groups,
                settle_s=settle_s,
                default_project=default_project,
            )
    except (openai.AuthenticationError, openai.PermissionDeniedError):
        raise AuditError(
            "OPENAI_ADMIN_KEY was refused: the Usage and Costs APIs need an admin key"
        ) from None
    except openai.APIStatusError as exc:
        raise AuditError(
            f"the provider answered {exc.status_code} after {max_retries} retries; "
            "nothing was compared (a partial answer is never reported); try again later"
        ) from None
    except openai.APIConnectionError:
        raise AuditError(
            "could not reach the provider's Usage API (network); try again later"
        ) from None
    finally:
        client.close()
        engine.dispose()
    if keep:  # the report reads through a read-only engine; the run is written by the sink's
        with Session(get_engine(database_url)) as writer:
            store(writer, report)
            writer.commit()
    return report
