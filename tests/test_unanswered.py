"""Calls the client gave up on: the provider may have billed them, so they are never $0.

The sandbox finishes and bills what it started whatever the client does (a timeout, a lost
answer), and keeps the ``X-Client-Request-Id`` each attempt carried.  Every attempt that may
have been billed without an answer is a ledger row of its own, ``billed_unknown`` with cost
NULL, whose client request id finds what the provider billed.
"""

from __future__ import annotations

import socket

import openai
import pytest
from openai import AsyncOpenAI, OpenAI

from tests.helpers import wait_for
from tokenmeter.context import usage_scope

HI = [{"role": "user", "content": "hi"}]


pytestmark = pytest.mark.usefixtures("hooks")  # instrumented, a collecting sink


def billed_under(sandbox, client_request_id: str):
    """What the provider billed under that client request id (it may finish after we gave up)."""
    return wait_for(
        lambda: sandbox.ledger.by_client_request_id(client_request_id),
        timeout=10,
        what=f"the sandbox to bill {client_request_id}",
    )


def test_a_timed_out_call_is_billed_unknown_and_found_by_its_client_request_id(
    sandbox,
) -> None:
    client = OpenAI(base_url=sandbox.openai_base_url, api_key="sk", max_retries=0, timeout=0.3)
    with usage_scope("task", "timeout") as scope, pytest.raises(openai.APITimeoutError):
        client.chat.completions.create(
            model="gpt-4o-mini", messages=HI, extra_headers={"X-Sandbox-Fault": "slow=800"}
        )
    [call] = scope.all_calls()
    assert call.status == "billed_unknown" and call.error_type == "APITimeoutError"
    assert call.cost_usd is None and not call.usage_reported  # never an exact $0
    assert scope.totals.cost_usd is None and scope.totals.uncosted_calls == 1
    billed = billed_under(sandbox, call.client_request_id)
    assert billed.input_tokens > 0 and billed.cost_usd > 0  # the provider did charge for it


def test_each_retried_attempt_that_got_no_answer_is_its_own_row(sandbox) -> None:
    client = OpenAI(base_url=sandbox.openai_base_url, api_key="sk", max_retries=2)
    sandbox.openai.faults.add("lost", times=2)  # completed and billed, answer never sent
    with usage_scope("task", "retries") as scope:
        answer = client.chat.completions.create(model="gpt-4o-mini", messages=HI)
    lost, lost_again, ok = scope.all_calls()
    assert [c.status for c in (lost, lost_again, ok)] == ["billed_unknown"] * 2 + ["ok"]
    assert lost.request_id is None and lost.error_type in ("ReadError", "RemoteProtocolError")
    assert len({lost.client_request_id, lost_again.client_request_id, ok.client_request_id}) == 3
    assert (
        ok.request_id == answer._request_id
        and ok.cost_usd == sandbox.ledger.get(answer._request_id).cost_usd
    )
    # the provider billed three requests; each row finds its own
    assert len(sandbox.ledger) == 3
    for row in (lost, lost_again):
        assert billed_under(sandbox, row.client_request_id).request_id != answer._request_id
    assert sandbox.ledger.by_client_request_id(ok.client_request_id).request_id == ok.request_id
    assert scope.totals.calls == 3 and scope.totals.cost_usd is None


def test_a_timed_out_attempt_then_an_answer(sandbox) -> None:
    client = OpenAI(base_url=sandbox.openai_base_url, api_key="sk", max_retries=1, timeout=0.3)
    sandbox.openai.faults.add("slow=800", times=1)
    with usage_scope("task", "slow-then-ok") as scope:
        client.chat.completions.create(model="gpt-4o-mini", messages=HI)
    timed_out, ok = scope.all_calls()
    assert (timed_out.status, timed_out.error_type) == ("billed_unknown", "ReadTimeout")
    assert ok.status == "ok" and ok.cost_usd is not None
    billed_under(sandbox, timed_out.client_request_id)
    wait_for(lambda: len(sandbox.ledger) == 2, timeout=10, what="both attempts billed")


def test_a_request_that_never_left_bills_nothing(sandbox) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk", max_retries=1)
    with usage_scope("task", "refused") as scope, pytest.raises(openai.APIConnectionError):
        client.chat.completions.create(model="gpt-4o-mini", messages=HI)
    [call] = scope.all_calls()  # two attempts, neither sent: one error row, $0
    assert (call.status, call.error_type) == ("error", "APIConnectionError")
    assert call.cost_usd == 0 and scope.totals.cost_usd == 0


def test_the_callers_own_client_request_id_is_kept(openai_client, sandbox) -> None:
    with usage_scope("task", "own-id") as scope:
        answer = openai_client.chat.completions.create(
            model="gpt-4o-mini", messages=HI, extra_headers={"X-Client-Request-Id": "order-77"}
        )
    [call] = scope.all_calls()
    assert call.client_request_id == "order-77"
    assert sandbox.ledger.get(answer._request_id).client_request_id == "order-77"


def test_a_client_s_own_default_request_id_and_any_spelling_are_kept(
    openai_client, sandbox
) -> None:
    own = OpenAI(
        base_url=sandbox.openai_base_url,
        api_key="sk",
        default_headers={"x-client-request-id": "client-wide-1"},
    )
    with usage_scope("task", "own-ids") as scope:
        first = own.chat.completions.create(model="gpt-4o-mini", messages=HI)
        # (another client: the oldest SDKs send both spellings when a call's header and the
        # client's default differ in case, which is the SDK's affair, not the meter's)
        second = openai_client.chat.completions.create(
            model="gpt-4o-mini", messages=HI, extra_headers={"X-CLIENT-REQUEST-ID": "call-2"}
        )
    assert [c.client_request_id for c in scope.all_calls()] == ["client-wide-1", "call-2"]
    assert sandbox.ledger.get(first._request_id).client_request_id == "client-wide-1"
    assert sandbox.ledger.get(second._request_id).client_request_id == "call-2"


def test_an_attempt_looks_for_the_caller_s_id_unless_it_knows_there_is_none() -> None:
    """Known headers that name no id: the attempt sets its own without looking; a client
    whose own headers cannot be read (none, another SDK's): it looks."""
    from types import SimpleNamespace

    from tokenmeter.openai_hooks import _may_carry_id

    plain = SimpleNamespace(headers={"OpenAI-Project": "p"})
    named = SimpleNamespace(headers={"x-client-request-id": "mine"})
    assert not _may_carry_id(plain, SimpleNamespace(_custom_headers={}))
    assert _may_carry_id(named, SimpleNamespace(_custom_headers={}))
    assert _may_carry_id(plain, SimpleNamespace(_custom_headers={"X-Client-Request-Id": "c"}))
    assert _may_carry_id(plain, SimpleNamespace())  # no _custom_headers: unknown, so look
    assert _may_carry_id(plain, None)


async def test_async_timeout_is_billed_unknown(sandbox) -> None:
    client = AsyncOpenAI(base_url=sandbox.openai_base_url, api_key="sk", max_retries=0, timeout=0.3)
    async with usage_scope("task", "async-timeout") as scope:
        with pytest.raises(openai.APITimeoutError):
            await client.chat.completions.create(
                model="gpt-4o-mini", messages=HI, extra_headers={"X-Sandbox-Fault": "slow=800"}
            )
    await client.close()
    [call] = scope.all_calls()
    assert call.status == "billed_unknown" and call.cost_usd is None
    billed_under(sandbox, call.client_request_id)


def test_a_lost_stream_is_billed_unknown(openai_client, sandbox) -> None:
    with usage_scope("task", "lost-stream") as scope, pytest.raises(openai.APIConnectionError):
        openai_client.chat.completions.create(
            model="gpt-4o-mini", messages=HI, stream=True, extra_headers={"X-Sandbox-Fault": "lost"}
        )
    [call] = scope.all_calls()
    assert call.status == "billed_unknown" and call.cost_usd is None and call.stream
    assert billed_under(sandbox, call.client_request_id).stream
