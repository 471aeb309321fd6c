"""What the sandbox billed, request by request: the ground truth every test compares with.

The OpenAI sandbox appends one ``BilledRequest`` per successful request (failed requests bill
nothing, as with the real API).  Each carries the dollars the provider charges for it, from the
sandbox's own price list (``billing.py``, independent of tokenmeter's).  Tests read it
in-process (``Ledger``) or over HTTP (``GET /_sandbox/ledger``, the same fields as JSON, money
as a decimal string).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields, replace
from decimal import Decimal

from .billing import amount_usd


@dataclass(frozen=True, slots=True)
class BilledRequest:
    request_id: str
    operation: str  # "chat" | "responses" | "embedding" | "image"
    model: str  # the model the sandbox answered as (what it billed)
    service_tier: str = "default"  # the tier it served (and billed) the request on
    input_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0  # written to the prompt cache (billed apart from GPT-5.6 on)
    input_image_tokens: int = 0  # gpt-image: image part of the input
    output_tokens: int = 0
    reasoning_tokens: int = 0
    image_count: int = 0
    image_size: str | None = None
    image_quality: str | None = None
    web_search_calls: int = 0  # built-in tool calls, billed per call
    stream: bool = False
    batch: bool = False  # a line of a Batch API run, billed at the batch price
    cost_usd: Decimal | None = None  # the provider's charge (billing.py); None: not listed
    client_request_id: str | None = None  # the caller's X-Client-Request-Id, as logged
    created: int = field(default_factory=lambda: int(time.time()))  # when it was billed
    api_key_id: str | None = None  # which key called (an id, never the key: usage.py)
    project_id: str | None = None  # the project it was billed to (OpenAI-Project header)

    def to_json(self) -> dict[str, object]:
        out = asdict(self)
        out["cost_usd"] = None if self.cost_usd is None else str(self.cost_usd)
        return out

    @classmethod
    def from_json(cls, data: dict[str, object]) -> BilledRequest:
        names = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names}
        if kwargs.get("cost_usd") is not None:
            kwargs["cost_usd"] = Decimal(str(kwargs["cost_usd"]))
        return cls(**kwargs)  # type: ignore[arg-type]

    def priced(self) -> BilledRequest:
        """This request with the provider's charge filled in."""
        return self if self.cost_usd is not None else replace(self, cost_usd=amount_usd(self))


TOKEN_FIELDS = (
    "input_tokens",
    "cached_input_tokens",
    "cache_write_tokens",
    "input_image_tokens",
    "output_tokens",
    "reasoning_tokens",
    "image_count",
    "web_search_calls",
)


class Ledger:
    """Thread-safe record of billed requests, keyed by request id."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rows: dict[str, BilledRequest] = {}

    def add(self, row: BilledRequest) -> None:
        row = row.priced()
        with self._lock:
            if row.request_id in self._rows:
                raise ValueError(f"request id {row.request_id} billed twice")
            self._rows[row.request_id] = row

    def get(self, request_id: str) -> BilledRequest | None:
        with self._lock:
            return self._rows.get(request_id)

    def by_client_request_id(self, client_request_id: str) -> BilledRequest | None:
        """The request billed under the caller's ``X-Client-Request-Id``, if any."""
        with self._lock:
            for row in self._rows.values():
                if row.client_request_id == client_request_id:
                    return row
        return None

    def rows(self, request_ids: Iterable[str] | None = None) -> list[BilledRequest]:
        with self._lock:
            if request_ids is None:
                return list(self._rows.values())
            return [self._rows[r] for r in request_ids if r in self._rows]

    def cost(self, request_ids: Iterable[str] | None = None) -> Decimal | None:
        """What the provider charged for the given (default: all) requests; None if unlisted."""
        total = Decimal(0)
        for row in self.rows(request_ids):
            if row.cost_usd is None:
                return None
            total += row.cost_usd
        return total

    def totals(self, request_ids: Iterable[str] | None = None) -> dict[str, int]:
        """Sum of every token/image category over the given (default: all) requests."""
        out = dict.fromkeys(TOKEN_FIELDS, 0)
        for row in self.rows(request_ids):
            for name in TOKEN_FIELDS:
                out[name] += getattr(row, name)
        return out

    def clear(self) -> None:
        with self._lock:
            self._rows.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._rows)
