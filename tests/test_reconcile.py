"""The reconciliation's comparison: real calls to the sandbox, flushed by the real sink, then
every kind of difference planted by hand must be caught (and a clean ledger must pass)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import openai
import pytest
from rich.console import Console
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from bench.reconcile import reconcile, report_table
from models import PipelineRun, PipelineRunUsage, session_scope
from models.db import get_engine
from tasks.commission import run_usage_rollup
from tests.helpers import clear_settings
from tokenmeter import OpenAICall, openai_hooks
from tokenmeter.context import set_sink, usage_scope
from tokenmeter.sandbox.runner import SandboxServers
from tokenmeter.sink import DatabaseSink, FileSpool

LONG_PROMPT = "Shared catalogue of handmade gifts, one per line. " * 120  # cached the 2nd time


@pytest.fixture
def prices_file() -> str | None:
    """No price override (a test overrides this fixture to misprice on purpose)."""
    return None


@pytest.fixture
def metered_run(
    db_url: str,
    tmp_path,
    sandbox: SandboxServers,
    openai_client: Any,
    prices_file: str | None,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[list[str]]:
    """One pipeline run with chat (one cached), stream, embedding and image calls, flushed."""
    if prices_file is not None:
        path = tmp_path / "prices.toml"
        path.write_text(prices_file)
        monkeypatch.setenv("TOKENMETER_PRICES_FILE", str(path))
        clear_settings()
    previous = set_sink(DatabaseSink(spool=FileSpool(tmp_path / "spool")))
    openai_hooks.instrument()
    try:
        with session_scope() as s:
            run = PipelineRun(status="running", config={})
            s.add(run)
            s.flush()
            run_id = run.id
        with usage_scope("pipeline_run", run_id) as scope:
            scope.bind_rollup(run_usage_rollup(run_id, "gpt-4o-mini", "dall-e-2"))
            msgs = [{"role": "user", "content": "a gift idea"}]
            openai_client.chat.completions.create(model="gpt-4o-mini", messages=msgs)
            for _ in range(2):
                openai_client.chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": LONG_PROMPT}]
                )
            for _ in openai_client.chat.completions.create(
                model="o3-mini", messages=msgs, stream=True
            ):
                pass
            openai_client.embeddings.create(model="text-embedding-3-small", input="wool")
            openai_client.images.generate(model="dall-e-2", prompt="a fox", n=2, size="512x512")
        with session_scope() as s:
            ids = list(s.scalars(select(OpenAICall.request_id)))
        yield ids
    finally:
        openai_hooks.uninstrument()
        set_sink(previous)


def _check(sandbox: SandboxServers, ids: list[str]):
    with Session(get_engine()) as s:
        return reconcile(s, sandbox.ledger.rows(ids))


def test_a_faithful_ledger_reconciles(sandbox: SandboxServers, metered_run: list[str]) -> None:
    result = _check(sandbox, metered_run)
    assert len(metered_run) == 6
    assert result.ok, (result.missing, result.extra, result.mismatched, result.rollups)
    assert result.truth["cached_input_tokens"] > 0
    assert result.truth["image_count"] == result.ledger["image_count"] == 2
    assert result.truth["reasoning_tokens"] > 0
    assert result.truth["cost_usd"] == result.ledger["cost_usd"] > Decimal("0.036")
    assert result.rollup_rows == {"pipeline_run_usages": 1, "agent_scanned_posts": 0}


def test_a_lost_call_is_caught(sandbox: SandboxServers, metered_run: list[str]) -> None:
    with session_scope() as s:
        s.delete(s.scalars(select(OpenAICall).where(OpenAICall.operation == "embedding")).one())
    result = _check(sandbox, metered_run)
    assert not result.ok
    assert len(result.missing) == 1
    assert result.truth["input_tokens"] > result.ledger["input_tokens"]
    assert any("pipeline_run_usages" in line for line in result.rollups)  # rollup has it


def test_a_wrong_token_count_is_caught(sandbox: SandboxServers, metered_run: list[str]) -> None:
    with session_scope() as s:
        first_chat = s.scalar(
            select(OpenAICall.id)
            .where(OpenAICall.operation == "chat", OpenAICall.stream.is_(False))
            .order_by(OpenAICall.id)
        )
        s.execute(
            update(OpenAICall)
            .where(OpenAICall.id == first_chat)
            .values(cached_input_tokens=OpenAICall.cached_input_tokens + 1)
        )
    result = _check(sandbox, metered_run)
    assert not result.ok
    assert [m.split(": ")[1].split()[0] for m in result.mismatched] == ["cached_input_tokens"]


def test_a_double_counted_rollup_is_caught(sandbox: SandboxServers, metered_run: list[str]) -> None:
    with session_scope() as s:
        s.execute(
            update(PipelineRunUsage).values(
                image_count=PipelineRunUsage.image_count * 2,
                total_cost_usd=PipelineRunUsage.total_cost_usd * 2,
            )
        )
    result = _check(sandbox, metered_run)
    assert not result.ok
    assert not result.missing and not result.mismatched  # the ledger itself is right
    assert {line.split(": ")[1].split()[0] for line in result.rollups} == {
        "image_count",
        "total_cost_usd",
    }


def test_a_call_never_billed_is_caught(sandbox: SandboxServers, metered_run: list[str]) -> None:
    with session_scope() as s:
        s.add(OpenAICall(request_id="req_invented", operation="chat", input_tokens=10))
    result = _check(sandbox, metered_run)
    assert not result.ok
    assert result.extra == ["req_invented (ok)"]
    console = Console(record=True, width=120)
    console.print(report_table(result))
    assert re.search(r"in the ledger, not billed\s*│[\s│]*1\s*│", console.export_text())


# A deliberately wrong price in the meter (a user's override file always wins, so it is the
# meter's price list that is wrong here) must make the reconciliation fail on cost_usd: the
# ground truth's dollars come from the sandbox's own price list, not from the meter's.
MISPRICED = {
    "cached input billed as input": """
[[price]]
model = "gpt-4o-mini"
effective = 2024-07-18
input = "0.15"
cached_input = "0.15"
output = "0.60"
""",
    "an image priced at the wrong size": """
[[price]]
model = "dall-e-2"
effective = 2023-11-06
[price.images]
"standard/1024x1024" = "0.020"
"standard/512x512" = "0.020"
"standard/256x256" = "0.016"
""",
    "reasoning model at its family's old price": """
[[price]]
model = "o3-mini"
effective = 2025-01-31
input = "1.10"
cached_input = "0.55"
output = "4.40"

[[price]]
model = "o3-mini"
effective = 2025-02-01
input = "1.10"
cached_input = "0.55"
output = "4.50"
""",
}


@pytest.mark.parametrize("prices_file", MISPRICED.values(), ids=MISPRICED.keys())
def test_a_wrong_price_is_caught(sandbox: SandboxServers, metered_run: list[str]) -> None:
    result = _check(sandbox, metered_run)
    assert not result.ok
    assert result.truth["cost_usd"] != result.ledger["cost_usd"]
    assert {m.split(": ")[1].split()[0] for m in result.mismatched} == {"cost_usd"}
    console = Console(record=True, width=120)
    console.print(report_table(result))
    assert re.search(r"cost_usd\s*│[^\n]*│\s*[+-]0\.\d*[1-9]", console.export_text())


def test_an_unanswered_call_reconciles_as_unknown_and_never_as_zero(
    sandbox: SandboxServers, metered_run: list[str], openai_client: Any
) -> None:
    sandbox.openai.faults.add("lost", times=1)  # completed and billed, the answer never sent
    with usage_scope("task", "lost"), pytest.raises(openai.APIConnectionError):
        openai_client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hello?"}]
        )
    result = _check_all(sandbox)
    assert result.ok, (result.missing, result.extra, result.mismatched, result.rollups)
    assert len(result.unanswered) == 1 and result.unmetered_usd > 0
    assert result.truth["cost_usd"] == result.ledger["cost_usd"]  # the answered ones agree

    with session_scope() as s:  # a meter that priced it at $0 is caught
        s.execute(
            update(OpenAICall).where(OpenAICall.status == "billed_unknown").values(cost_usd=0)
        )
    result = _check_all(sandbox)
    assert not result.ok and len(result.mismatched) == 1 and "usage unknown" in result.mismatched[0]

    with session_scope() as s:  # a meter that never recorded it is caught
        s.delete(s.scalars(select(OpenAICall).where(OpenAICall.status == "billed_unknown")).one())
    result = _check_all(sandbox)
    assert not result.ok and len(result.missing) == 1 and not result.unanswered


def _check_all(sandbox: SandboxServers):
    with Session(get_engine()) as s:
        return reconcile(s, sandbox.ledger.rows())


def test_a_call_that_never_reached_the_provider_is_counted_apart(
    sandbox: SandboxServers, metered_run: list[str], openai_client: Any
) -> None:
    """The connection broke before the provider took the call (the sandbox's ``drop``): the
    ledger's billed-unknown row has no bill, and the run says so instead of calling it a
    failed call (the audit by the minute needs the count to explain the ledger's extra
    request)."""
    once = openai_client.with_options(max_retries=0)
    with usage_scope("task", "dropped"), pytest.raises(openai.APIConnectionError):
        once.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "anyone?"}],
            extra_headers={"X-Sandbox-Fault": "drop"},
        )
    result = _check_all(sandbox)
    assert result.ok, (result.missing, result.extra, result.mismatched, result.rollups)
    assert result.never_reached == ["chat"] and result.error_rows == 0
    console = Console(record=True, width=120)
    console.print(report_table(result))
    assert re.search(r"of which never billed\s*│[\s│]*1\s*│", console.export_text())
