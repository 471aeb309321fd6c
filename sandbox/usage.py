"""The organization Usage and Costs APIs, served from what the sandbox billed.

``GET /v1/organization/usage/completions`` and ``GET /v1/organization/costs`` as the openai
SDK's ``client.admin.organization.usage.completions()`` / ``.costs()`` call them (shapes from
``openai/types/admin/organization/usage_completions_response.py`` and
``usage_costs_response.py``): a ``page`` of time ``bucket`` objects from ``start_time``
(inclusive) to ``end_time`` (exclusive, default now), ``limit`` buckets a page, ``has_more`` and
an opaque ``next_page`` cursor; in each bucket one result per group of ``group_by``; the
filters ``models``, ``project_ids``, ``api_key_ids``, ``batch``.  Only an admin key
(``sk-admin-...``) may read them, as with OpenAI.

Buckets start at ``start_time`` and are ``bucket_width`` wide (``1m``, ``1h``, ``1d``; costs:
``1d``), every bucket of the range listed, empty ones with no results; the last one keeps its
full width but holds only what was billed before ``end_time``.  What the sandbox does
not model is refused with a 400 rather than answered wrongly: ``user_id`` and ``api_source``
grouping, and costs by ``line_item``.  The books lag as the provider's do when
``usage_lag_s`` is set: a request shows only that long after it was billed.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections.abc import Iterable
from decimal import Decimal
from typing import Any

from .ground_truth import BilledRequest

ADMIN_KEY_PREFIX = "sk-admin-"
DEFAULT_PROJECT = "proj_sandbox_default"  # a request without an OpenAI-Project header
WIDTHS = {"1m": 60, "1h": 3600, "1d": 86400}
#: (default, max) buckets a page, per width (the params' docstrings)
LIMITS = {"1m": (60, 1440), "1h": (24, 168), "1d": (7, 31)}
COSTS_LIMITS = (7, 180)
COMPLETION_GROUPS = ("project_id", "api_key_id", "model", "batch", "service_tier")
COST_GROUPS = ("project_id", "api_key_id")
TEXT_OPERATIONS = ("chat", "responses")


class UsageQueryError(ValueError):
    """A query the API would refuse: its message and the parameter at fault."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def api_key_id(authorization: str | None) -> str | None:
    """The id the Usage API shows for the key of ``Authorization`` (a digest, not the key)."""
    key = (authorization or "").removeprefix("Bearer ").strip()
    if not key:
        return None
    return "key_" + hashlib.sha256(key.encode()).hexdigest()[:16]


def _values(query: dict[str, list[str]], name: str) -> list[str]:
    """A list parameter, however the client spelled it (``name=a&name=b``, ``name[]=a``)."""
    found = query.get(name, []) + query.get(f"{name}[]", [])
    return [v for item in found for v in item.split(",") if v]


def _one(query: dict[str, list[str]], name: str) -> str | None:
    values = query.get(name)
    return values[-1] if values else None


def _int(query: dict[str, list[str]], name: str, default: int | None = None) -> int | None:
    text = _one(query, name)
    if text is None:
        return default
    try:
        return int(text)
    except ValueError:
        raise UsageQueryError(f"{name} must be an integer, not {text!r}", name) from None


class _Window:
    """The buckets a query asks for, the page of them to answer, and the next cursor."""

    def __init__(
        self,
        query: dict[str, list[str]],
        widths: dict[str, int],
        limits: tuple[int, int],
        now: float,
    ) -> None:
        start = _int(query, "start_time")
        if start is None:
            raise UsageQueryError("start_time is required", "start_time")
        width_name = _one(query, "bucket_width") or "1d"
        if width_name not in widths:
            raise UsageQueryError(
                f"bucket_width must be one of {', '.join(widths)}, not {width_name!r}",
                "bucket_width",
            )
        self.width = widths[width_name]
        end = _int(query, "end_time", int(now) + 1)  # (now, to the end of this second)
        assert end is not None
        if end <= start:
            raise UsageQueryError("end_time must be after start_time", "end_time")
        default, most = limits
        limit = _int(query, "limit", default)
        assert limit is not None
        if not 1 <= limit <= most:
            raise UsageQueryError(f"limit must be between 1 and {most}", "limit")
        first = start
        cursor = _one(query, "page")
        if cursor:
            try:
                first = int(json.loads(base64.urlsafe_b64decode(cursor.encode()))["next"])
            except (ValueError, KeyError, TypeError):
                raise UsageQueryError("page is not a cursor this API gave", "page") from None
        self.starts = list(range(first, end, self.width))[:limit]
        self.end = end
        last = self.starts[-1] + self.width if self.starts else end
        self.next_page = (
            base64.urlsafe_b64encode(json.dumps({"next": last}).encode()).decode()
            if last < end
            else None
        )

    def bucket_of(self, created: int) -> int | None:
        for start in self.starts:
            if start <= created < min(start + self.width, self.end):
                return start
        return None


def _groups(query: dict[str, list[str]], allowed: tuple[str, ...]) -> list[str]:
    groups = _values(query, "group_by")
    for name in groups:
        if name not in allowed:
            raise UsageQueryError(
                f"the sandbox cannot group by {name!r} (it groups by {', '.join(allowed)})",
                "group_by",
            )
    return groups


def _booked(rows: Iterable[BilledRequest], now: float, lag_s: float) -> list[BilledRequest]:
    """What the books show at ``now``: what was billed at least ``lag_s`` before."""
    return [r for r in rows if r.created + lag_s <= now] if lag_s else list(rows)


def _filtered(rows: Iterable[BilledRequest], query: dict[str, list[str]]) -> list[BilledRequest]:
    models, projects = set(_values(query, "models")), set(_values(query, "project_ids"))
    keys = set(_values(query, "api_key_ids"))
    batch = _one(query, "batch")
    if batch not in (None, "true", "false"):
        raise UsageQueryError("batch must be true or false", "batch")
    return [
        r
        for r in rows
        if (not models or r.model in models)
        and (not projects or r.project_id in projects)
        and (not keys or r.api_key_id in keys)
        and (batch is None or r.batch == (batch == "true"))
    ]


def _page(window: _Window, results: dict[int, list[dict[str, Any]]]) -> dict[str, Any]:
    return {
        "object": "page",
        "data": [
            {
                "object": "bucket",
                "start_time": start,
                "end_time": start + window.width,
                "results": results.get(start, []),
            }
            for start in window.starts
        ],
        "has_more": window.next_page is not None,
        "next_page": window.next_page,
    }


def completions(
    rows: Iterable[BilledRequest],
    query: dict[str, list[str]],
    now: float | None = None,
    lag_s: float = 0.0,
) -> dict[str, Any]:
    """A page of ``GET /v1/organization/usage/completions`` (chat and responses requests)."""
    limits = LIMITS.get(_one(query, "bucket_width") or "1d", LIMITS["1d"])
    moment = time.time() if now is None else now
    window = _Window(query, WIDTHS, limits, moment)
    groups = _groups(query, COMPLETION_GROUPS)
    rows = _booked(rows, moment, lag_s)
    sums: dict[tuple[int, tuple[Any, ...]], dict[str, int]] = {}
    for row in _filtered((r for r in rows if r.operation in TEXT_OPERATIONS), query):
        start = window.bucket_of(row.created)
        if start is None:
            continue
        key = (start, tuple(getattr(row, g) for g in groups))
        total = sums.setdefault(
            key,
            {
                "input_tokens": 0,
                "input_cached_tokens": 0,
                "input_cache_write_tokens": 0,
                "output_tokens": 0,
                "requests": 0,
            },
        )
        total["input_tokens"] += row.input_tokens
        total["input_cached_tokens"] += row.cached_input_tokens
        total["input_cache_write_tokens"] += row.cache_write_tokens
        total["output_tokens"] += row.output_tokens
        total["requests"] += 1
    results: dict[int, list[dict[str, Any]]] = {}
    for (start, values), total in sorted(sums.items(), key=lambda kv: repr(kv[0])):
        result: dict[str, Any] = {
            "object": "organization.usage.completions.result",
            "input_tokens": total["input_tokens"],
            "input_cached_tokens": total["input_cached_tokens"],
            "input_uncached_tokens": total["input_tokens"] - total["input_cached_tokens"],
            # every write of the sandbox has the default 30-minute retention
            "input_cache_write_tokens": total["input_cache_write_tokens"],
            "input_cache_write_30m_tokens": total["input_cache_write_tokens"],
            "input_cache_write_12h_tokens": 0,
            "input_audio_tokens": 0,
            "output_tokens": total["output_tokens"],
            "output_audio_tokens": 0,
            "num_model_requests": total["requests"],
            **{name: None for name in COMPLETION_GROUPS},
            "user_id": None,
            "api_source": None,
        }
        result.update(zip(groups, values, strict=True))
        results.setdefault(start, []).append(result)
    return _page(window, results)


def costs(
    rows: Iterable[BilledRequest],
    query: dict[str, list[str]],
    now: float | None = None,
    lag_s: float = 0.0,
) -> dict[str, Any]:
    """A page of ``GET /v1/organization/costs``: daily dollars of every billed request."""
    moment = time.time() if now is None else now
    window = _Window(query, {"1d": WIDTHS["1d"]}, COSTS_LIMITS, moment)
    groups = _groups(query, COST_GROUPS)
    rows = _booked(rows, moment, lag_s)
    sums: dict[tuple[int, tuple[Any, ...]], Decimal] = {}
    for row in _filtered(rows, query):
        start = window.bucket_of(row.created)
        if start is None or row.cost_usd is None:
            continue
        key = (start, tuple(getattr(row, g) for g in groups))
        sums[key] = sums.get(key, Decimal(0)) + row.cost_usd
    results: dict[int, list[dict[str, Any]]] = {}
    for (start, values), amount in sorted(sums.items(), key=lambda kv: repr(kv[0])):
        result: dict[str, Any] = {
            "object": "organization.costs.result",
            # a JSON number, as OpenAI sends it (the SDK reads a float)
            "amount": {"value": float(amount), "currency": "usd"},
            "line_item": None,
            "project_id": None,
            "api_key_id": None,
            "user_id": None,
            "api_source": None,
        }
        result.update(zip(groups, values, strict=True))
        results.setdefault(start, []).append(result)
    return _page(window, results)
