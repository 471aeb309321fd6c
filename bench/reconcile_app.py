"""The worker of the reconciliation run: the application's real tasks plus two load tasks.

``celery -A bench.reconcile_app worker`` serves ``tasks.commission`` and
``tasks.promotion_scan`` exactly as the application ships them, and adds:

- ``reconcile.mixed``: the OpenAI surfaces the application's tasks do not use (streaming with
  and without ``include_usage``, the Responses API, embeddings, gpt-image-1 with ``n`` = 2,
  reasoning and cached tokens, the async client, the gpt-5 family on the default, flex and
  priority tiers, the web search tool), some of it failing half way on purpose;
- ``reconcile.victim``: two calls, then it waits for the reconciler to SIGKILL its process;
  redelivered, it finishes without waiting.

Nothing here knows tokenmeter beyond what ``tasks.app`` installs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from typing import Any

import redis
from openai import APITimeoutError, AsyncOpenAI

from tasks.app import app
from tasks.clients import openai_client
from tasks.commission import RETRYABLE, commission
from tasks.promotion import promotion_scan

__all__ = ["app", "commission", "mixed", "promotion_scan", "victim"]

LONG_CONTEXT = "Shared catalogue of handmade gifts, materials and prices. " * 90


class PlannedFailure(RuntimeError):
    """A task that fails half way on purpose: its calls so far must still be counted."""


def _chat(prompt: str, model: str = "gpt-4o-mini", **kw: Any) -> Any:
    return openai_client().chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], **kw
    )


async def _async_calls(prompt: str) -> None:
    client = AsyncOpenAI(
        api_key=openai_client().api_key, base_url=openai_client().base_url, max_retries=0
    )
    async with client:
        await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": prompt}]
        )
        stream = await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": prompt}], stream=True
        )
        async for _ in stream:
            pass


@app.task(
    bind=True,
    name="reconcile.mixed",
    autoretry_for=RETRYABLE,
    retry_backoff=1,
    retry_backoff_max=8,
    retry_jitter=False,
    max_retries=6,
)
def mixed(self: Any, i: int, fail_half_way: bool = False) -> int:
    """A handful of calls chosen by ``i``; every surface shows up within a few dozen tasks."""
    prompt = (LONG_CONTEXT if i % 5 == 0 else "") + f"Task {i}: suggest a handmade gift."
    calls = 0
    _chat(prompt)
    calls += 1
    if i % 3 == 0:  # streamed, asking for usage itself
        for _ in _chat(prompt, stream=True, stream_options={"include_usage": True}):
            pass
        calls += 1
    elif i % 3 == 1:  # streamed without include_usage: tokenmeter must still get the numbers
        for _ in _chat(prompt, stream=True):
            pass
        calls += 1
    if fail_half_way:
        raise PlannedFailure(f"task {i} fails after {calls} calls, on purpose")
    if i % 4 == 0:
        openai_client().responses.create(model="gpt-4.1-mini", input=prompt)
        calls += 1
    elif i % 4 == 1:
        with openai_client().responses.stream(model="gpt-4.1-mini", input=prompt) as events:
            for _ in events:
                pass
        calls += 1
    elif i % 4 == 2:
        openai_client().embeddings.create(
            model="text-embedding-3-small", input=[prompt[:300], f"gift {i}"]
        )
        calls += 1
    if i % 6 == 5:
        _chat(prompt, model="o3-mini")
        calls += 1
    if i % 10 == 3:
        openai_client().images.generate(
            model="gpt-image-1", prompt=f"a knitted fox, variant {i}", n=2, quality="low"
        )
        calls += 1
    if i % 10 == 8:  # an edit: its input images bill image input tokens
        openai_client().images.edit(
            model="gpt-image-1",
            image=[("in.png", TINY_PNG, "image/png")],
            prompt=f"the same fox in wool, variant {i}",
            quality="low",
        )
        calls += 1
    if i % 9 == 4:
        asyncio.run(_async_calls(prompt))
        calls += 2
    if i % 5 == 1:  # the gpt-5 family on the tier the index picks; billed as it is served
        model = ("gpt-5-mini", "gpt-5", "gpt-5-nano")[(i // 5) % 3]
        _chat(
            prompt, model=model, service_tier=("flex", "priority", "default", "fast")[(i // 5) % 4]
        )
        calls += 1
    if i % 11 == 7:  # gpt-5.6 writes its prompt to the cache (1.25x input), then reads it
        tier: Any = ("default", "flex", "priority")[(i // 11) % 3]
        prefix = f"Order {i} ({tier}). " + LONG_CONTEXT
        for ask in ("Write it.", "Read it back."):
            _chat(prefix + ask, model="gpt-5.6-sol", service_tier=tier)
        openai_client().responses.create(model="gpt-5.6-sol", input=prefix, service_tier=tier)
        calls += 3
    if i % 8 == 5:  # the web search tool, billed per call on top of the tokens
        openai_client().responses.create(
            model="gpt-5-mini", input=prompt, tools=[{"type": "web_search"}]
        )
        calls += 1
    if i % 29 == 14:  # a long prompt (> 272K tokens): the whole call at the long-context rate
        _chat(f"{i} " + "catalogue line " * 73_000, model="gpt-5.4")
        calls += 1
    if i % 17 == 9:  # a Batch API run whose output file this task reads: metered on reading
        calls += _batch_run(prompt, i)
    if i % 13 == 6:  # a caller that gives up waiting: the provider still completes and bills
        impatient = openai_client().with_options(timeout=0.25, max_retries=0)
        with contextlib.suppress(APITimeoutError):
            impatient.chat.completions.create(
                model="gpt-4o-mini",
                messages=[{"role": "user", "content": prompt}],
                extra_headers={"X-Sandbox-Fault": "slow=600"},
            )
        calls += 1
    if i % 7 == 2:  # a caller that stops reading at finish_reason, without closing
        for chunk in _chat(prompt, stream=True):
            if chunk.choices and chunk.choices[0].finish_reason:
                break
        calls += 1
    return calls


TINY_PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 64


def _batch_run(prompt: str, i: int) -> int:
    """Two chat lines through the Batch API; their usage arrives with the output file."""
    client = openai_client()
    lines = [
        {
            "custom_id": f"mixed-{i}-{n}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": f"{n} {prompt}"}]},
        }
        for n, model in enumerate(("gpt-4o-mini", "gpt-5-mini"))
    ]
    upload = client.files.create(
        file=("batch.jsonl", "\n".join(json.dumps(x) for x in lines).encode()), purpose="batch"
    )
    batch = client.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    done = client.batches.retrieve(batch.id)
    if done.output_file_id:
        client.files.content(done.output_file_id)
    return len(lines)


@app.task(
    bind=True,
    name="reconcile.victim",
    autoretry_for=RETRYABLE,
    retry_backoff=1,
    retry_jitter=False,
    max_retries=6,
)
def victim(self: Any, tag: str) -> int:
    """Two calls, then wait (at most 120 s) to be killed; once redelivered, one more call."""
    control = redis.Redis.from_url(os.environ["RECONCILE_CONTROL_URL"])
    for n in range(2):
        _chat(f"victim {tag} call {n}")
    if not control.exists(f"reconcile:killed:{tag}"):
        control.rpush(f"reconcile:held:{tag}", os.getpid())
        control.blpop([f"reconcile:go:{tag}"], timeout=60)
    _chat(f"victim {tag} final call")
    return os.getpid()
