"""The sandbox, driven by the real openai and praw clients over real HTTP."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

import httpx
import openai
import pytest

from tests.helpers import STREAM_DROPPED, wait_for
from tokenmeter.sandbox import usage
from tokenmeter.sandbox.ground_truth import BilledRequest
from tokenmeter.sandbox.openai_server import text_tokens
from tokenmeter.sandbox.pytest_plugin import SANDBOX_KEY
from tokenmeter.sandbox.runner import SandboxServers

HI = [{"role": "user", "content": "hi"}]


def test_chat_usage_headers_and_ground_truth(openai_client, sandbox) -> None:
    raw = openai_client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=HI, extra_headers={"X-Client-Request-Id": "sandbox-test-1"}
    )
    completion = raw.parse()
    rid = raw.headers["x-request-id"]
    assert rid.startswith("req_") and completion._request_id == rid
    assert completion.model == "gpt-4o-mini-2024-07-18"
    u = completion.usage
    assert u.prompt_tokens == 3 + 4 + text_tokens("hi") == 8
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert u.completion_tokens == len(completion.choices[0].message.content.split(" "))
    billed = sandbox.ledger.get(rid)
    assert billed == BilledRequest(
        request_id=rid,
        operation="chat",
        model="gpt-4o-mini-2024-07-18",
        input_tokens=u.prompt_tokens,
        output_tokens=u.completion_tokens,
        # the provider's charge at its own list price ($0.15 / $0.60 per 1M, gpt-4o-mini)
        cost_usd=(Decimal("0.15") * u.prompt_tokens + Decimal("0.60") * u.completion_tokens)
        / 1_000_000,
        client_request_id="sandbox-test-1",  # the caller's own id, kept as OpenAI logs it
        created=billed.created,
        api_key_id=usage.api_key_id(f"Bearer {SANDBOX_KEY}"),  # who called, by id
        project_id=usage.DEFAULT_PROJECT,  # no OpenAI-Project header: the default project
    )
    assert abs(billed.created - time.time()) < 30
    assert sandbox.ledger.cost([rid]) == billed.cost_usd


def test_request_ids_are_unique(openai_client) -> None:
    ids = {
        openai_client.chat.completions.create(model="gpt-4o-mini", messages=HI)._request_id
        for _ in range(20)
    }
    assert len(ids) == 20


def test_n_choices_bill_every_choice(openai_client, sandbox) -> None:
    c = openai_client.chat.completions.create(model="gpt-4o-mini", messages=HI, n=3)
    assert len(c.choices) == 3
    words = sum(len(ch.message.content.split(" ")) for ch in c.choices)
    assert c.usage.completion_tokens == words
    assert sandbox.ledger.get(c._request_id).output_tokens == words


def test_max_tokens_caps_the_answer(openai_client) -> None:
    c = openai_client.chat.completions.create(model="gpt-4o-mini", messages=HI, max_tokens=3)
    assert c.usage.completion_tokens == 3 and c.choices[0].finish_reason == "length"


def test_json_mode_returns_json_and_echoes_requested_object(openai_client) -> None:
    plain = openai_client.chat.completions.create(
        model="gpt-4o-mini", messages=HI, response_format={"type": "json_object"}
    )
    assert set(json.loads(plain.choices[0].message.content)) >= {"relevance", "quality", "fit"}
    asked = {"ideas": [{"name": "knitted fox"}], "score": 9}
    prompt = f"Rate this.\nSANDBOX_JSON: {json.dumps(asked)}"
    echo = openai_client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": prompt}],
        response_format={"type": "json_object"},
    )
    assert json.loads(echo.choices[0].message.content) == asked


def test_tools_return_a_tool_call(openai_client, sandbox) -> None:
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {}}}]
    c = openai_client.chat.completions.create(model="gpt-4o", messages=HI, tools=tools)
    call = c.choices[0].message.tool_calls[0]
    assert call.function.name == "lookup" and c.choices[0].finish_reason == "tool_calls"
    assert c.usage.completion_tokens == text_tokens(call.function.arguments) + 5
    assert c.usage.prompt_tokens == 8 + text_tokens(json.dumps(tools))


def test_reasoning_tokens_only_for_reasoning_models(openai_client, sandbox) -> None:
    o = openai_client.chat.completions.create(model="o3-mini", messages=HI)
    g = openai_client.chat.completions.create(model="gpt-4o", messages=HI)
    reasoning = o.usage.completion_tokens_details.reasoning_tokens
    assert reasoning in (64, 128, 192, 256)
    assert o.usage.completion_tokens == reasoning + len(o.choices[0].message.content.split(" "))
    assert g.usage.completion_tokens_details.reasoning_tokens == 0
    assert sandbox.ledger.get(o._request_id).reasoning_tokens == reasoning


def test_repeated_long_prompt_is_cached(openai_client, sandbox) -> None:
    context = "The shop sells handmade ceramics and knitwear. " * 120  # ~1440 tokens
    first = openai_client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": context + "Question one?"}]
    )
    second = openai_client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": context + "Question two?"}]
    )
    assert first.usage.prompt_tokens >= 1024
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached == (len(context) + len("Question ")) // 4 // 128 * 128 > 0
    assert sandbox.ledger.get(second._request_id).cached_input_tokens == cached


def test_stream_without_include_usage_carries_no_usage(openai_client, sandbox) -> None:
    stream = openai_client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=HI, stream=True
    )
    rid = stream.headers["x-request-id"]
    chunks = list(stream.parse())
    assert chunks and all(c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    billed = sandbox.ledger.get(rid)
    assert billed.stream and billed.output_tokens == len(text.split(" "))


def test_stream_with_include_usage_ends_with_a_usage_chunk(openai_client, sandbox) -> None:
    chunks = list(
        openai_client.chat.completions.create(
            model="gpt-4o-mini", messages=HI, stream=True, stream_options={"include_usage": True}
        )
    )
    *body, last = chunks
    assert last.choices == [] and last.usage is not None
    assert all(c.usage is None for c in body)
    text = "".join(c.choices[0].delta.content or "" for c in body if c.choices)
    assert last.usage.completion_tokens == len(text.split(" "))


def test_responses_plain_and_streaming(openai_client, sandbox) -> None:
    r = openai_client.responses.create(model="gpt-4o", input="hello there", instructions="Be kind")
    assert r.usage.input_tokens == text_tokens("Be kind") + 4 + text_tokens("hello there")
    assert r.usage.output_tokens == len(r.output_text.split(" "))
    assert sandbox.ledger.get(r._request_id).input_tokens == r.usage.input_tokens
    with openai_client.responses.stream(model="o4-mini", input="hello") as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text
    assert final.usage.output_tokens_details.reasoning_tokens > 0
    assert final.usage.output_tokens == len(final.output_text.split(" ")) + (
        final.usage.output_tokens_details.reasoning_tokens
    )


def test_embeddings_float_and_base64(openai_client, sandbox) -> None:
    as_floats = openai_client.embeddings.create(
        model="text-embedding-3-small", input=["a knitted fox", "b"], encoding_format="float"
    )
    default = openai_client.embeddings.create(model="text-embedding-3-small", input="a knitted fox")
    assert as_floats.usage.prompt_tokens == text_tokens("a knitted fox") + 1
    assert default.data[0].embedding == pytest.approx(as_floats.data[0].embedding, rel=1e-6)
    assert sandbox.ledger.get(default._request_id).input_tokens == text_tokens("a knitted fox")
    raw = httpx.post(
        f"{sandbox.openai_base_url}/embeddings",
        json={"model": "text-embedding-3-small", "input": "x", "encoding_format": "base64"},
    ).json()
    assert len(base64.b64decode(raw["data"][0]["embedding"])) == 8 * 4


def test_images_dalle_and_gpt_image(openai_client, sandbox) -> None:
    d3 = openai_client.images.generate(
        model="dall-e-3", prompt="a fox", size="1792x1024", quality="hd"
    )
    assert d3.usage is None and d3.data[0].url.endswith(".png")
    d2 = openai_client.images.generate(model="dall-e-2", prompt="a fox", n=3, size="512x512")
    assert len(d2.data) == 3
    assert sandbox.ledger.get(d2._request_id).image_count == 3
    with pytest.raises(openai.BadRequestError, match="n=1"):
        openai_client.images.generate(model="dall-e-3", prompt="fox", n=2)
    g = openai_client.images.generate(
        model="gpt-image-1", prompt="a fox", n=2, quality="high", size="1536x1024"
    )
    assert g.usage.output_tokens == 2 * 6240
    assert g.usage.input_tokens_details.text_tokens == g.usage.input_tokens == text_tokens("a fox")
    billed = sandbox.ledger.get(g._request_id)
    assert (billed.image_count, billed.image_size, billed.image_quality) == (2, "1536x1024", "high")


async def test_async_client_every_endpoint(async_openai_client, sandbox) -> None:
    c = async_openai_client
    chat = await c.chat.completions.create(model="gpt-4o-mini", messages=HI)
    stream = await c.chat.completions.create(
        model="gpt-4o-mini", messages=HI, stream=True, stream_options={"include_usage": True}
    )
    chunks = [ch async for ch in stream]
    resp = await c.responses.create(model="gpt-4o", input="hi")
    emb = await c.embeddings.create(model="text-embedding-3-large", input="hi")
    img = await c.images.generate(model="gpt-image-1", prompt="fox", quality="low")
    assert sandbox.ledger.get(chat._request_id).output_tokens == chat.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == 8
    assert sandbox.ledger.get(resp._request_id).output_tokens == resp.usage.output_tokens
    assert sandbox.ledger.get(emb._request_id).input_tokens == emb.usage.prompt_tokens
    assert sandbox.ledger.get(img._request_id).output_tokens == 272


@pytest.mark.parametrize(
    ("fault", "error"),
    [
        ("429", openai.RateLimitError),
        ("500", openai.InternalServerError),
        ("drop", openai.APIConnectionError),
    ],
)
def test_failures_raise_the_clients_error_and_bill_nothing(
    openai_client, sandbox, fault, error
) -> None:
    before = len(sandbox.ledger)
    with pytest.raises(error) as info:
        openai_client.chat.completions.create(
            model="gpt-4o-mini", messages=HI, extra_headers={"X-Sandbox-Fault": fault}
        )
    assert len(sandbox.ledger) == before
    if fault == "429":
        assert info.value.response.headers["retry-after"] == "1"
        assert info.value.request_id.startswith("req_")


def test_dropped_stream_fails_mid_way_and_bills_nothing(openai_client, sandbox) -> None:
    before = len(sandbox.ledger)
    seen = []
    with pytest.raises(STREAM_DROPPED):
        for chunk in openai_client.chat.completions.create(
            model="gpt-4o-mini",
            messages=HI,
            stream=True,
            extra_headers={"X-Sandbox-Fault": "drop"},
        ):
            seen.append(chunk)
    assert len(seen) == 2 and len(sandbox.ledger) == before


def test_slow_no_usage_null_usage_and_bad_json(openai_client, sandbox) -> None:
    started = time.perf_counter()
    openai_client.chat.completions.create(
        model="gpt-4o-mini", messages=HI, extra_headers={"X-Sandbox-Fault": "slow=150"}
    )
    assert time.perf_counter() - started >= 0.15
    hidden = openai_client.chat.completions.create(
        model="gpt-4o-mini", messages=HI, extra_headers={"X-Sandbox-Fault": "no-usage"}
    )
    assert hidden.usage is None and sandbox.ledger.get(hidden._request_id).input_tokens == 8
    nulls = openai_client.chat.completions.create(
        model="gpt-4o-mini", messages=HI, extra_headers={"X-Sandbox-Fault": "null-usage"}
    )
    assert nulls.usage.prompt_tokens is None and nulls.usage.completion_tokens is None
    bad = openai_client.chat.completions.create(
        model="gpt-4o-mini",
        messages=HI,
        response_format={"type": "json_object"},
        extra_headers={"X-Sandbox-Fault": "bad-json"},
    )
    with pytest.raises(json.JSONDecodeError):
        json.loads(bad.choices[0].message.content)
    with pytest.raises(openai.BadRequestError, match="unknown sandbox fault"):
        openai_client.chat.completions.create(
            model="gpt-4o-mini", messages=HI, extra_headers={"X-Sandbox-Fault": "teapot"}
        )


def test_programmatic_fault_plan_and_error_rate() -> None:
    with SandboxServers() as s:
        client = openai.OpenAI(base_url=s.openai_base_url, api_key="sk", max_retries=0)
        s.openai.faults.add("429", times=2, model="gpt-4o")
        for _ in range(2):
            with pytest.raises(openai.RateLimitError):
                client.chat.completions.create(model="gpt-4o", messages=HI)
        client.chat.completions.create(model="gpt-4o-mini", messages=HI)
        client.chat.completions.create(model="gpt-4o", messages=HI)
        s.openai.faults.set_error_rate(0.5, seed=3)
        outcomes = []
        for _ in range(40):
            try:
                client.chat.completions.create(model="gpt-4o-mini", messages=HI)
                outcomes.append(True)
            except (openai.RateLimitError, openai.InternalServerError):
                outcomes.append(False)
        assert 5 < outcomes.count(False) < 35
        assert len(s.ledger) == 2 + outcomes.count(True)


def test_ledger_totals_equal_what_clients_saw_and_http_agrees(sandbox) -> None:
    with SandboxServers() as s:
        client = openai.OpenAI(base_url=s.openai_base_url, api_key="sk", max_retries=0)
        seen = {"input_tokens": 0, "output_tokens": 0}
        for i in range(10):
            c = client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "x" * i * 50}]
            )
            seen["input_tokens"] += c.usage.prompt_tokens
            seen["output_tokens"] += c.usage.completion_tokens
        totals = s.ledger.totals()
        assert {k: totals[k] for k in seen} == seen
        over_http = httpx.get(f"{s.openai_base_url.removesuffix('/v1')}/_sandbox/ledger").json()
        assert [BilledRequest.from_json(r) for r in over_http] == s.ledger.rows()


def test_praw_reads_listings_and_posts_a_comment(praw_reddit, sandbox) -> None:
    new = list(praw_reddit.subreddit("handmade").new(limit=None))
    assert len(new) == 15
    assert [p.created_utc for p in new] == sorted((p.created_utc for p in new), reverse=True)
    paged = list(praw_reddit.subreddit("crafts").new(limit=12))  # praw pages with `after`
    assert len({p.id for p in paged}) == 12
    hot = list(praw_reddit.subreddit("gifts").hot(limit=3))
    assert [p.score for p in hot] == sorted((p.score for p in hot), reverse=True)
    before = len(sandbox.reddit.comments)
    comment = new[0].reply("What a lovely set!")
    assert comment.body == "What a lovely set!"
    posted = sandbox.reddit.comments[before:]
    assert [(c.parent_fullname, c.body) for c in posted] == [
        (f"t3_{new[0].id}", "What a lovely set!")
    ]
    [info] = list(praw_reddit.info(fullnames=[f"t3_{new[1].id}"]))
    assert info.title == new[1].title


def test_tokenmeter_sandbox_command_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tokenmeter.reporting.cli",
            "sandbox",
            "--openai-port",
            "0",
            "--reddit-port",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 30
        base = None
        lines = []
        while base is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            if line.startswith("OPENAI_BASE_URL="):
                base = line.strip().split("=", 1)[1]
        assert base, "".join(lines)
        client = openai.OpenAI(base_url=base, api_key="sk", max_retries=0)
        assert client.chat.completions.create(model="gpt-4o-mini", messages=HI).usage
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_stream_the_client_left_is_billed_in_full(openai_client, sandbox) -> None:
    stream = openai_client.chat.completions.create(model="gpt-4o-mini", messages=HI, stream=True)
    next(iter(stream))
    stream.close()
    request_id = stream.response.headers["x-request-id"]
    row = wait_for(lambda: sandbox.ledger.get(request_id), 10, "the stream billed")
    assert row.stream and row.output_tokens > 0 and row.cost_usd > 0


def test_lost_answers_are_billed_under_the_callers_request_id(openai_client, sandbox) -> None:
    with pytest.raises(openai.APIConnectionError):
        openai_client.chat.completions.create(
            model="gpt-4o-mini",
            messages=HI,
            extra_headers={"X-Sandbox-Fault": "lost", "X-Client-Request-Id": "mine-1"},
        )
    row = sandbox.ledger.by_client_request_id("mine-1")
    assert row is not None and row.input_tokens > 0 and row.cost_usd > 0


def test_a_client_request_id_over_512_characters_is_refused(openai_client, sandbox) -> None:
    with pytest.raises(openai.BadRequestError, match="X-Client-Request-Id"):
        openai_client.chat.completions.create(
            model="gpt-4o-mini", messages=HI, extra_headers={"X-Client-Request-Id": "x" * 513}
        )
    assert len(sandbox.ledger) == 0


@pytest.mark.parametrize(
    ("model", "asked", "served"),
    [
        ("gpt-5-mini", "flex", "flex"),
        ("gpt-5-mini", "priority", "priority"),
        ("gpt-5", "fast", "priority"),  # fast is served (and shown) as priority
        ("gpt-5-nano", "priority", "default"),  # not offered: served on default, and said so
        ("gpt-4o-mini", "flex", "default"),
        ("gpt-5-mini", None, "default"),
    ],
)
def test_the_served_tier_is_in_the_body_every_chunk_and_the_bill(
    openai_client, sandbox, model, asked, served
) -> None:
    extra = {} if asked is None else {"service_tier": asked}
    answer = openai_client.chat.completions.create(model=model, messages=HI, **extra)
    assert answer.service_tier == served and answer.model.startswith(f"{model}-2025-08-07"[:6])
    assert sandbox.ledger.get(answer._request_id).service_tier == served
    chunks = list(
        openai_client.chat.completions.create(model=model, messages=HI, stream=True, **extra)
    )
    assert {c.service_tier for c in chunks} == {served}


def test_gpt_5_snapshots_and_tier_prices(openai_client, sandbox) -> None:
    answer = openai_client.chat.completions.create(
        model="gpt-5-mini", messages=HI, service_tier="flex"
    )
    billed = sandbox.ledger.get(answer._request_id)
    assert answer.model == "gpt-5-mini-2025-08-07"
    u = answer.usage
    # flex: half of $0.25 / $2 per 1M (the sandbox's own list, billing.py)
    assert billed.cost_usd == (u.prompt_tokens * Decimal("0.125") + u.completion_tokens) / 10**6


def test_web_search_is_an_output_item_billed_per_call(openai_client, sandbox) -> None:
    plain = openai_client.responses.create(model="gpt-4.1-mini", input="gift ideas")
    searched = openai_client.responses.create(
        model="gpt-4.1-mini", input="gift ideas", tools=[{"type": "web_search"}]
    )
    assert [o.type for o in searched.output] == ["web_search_call", "message"]
    assert [o.type for o in plain.output] == ["message"]
    a, b = sandbox.ledger.get(plain._request_id), sandbox.ledger.get(searched._request_id)
    assert (a.web_search_calls, b.web_search_calls) == (0, 1)
    tokens = (b.input_tokens * Decimal("0.40") + b.output_tokens * Decimal("1.60")) / 10**6
    assert b.cost_usd == tokens + Decimal("0.01")  # $10 per 1,000 calls on top of the tokens
    assert (
        a.cost_usd == (a.input_tokens * Decimal("0.40") + a.output_tokens * Decimal("1.60")) / 10**6
    )
