"""Commission: a donation becomes a pipeline run: product ideas (chat), then images.

The run's ``pipeline_run_usages`` row is bound to a usage scope before the first call, so it
holds the exact totals of every call of the run (ideas, the JSON retry, images) across every
attempt, also when the run fails half way.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import openai
from openai.types.chat import ChatCompletionMessageParam
from openai.types.shared_params import ResponseFormatJSONSchema
from pydantic import BaseModel, Field, ValidationError
from sqlalchemy import select

from models.db import session_scope
from models.settings import get_settings
from models.tables import PipelineRun, PipelineRunUsage
from tasks.app import app
from tasks.clients import openai_client
from tasks.dbretry import db_step
from tokenmeter import TableRollup, usage_scope

logger = logging.getLogger(__name__)

RETRYABLE = (openai.RateLimitError, openai.APIConnectionError, openai.InternalServerError)


class Donation(BaseModel):
    id: str = Field(min_length=1, max_length=64)
    amount_usd: Decimal = Field(gt=0)
    donor: str | None = None
    message: str = Field(min_length=1, max_length=2000, description="donor message / theme")


class Idea(BaseModel):
    name: str = Field(min_length=1)
    description: str
    price_usd: float = Field(ge=0)


class Ideas(BaseModel):
    ideas: list[Idea] = Field(min_length=1)


class InvalidModelOutput(RuntimeError):
    """The model did not return the JSON we asked for, twice."""


def run_usage_rollup(run_id: int, idea_model: str, image_model: str) -> TableRollup:
    return TableRollup(
        PipelineRunUsage,
        key={"pipeline_run_id": run_id},
        sums={
            "prompt_tokens": "input_tokens",
            "completion_tokens": "output_tokens",
            "cached_prompt_tokens": "cached_input_tokens",
            "reasoning_tokens": "reasoning_tokens",
            "image_count": "image_count",
            "image_tokens": "image_tokens",
        },
        cost_column="total_cost_usd",
        values={"idea_model": idea_model, "image_model": image_model},
    )


def _run_for(donation: Donation) -> tuple[int, str]:
    """The donation's run (a retry or redelivery reuses it): (id, status)."""
    with session_scope() as s:
        run = s.scalars(
            select(PipelineRun).where(PipelineRun.config["donation_id"].as_string() == donation.id)
        ).first()
        if run is None:
            run = PipelineRun(
                status="running",
                config={"commission": True, "donation_id": donation.id},
                start_time=datetime.now(UTC),
            )
            s.add(run)
            s.flush()
        elif run.status != "completed":
            run.status = "running"
        return run.id, run.status


def _finish(run_id: int, status: str, summary: str, extra: dict[str, Any] | None = None) -> None:
    with session_scope() as s:
        run = s.get(PipelineRun, run_id)
        assert run is not None
        run.status, run.summary, run.end_time = status, summary, datetime.now(UTC)
        if extra:
            run.config = {**run.config, **extra}


def generate_ideas(donation: Donation, model: str, count: int) -> Ideas:
    """Ask for ideas as structured JSON; one retry if the answer does not validate."""
    messages: list[ChatCompletionMessageParam] = [
        {"role": "system", "content": "You design small handmade products for a charity shop."},
        {
            "role": "user",
            "content": f"A donor gave ${donation.amount_usd} with this message: "
            f"{donation.message!r}. Suggest {count} product ideas inspired by it.",
        },
    ]
    response_format: ResponseFormatJSONSchema = {
        "type": "json_schema",
        "json_schema": {"name": "product_ideas", "schema": Ideas.model_json_schema()},
    }
    for attempt in (1, 2):
        completion = openai_client().chat.completions.create(
            model=model,
            messages=messages,
            response_format=response_format,
        )
        content = completion.choices[0].message.content or ""
        try:
            return Ideas.model_validate_json(content)
        except ValidationError as exc:
            logger.warning("ideas were not valid JSON (attempt %d): %s", attempt, exc.errors()[:1])
    raise InvalidModelOutput(f"{model} returned invalid product ideas twice")


def generate_images(idea: Idea, model: str) -> list[str]:
    settings = get_settings()
    result = openai_client().images.generate(  # type: ignore[call-overload]
        model=model,
        prompt=f"Product photo of a handmade {idea.name}: {idea.description}",
        n=settings.commission_images_per_idea,
        size=settings.commission_image_size,
        quality=settings.commission_image_quality,
    )
    return [d.url or "(inline image)" for d in result.data or []]  # no base64 blobs in the DB


@app.task(
    bind=True,
    name="tasks.commission",
    autoretry_for=RETRYABLE,
    retry_backoff=2,
    retry_backoff_max=60,
    retry_jitter=True,
    max_retries=get_settings().commission_max_retries,
)
def commission(self: Any, donation: dict[str, Any]) -> dict[str, Any]:
    """Turn a donation into product ideas and images; returns the run id and products."""
    d = Donation.model_validate(donation)  # bad input fails at once, no retry
    settings = get_settings()
    idea_model, image_model = settings.openai_idea_model, settings.openai_image_model
    run_id, status = db_step("finding the donation's pipeline run", lambda: _run_for(d))
    if status == "completed":  # a redelivered message: the work is done, spend nothing
        return {"pipeline_run_id": run_id, "status": "completed", "redelivered": True}
    with usage_scope("pipeline_run", run_id) as scope:
        scope.bind_rollup(run_usage_rollup(run_id, idea_model, image_model))
        try:
            ideas = generate_ideas(d, idea_model, settings.commission_ideas)
            products: list[dict[str, Any]] = [
                {
                    "name": i.name,
                    "description": i.description,
                    "price_usd": i.price_usd,
                    "images": generate_images(i, image_model),
                }
                for i in ideas.ideas[: settings.commission_images]
            ]
        except RETRYABLE as exc:
            if self.request.retries >= self.max_retries:
                reason = f"gave up after {self.request.retries + 1} attempts: {type(exc).__name__}"
                db_step("recording the failure", lambda: _finish(run_id, "failed", reason))
            raise  # autoretry_for: Celery retries with backoff
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
            db_step("recording the failure", lambda: _finish(run_id, "failed", reason))
            raise
    summary = f"{len(ideas.ideas)} ideas, {len(products)} illustrated: " + ", ".join(
        str(p["name"]) for p in products
    )
    # the ideas and images are bought: wait out a database outage here rather than retry the
    # task and buy them again
    db_step(
        "saving the products",
        lambda: _finish(run_id, "completed", summary, {"products": products}),
    )
    return {"pipeline_run_id": run_id, "status": "completed", "products": len(products)}
