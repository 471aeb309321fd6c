"""The naive tracker tokenmeter replaces, kept only as a benchmark baseline.  Do not use it.

It is the design of the seed plan, faithfully: a decorator around each function that calls
OpenAI, a process-global history list, and the prompt/completion split *estimated* as 80/20 of
``total_tokens``.  What it gets wrong, by construction (bench/peers.py measures how much):

- the split is a guess, so the cost is wrong whenever prompts and answers differ in size;
- cached and reasoning tokens are invisible (priced as ordinary tokens);
- a streamed call returns a ``Stream`` with no ``usage``: it counts 0;
- an image call counts one image whatever ``n`` was;
- ``HISTORY`` is shared by every task of the process and grows forever.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from decimal import Decimal
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

#: every call of the process, forever (the seed plan's ``usage_history``)
HISTORY: list[dict[str, Any]] = []

# USD per 1M tokens (prompt, completion) and per image, hard-coded as in the seed plan
PRICES = {
    "gpt-4o-mini": (Decimal("0.15"), Decimal("0.60")),
    "o3-mini": (Decimal("1.10"), Decimal("4.40")),
    "gpt-4.1-mini": (Decimal("0.40"), Decimal("1.60")),
    "text-embedding-3-small": (Decimal("0.02"), Decimal("0")),
    "gpt-image-1": (Decimal("5.00"), Decimal("40.00")),
}
IMAGE_PRICE = {"dall-e-2": Decimal("0.018"), "dall-e-3": Decimal("0.040")}


def track_usage(model: str) -> Callable[[F], F]:
    """Record the usage of the OpenAI call ``func`` makes (the seed plan's decorator)."""

    def decorate(func: F) -> F:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            result = func(*args, **kwargs)
            usage = getattr(result, "usage", None)
            total = int(getattr(usage, "total_tokens", 0) or 0) if usage is not None else 0
            prompt = int(total * 0.8)
            completion = total - prompt
            images = 1 if model in IMAGE_PRICE or model.startswith("gpt-image") else 0
            in_price, out_price = PRICES.get(model, (Decimal(0), Decimal(0)))
            cost = (prompt * in_price + completion * out_price) / 1_000_000
            cost += IMAGE_PRICE.get(model, Decimal(0)) * images
            HISTORY.append(
                {
                    "at": time.time(),
                    "model": model,
                    "prompt_tokens": prompt,
                    "completion_tokens": completion,
                    "images": images,
                    "cost": cost,
                }
            )
            return result

        return wrapper  # type: ignore[return-value]

    return decorate


def totals() -> dict[str, Any]:
    """What the tracker reports, summed over the whole history."""
    return {
        "input_tokens": sum(h["prompt_tokens"] for h in HISTORY),
        "output_tokens": sum(h["completion_tokens"] for h in HISTORY),
        "image_count": sum(h["images"] for h in HISTORY),
        "cost_usd": sum((h["cost"] for h in HISTORY), Decimal(0)),
    }
