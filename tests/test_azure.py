"""Azure OpenAI: a deployment names the model.  The real AzureOpenAI client over HTTP to the
sandbox's ``/openai/deployments/{name}/...`` routes."""

from __future__ import annotations

import logging
from decimal import Decimal

import pytest
from openai import AzureOpenAI

from tests.helpers import clear_settings
from tokenmeter.context import usage_scope

HI = [{"role": "user", "content": "hi"}]


pytestmark = pytest.mark.usefixtures("hooks")  # instrumented, a collecting sink


def azure(sandbox, **kw) -> AzureOpenAI:
    return AzureOpenAI(
        azure_endpoint=sandbox.openai_base_url.removesuffix("/v1"),
        api_key="azure-key",
        api_version="2024-10-21",
        max_retries=0,
        **kw,
    )


def test_a_deployment_resolves_by_the_response_else_by_the_setting(sandbox, monkeypatch) -> None:
    monkeypatch.setenv("TOKENMETER_AZURE_DEPLOYMENTS", '{"prod-dalle3": "dall-e-3"}')
    clear_settings()
    client = azure(sandbox)
    with usage_scope("task", "azure") as scope:
        client.images.generate(model="prod-dalle3", prompt="a knitted fox")
        answer = client.chat.completions.create(model="prod-chat", messages=HI)
    image, chat = scope.all_calls()
    # images carry no model: the setting says what the deployment serves ($0.040 per image,
    # dall-e-3 standard 1024x1024)
    assert image.model == "dall-e-3" and image.cost_usd == Decimal("0.04")
    assert sandbox.ledger.get(image.request_id).cost_usd == image.cost_usd
    # a chat response names its model: priced by it, whatever the deployment is called
    assert chat.model == answer.model == "gpt-4o-mini-2024-07-18"
    assert chat.cost_usd == sandbox.ledger.get(chat.request_id).cost_usd


def test_an_unlisted_deployment_costs_null_with_one_warning(sandbox, caplog) -> None:
    client = azure(sandbox, azure_deployment="prod-dalle3")
    with (
        caplog.at_level(logging.WARNING, logger="tokenmeter.pricing"),
        usage_scope("task", "azure-unlisted") as scope,
    ):
        client.images.generate(prompt="a knitted fox")
        client.images.generate(prompt="a knitted owl")
    first, second = scope.all_calls()
    assert first.model == "prod-dalle3" and first.cost_usd is None and second.cost_usd is None
    assert sandbox.ledger.get(first.request_id).cost_usd == Decimal("0.04")  # billed all the same
    assert len([r for r in caplog.records if "prod-dalle3" in r.getMessage()]) == 1
    assert scope.totals.cost_usd is None  # unknown, never a guess
