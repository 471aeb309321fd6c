"""Exact money on both backends, and the pydantic views of the tables."""

from __future__ import annotations

from decimal import Decimal

import pytest
from sqlalchemy import func, select

from models import (
    AgentScannedPost,
    AgentScannedPostSchema,
    PipelineRun,
    PipelineRunSchema,
    PipelineRunUsage,
    PipelineRunUsageSchema,
    session_scope,
)
from tokenmeter import OpenAICall, to_money
from tokenmeter.money import InexactMoneyError
from tokenmeter.schemas import OpenAICallSchema


def test_sub_cent_cost_round_trips_unchanged(db_url: str) -> None:
    with session_scope() as s:
        s.add(
            OpenAICall(
                request_id="req_1",
                operation="chat",
                model="gpt-4o-mini",
                cost_usd=Decimal("0.000045"),
            )
        )
    with session_scope() as s:
        cost = s.scalar(select(OpenAICall.cost_usd).where(OpenAICall.request_id == "req_1"))
    assert cost == Decimal("0.000045")
    assert isinstance(cost, Decimal)


def test_rollup_equals_sum_of_calls_exactly(db_url: str) -> None:
    # 0.1 + 0.2 style amounts, and the smallest unit we keep: a float sum would drift.
    costs = [Decimal("0.0000001500"), Decimal("0.1"), Decimal("0.2"), Decimal("0.0000000001")] * 250
    with session_scope() as s:
        for i, c in enumerate(costs):
            s.add(
                OpenAICall(
                    request_id=f"req_{i}",
                    operation="chat",
                    cost_usd=c,
                    scope_kind="scanned_post",
                    scope_ref="p1",
                )
            )
        s.add(AgentScannedPost(post_id="p1", subreddit="crafts", total_cost_usd=sum(costs)))
    with session_scope() as s:
        ledger_sum = s.scalar(select(func.sum(OpenAICall.cost_usd)))
        rollup = s.scalar(select(AgentScannedPost.total_cost_usd))
    assert ledger_sum == rollup == Decimal("75.0000375250")


def test_money_refuses_floats_and_silent_rounding() -> None:
    assert to_money("0.000045") == Decimal("0.0000450000")
    with pytest.raises(TypeError):
        to_money(0.1)  # type: ignore[arg-type]
    with pytest.raises(InexactMoneyError):
        to_money(Decimal("0.00000000001"))


def test_unknown_cost_stays_null(db_url: str) -> None:
    with session_scope() as s:
        s.add(OpenAICall(request_id="r", operation="chat", model="mystery", cost_usd=None))
    with session_scope() as s:
        assert s.scalar(select(OpenAICall.cost_usd)) is None
        assert s.scalar(select(func.sum(OpenAICall.cost_usd))) is None


def test_schemas_serialise_rows(db_url: str) -> None:
    with session_scope() as s:
        run = PipelineRun(status="completed", config={"commission": True, "donation_id": "d1"})
        run.usage = PipelineRunUsage(
            idea_model="gpt-4o-mini",
            image_model="dall-e-3",
            prompt_tokens=120,
            completion_tokens=80,
            image_count=2,
            total_cost_usd=Decimal("0.0800120000"),
        )
        s.add(run)
        s.add(
            AgentScannedPost(
                post_id="t3_x",
                subreddit="crafts",
                agent_model="gpt-4o-mini",
                prompt_tokens=300,
                completion_tokens=40,
                total_cost_usd=Decimal("0.000069"),
                agent_ratings={"fit": 9},
            )
        )
        s.add(
            OpenAICall(
                request_id="req_9",
                operation="image",
                model="dall-e-3",
                image_count=2,
                image_size="1024x1024",
                image_quality="standard",
                cost_usd=Decimal("0.08"),
            )
        )
    with session_scope() as s:
        run_s = PipelineRunSchema.model_validate(s.scalars(select(PipelineRun)).one())
        usage_s = PipelineRunUsageSchema.model_validate(s.scalars(select(PipelineRunUsage)).one())
        post_s = AgentScannedPostSchema.model_validate(s.scalars(select(AgentScannedPost)).one())
        call_s = OpenAICallSchema.model_validate(s.scalars(select(OpenAICall)).one())
    assert run_s.config == {"commission": True, "donation_id": "d1"}
    assert usage_s.image_count == 2 and usage_s.total_cost_usd == Decimal("0.080012")
    assert post_s.agent_model == "gpt-4o-mini"
    assert (post_s.prompt_tokens, post_s.completion_tokens) == (300, 40)
    assert post_s.total_cost_usd == Decimal("0.000069")
    assert post_s.model_dump(mode="json")["total_cost_usd"] == "0.0000690000"
    assert call_s.image_count == 2 and call_s.cost_usd == Decimal("0.08")
