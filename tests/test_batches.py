"""The Batch API: a batch's calls are metered when its output file is read, at the batch
price (half the standard price: https://platform.openai.com/docs/guides/batch, read
2026-12-01), once however often the file is read.  The real client over HTTP to the sandbox's
/v1/files and /v1/batches."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest
from openai import AsyncOpenAI, OpenAI
from sqlalchemy import func, select

from tokenmeter import OpenAICall, batches
from tokenmeter.context import set_sink, usage_scope
from tokenmeter.sink import DatabaseSink, FileSpool

M = Decimal(1_000_000)


pytestmark = pytest.mark.usefixtures("hooks")  # instrumented, a collecting sink


def run_batch(client: OpenAI, models: list[str]) -> str:
    lines = [
        {
            "custom_id": f"line-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": f"idea {i}"}]},
        }
        for i, model in enumerate(models)
    ]
    upload = client.files.create(
        file=("in.jsonl", "\n".join(json.dumps(x) for x in lines).encode()), purpose="batch"
    )
    batch = client.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    done = client.batches.retrieve(batch.id)
    assert done.status == "completed" and done.output_file_id
    return done.output_file_id


def test_reading_a_batch_output_meters_each_line_at_the_batch_price(openai_client, sandbox) -> None:
    output = run_batch(openai_client, ["gpt-4o-mini", "gpt-5-mini", "gpt-4o-mini"])
    with usage_scope("task", "batch-reader") as scope:
        openai_client.files.content(output)
        openai_client.files.content(output)  # read again: nothing more
    calls = scope.all_calls()
    assert len(calls) == 3 and scope.totals.calls == 3
    rates = {"gpt-4o-mini-2024-07-18": ("0.075", "0.30"), "gpt-5-mini-2025-08-07": ("0.125", "1")}
    for call in calls:
        billed = sandbox.ledger.get(call.request_id)
        assert call.batch and billed.batch and call.scope_ref == "batch-reader"
        assert (call.input_tokens, call.output_tokens) == (
            billed.input_tokens,
            billed.output_tokens,
        )
        inp, out = (Decimal(r) for r in rates[call.model])
        assert call.cost_usd == (call.input_tokens * inp + call.output_tokens * out) / M
        assert call.cost_usd == billed.cost_usd
        assert call.price_version.endswith(" batch")


async def test_async_reading_meters_the_lines(sandbox) -> None:
    output = run_batch(OpenAI(base_url=sandbox.openai_base_url, api_key="k"), ["gpt-4o-mini"])
    client = AsyncOpenAI(base_url=sandbox.openai_base_url, api_key="k", max_retries=0)
    async with usage_scope("task", "async-batch") as scope:
        await client.files.content(output)
    await client.close()
    [call] = scope.all_calls()
    assert call.batch and call.cost_usd == sandbox.ledger.get(call.request_id).cost_usd


def test_two_processes_reading_one_file_count_each_line_once(
    openai_client, sandbox, db_url, tmp_path
) -> None:
    output = run_batch(openai_client, ["gpt-4o-mini", "gpt-4o-mini"])
    previous = set_sink(DatabaseSink(spool=FileSpool(tmp_path / "spool")))
    try:
        for reader in ("worker-a", "worker-b"):
            batches._seen.clear()  # another process: it has recorded nothing yet
            with usage_scope("task", reader):
                openai_client.files.content(output)
    finally:
        set_sink(previous)
    from models import session_scope

    with session_scope() as s:
        assert s.scalar(select(func.count()).select_from(OpenAICall)) == 2
        total = s.scalar(select(func.sum(OpenAICall.cost_usd)))
    assert total == sandbox.ledger.cost()


def test_a_file_that_is_not_a_batch_output_records_nothing(openai_client) -> None:
    upload = openai_client.files.create(file=("notes.jsonl", b'{"a": 1}\n'), purpose="batch")
    with usage_scope("task", "plain-file") as scope:
        openai_client.files.content(upload.id)
    assert scope.all_calls() == []
