"""The sandbox's organization Usage and Costs APIs, read with the openai SDK's admin client.

They are the provider's books that ``tokenmeter audit`` will compare the ledger with, so they
must add up to what the sandbox billed, bucket by bucket and group by group, page by page, and
refuse what OpenAI refuses (a project key, a cursor of their own making).
"""

from __future__ import annotations

import itertools
import time
from decimal import Decimal
from typing import Any

import openai
import pytest
from openai import OpenAI

from tokenmeter.sandbox import usage
from tokenmeter.sandbox.ground_truth import BilledRequest

ADMIN_KEY = "sk-admin-sandbox-test"


@pytest.fixture
def admin(sandbox) -> Any:
    client = OpenAI(
        base_url=sandbox.openai_base_url,
        api_key="sk-not-used",
        admin_api_key=ADMIN_KEY,
        max_retries=0,
    )
    yield client.admin.organization.usage
    client.close()


def _calls(sandbox, key: str, project: str | None, n: int, model: str = "gpt-4o-mini") -> None:
    headers = {"OpenAI-Project": project} if project else None
    with OpenAI(base_url=sandbox.openai_base_url, api_key=key, max_retries=0) as client:
        for i in range(n):
            client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": f"usage {project} {i}"}],
                extra_headers=headers,
            )


def test_completions_usage_adds_up_to_what_was_billed_by_model_and_project(sandbox, admin) -> None:
    _calls(sandbox, "sk-proj-a", "proj_a", 3)
    _calls(sandbox, "sk-proj-b", "proj_b", 2, model="o3-mini")
    billed = sandbox.openai.ledger.rows()
    start = min(r.created for r in billed) - 5
    page = admin.completions(
        start_time=start, bucket_width="1h", group_by=["model", "project_id", "api_key_id"]
    )
    assert page.object == "page" and not page.has_more and page.next_page is None
    [bucket] = page.data
    assert bucket.object == "bucket" and bucket.start_time == start
    assert bucket.end_time - bucket.start_time <= 3600
    by_group = {(r.model, r.project_id): r for r in bucket.results}
    for (model, project), result in by_group.items():
        mine = [r for r in billed if r.model == model and r.project_id == project]
        assert result.num_model_requests == len(mine)
        assert result.input_tokens == sum(r.input_tokens for r in mine)
        assert result.input_cached_tokens == sum(r.cached_input_tokens for r in mine)
        assert result.output_tokens == sum(r.output_tokens for r in mine)
        assert result.api_key_id == usage.api_key_id(f"Bearer sk-{project.replace('_', '-')}")
    assert sorted(p for _, p in by_group) == ["proj_a", "proj_b"]
    assert "sk-proj-a" not in page.model_dump_json()  # an id, never the key

    only_b = admin.completions(start_time=start, bucket_width="1h", project_ids=["proj_b"])
    [result] = only_b.data[0].results
    assert result.num_model_requests == 2 and result.project_id is None  # not grouped


def test_buckets_and_pages_cover_the_range_and_nothing_twice(sandbox, admin) -> None:
    _calls(sandbox, "sk-proj-a", None, 2)
    now = int(time.time())
    start = now - 10 * 60  # ten minute buckets, the calls in the last one
    seen: list[int] = []
    requests = 0
    cursor = None
    pages = 0
    while True:
        kwargs = {"page": cursor} if cursor else {}
        page = admin.completions(start_time=start, bucket_width="1m", limit=3, **kwargs)
        pages += 1
        seen.extend(b.start_time for b in page.data)
        requests += sum(r.num_model_requests for b in page.data for r in b.results)
        if not page.has_more:
            break
        cursor = page.next_page
    assert pages >= 4 and seen == sorted(set(seen))  # every page, no bucket twice
    assert seen[0] == start and all(b - a == 60 for a, b in itertools.pairwise(seen))
    assert requests == 2
    assert seen[-1] + 60 >= now


def test_costs_are_the_billed_dollars_per_day(sandbox, admin) -> None:
    _calls(sandbox, "sk-proj-a", "proj_a", 2)
    _calls(sandbox, "sk-proj-b", "proj_b", 1, model="o3-mini")
    billed = sandbox.openai.ledger.rows()
    start = min(r.created for r in billed) - 60
    page = admin.costs(start_time=start, group_by=["project_id"])
    [bucket] = page.data
    by_project = {r.project_id: r.amount for r in bucket.results}
    for project, amount in by_project.items():
        expected = sum((r.cost_usd for r in billed if r.project_id == project), Decimal(0))
        assert amount.currency == "usd"
        assert Decimal(str(amount.value)) == pytest.approx(expected, abs=Decimal("1e-12"))
    assert set(by_project) == {"proj_a", "proj_b"}


def test_only_an_admin_key_reads_them_and_bad_queries_are_refused(sandbox, admin) -> None:
    with (
        OpenAI(
            base_url=sandbox.openai_base_url,
            api_key="x",
            admin_api_key="sk-proj-not-admin",
            max_retries=0,
        ) as client,
        pytest.raises(openai.PermissionDeniedError, match="admin API key"),
    ):
        client.admin.organization.usage.completions(start_time=0)
    with pytest.raises(openai.BadRequestError, match="bucket_width"):
        admin.completions(start_time=0, bucket_width="1w")  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError, match="cursor"):
        admin.completions(start_time=0, page="not-ours")
    with pytest.raises(openai.BadRequestError, match="cannot group by 'line_item'"):
        admin.costs(start_time=0, group_by=["line_item"])
    with pytest.raises(openai.BadRequestError, match="limit"):
        admin.completions(start_time=0, bucket_width="1d", limit=32)


def test_the_last_bucket_holds_only_what_came_before_the_end_of_the_range() -> None:
    rows = [
        BilledRequest(request_id="r1", operation="chat", model="m", input_tokens=5, created=100),
        BilledRequest(request_id="r2", operation="chat", model="m", input_tokens=7, created=130),
        BilledRequest(request_id="r3", operation="embedding", model="e", created=100),
    ]
    page = usage.completions(
        rows, {"start_time": ["90"], "end_time": ["131"], "bucket_width": ["1m"]}, now=500
    )
    assert [(b["start_time"], b["end_time"]) for b in page["data"]] == [(90, 150)]
    [result] = page["data"][0]["results"]
    assert result["input_tokens"] == 12 and result["num_model_requests"] == 2  # no embedding
    cut = usage.completions(rows, {"start_time": ["90"], "end_time": ["130"]}, now=500)
    assert cut["data"][0]["results"][0]["input_tokens"] == 5  # r2 came at the end: left out
    late = usage.completions(rows, {"start_time": ["131"], "bucket_width": ["1m"]}, now=200)
    assert [b["results"] for b in late["data"]] == [[], []]
