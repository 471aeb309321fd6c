"""Calls the client gave up on: the provider may have billed them, so they are never $0.

The sandbox finishes and bills what it started whatever the client does (a timeout, a lost
answer), and keeps the ``X-Client-Request-Id`` each attempt carried.  Every attempt that may
have been billed without an answer is a ledger row of its own, ``billed_unknown`` with cost
NULL, whose client request id finds what the provider billed.
"""

from __future__ import annotations

import socket

import httpx2 as httpx
import openai
import pytest
from celery.exceptions import SoftTimeLimitExceeded
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


@pytest.mark.parametrize(("asked", "served"), [("fast", "priority"), ("priority", "priority")])
def test_an_unanswered_call_is_booked_on_the_tier_it_is_served_on(sandbox, asked, served) -> None:
    """OpenAI serves (and bills) a request for ``fast`` on ``priority`` and says so in the
    answer; an attempt that got no answer must be booked there too, where the provider's
    Usage API counts it (a faulted reconcile's audit by tier found one under no tier)."""
    client = OpenAI(base_url=sandbox.openai_base_url, api_key="sk", max_retries=1)
    sandbox.openai.faults.add("lost")  # completed and billed, answer never sent
    with usage_scope("task", "fast") as scope:
        answer = client.chat.completions.create(model="gpt-5", messages=HI, service_tier=asked)
    lost, ok = scope.all_calls()
    assert (lost.status, ok.status, answer.service_tier) == ("billed_unknown", "ok", served)
    assert billed_under(sandbox, lost.client_request_id).service_tier == served
    assert lost.service_tier == ok.service_tier == served


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


def test_a_request_id_the_caller_removes_is_not_put_back(openai_client, sandbox) -> None:
    with usage_scope("task", "omitted") as scope:
        answer = openai_client.chat.completions.create(
            model="gpt-4o-mini", messages=HI, extra_headers={"X-Client-Request-Id": openai.Omit()}
        )
    [call] = scope.all_calls()
    assert call.client_request_id is None and call.request_id == answer._request_id
    assert sandbox.ledger.get(answer._request_id).client_request_id is None


def test_the_caller_s_request_id_is_read_from_the_call_then_its_client_in_any_spelling() -> None:
    """The call's own headers win over its client's defaults; ``Omit`` removes the header (no
    id of ours is put in its place); a client without the SDK's ``_custom_headers`` is read
    through its public ``default_headers``."""
    from types import SimpleNamespace

    from openai import Omit

    from tokenmeter.openai_hooks import callers_request_id

    plain = SimpleNamespace(headers={"OpenAI-Project": "p"})
    named = SimpleNamespace(headers={"x-client-request-id": "mine"})
    omitted = SimpleNamespace(headers={"X-Client-Request-Id": Omit()})
    client = SimpleNamespace(_custom_headers={"X-CLIENT-REQUEST-ID": "client-wide"})
    assert callers_request_id(plain, SimpleNamespace(_custom_headers={})) == (False, None)
    assert callers_request_id(named, client) == (True, "mine")
    assert callers_request_id(plain, client) == (True, "client-wide")
    assert callers_request_id(omitted, client) == (True, None)
    public = SimpleNamespace(default_headers={"X-Client-Request-Id": "public"})
    assert callers_request_id(plain, public) == (True, "public")
    assert callers_request_id(SimpleNamespace(headers=None), None) == (False, None)
    from types import MappingProxyType  # any mapping the SDK takes, not only a dict

    frozen = SimpleNamespace(headers=MappingProxyType({"X-Client-Request-Id": "frozen"}))
    assert callers_request_id(frozen, None) == (True, "frozen")


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


async def test_async_retried_attempts_each_carry_an_id_of_their_own(sandbox) -> None:
    client = AsyncOpenAI(base_url=sandbox.openai_base_url, api_key="sk", max_retries=1, timeout=0.3)
    sandbox.openai.faults.add("slow=800", times=1)
    async with usage_scope("task", "async-retry") as scope:
        answer = await client.chat.completions.create(model="gpt-4o-mini", messages=HI)
    await client.close()
    timed_out, ok = scope.all_calls()
    assert (timed_out.status, timed_out.error_type) == ("billed_unknown", "ReadTimeout")
    assert ok.status == "ok" and ok.request_id == answer._request_id
    assert timed_out.client_request_id != ok.client_request_id
    billed_under(sandbox, timed_out.client_request_id)
    assert sandbox.ledger.by_client_request_id(ok.client_request_id).request_id == ok.request_id


class _TimeLimitWhileWaiting(httpx.BaseTransport):
    """Sends the request (the provider gets it and bills it), then the worker's soft time limit
    fires while the answer is awaited: what billiard raises into the task at that moment."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.inner.handle_request(request).close()
        raise SoftTimeLimitExceeded()


def test_a_time_limit_while_the_answer_is_awaited_leaves_a_billed_unknown_row(sandbox) -> None:
    """The interrupt goes on to the task; the request it cut off may have been billed, so its
    row is billed_unknown under the id it carried, never an error at $0.  (openai before 3.x's
    later releases wraps any error of the send, an interrupt too, in APIConnectionError.)"""
    client = OpenAI(
        base_url=sandbox.openai_base_url,
        api_key="sk",
        max_retries=0,
        http_client=httpx.Client(transport=_TimeLimitWhileWaiting()),
    )
    with (
        usage_scope("task", "time-limit") as scope,
        pytest.raises((SoftTimeLimitExceeded, openai.APIConnectionError)) as raised,
    ):
        client.chat.completions.create(model="gpt-4o-mini", messages=HI)
    [call] = scope.all_calls()
    assert (call.status, call.error_type) == ("billed_unknown", type(raised.value).__name__)
    assert call.cost_usd is None and scope.totals.cost_usd is None
    assert billed_under(sandbox, call.client_request_id).cost_usd > 0


def test_a_time_limit_before_the_request_is_built_bills_nothing(sandbox) -> None:
    """Raised before any attempt was sent (here: while the SDK prepares the request), the
    call reached no provider: an error row at $0, and the interrupt goes on."""

    class Limited(OpenAI):
        def _prepare_request(self, request: httpx.Request) -> None:
            raise SoftTimeLimitExceeded()

    client = Limited(base_url=sandbox.openai_base_url, api_key="sk", max_retries=0)
    with usage_scope("task", "time-limit-early") as scope, pytest.raises(SoftTimeLimitExceeded):
        client.chat.completions.create(model="gpt-4o-mini", messages=HI)
    [call] = scope.all_calls()
    assert (call.status, call.error_type, call.cost_usd) == ("error", "SoftTimeLimitExceeded", 0)
    assert len(sandbox.ledger) == 0
