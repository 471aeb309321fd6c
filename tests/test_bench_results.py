"""bench/RESULTS.md: each benchmark rewrites its own section and leaves the others alone."""

from __future__ import annotations

from pathlib import Path

from bench.results import write_section


def test_sections_are_replaced_in_place_and_others_kept(tmp_path: Path) -> None:
    path = tmp_path / "RESULTS.md"
    write_section(path, "peers", "| tool | ratio |\n| a | 1.0 |")
    write_section(path, "throughput-0ms", "throughput v1")
    write_section(path, "peers", "peers v2")

    text = path.read_text()
    assert text.startswith("# Benchmark results\n")
    assert text.count("<!-- peers:start -->") == 1
    assert "peers v2" in text and "| a | 1.0 |" not in text
    assert "throughput v1" in text
    assert text.index("peers v2") < text.index("throughput v1")  # order kept
    assert text.count("UTC,") == 2  # each section says when and where it was measured


def test_a_killed_runs_redis_claim_is_abandoned_a_live_or_foreign_one_is_not() -> None:
    import os
    import socket

    from bench.redisdb import _abandoned
    from tests.helpers import dead_pid

    host = socket.gethostname()
    assert _abandoned(f"{host}:{dead_pid()}:abc".encode())
    assert not _abandoned(f"{host}:{os.getpid()}:abc")  # this very run
    assert not _abandoned(f"another-host:{dead_pid()}:abc")  # not ours to judge
    assert not _abandoned(None) and not _abandoned(b"garbage")


WRK = """Running 5s test @ http://127.0.0.1:40111/api/usage/summary
  1 threads and 20 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     4.74ms    5.16ms  99.41ms   97.29%
    Req/Sec     4.86k   436.88     5.19k    90.00%
  Latency Distribution
     50%  812.00us
     75%    3.93ms
     90%    4.15ms
     99%    1.02s
  24182 requests in 5.00s, 8.83MB read
Requests/sec:   4836.28
Transfer/sec:      1.77MB
"""


def test_a_wrk_report_is_read_in_seconds_and_a_failed_run_is_refused() -> None:
    import pytest

    from bench.api import parse_wrk

    assert parse_wrk(WRK) == (4836.28, 812e-6, 1.02)
    with pytest.raises(SystemExit, match="failed requests"):
        parse_wrk(WRK.replace("Requests/sec", "  Non-2xx or 3xx responses: 3\nRequests/sec"))
    with pytest.raises(SystemExit, match="not a wrk"):
        parse_wrk("Running 5s test\n")


def test_throughput_ratios_pool_the_rounds_time_and_show_their_spread() -> None:
    import pytest

    from bench.throughput import Ratios

    # a round where both ran fast does not count as one vote: it took less time
    r = Ratios.of([90.0, 300.0, 100.0], [100.0, 250.0, 125.0])
    assert r.median == pytest.approx(0.9)
    assert (r.low, r.high) == (pytest.approx(0.8), pytest.approx(1.2))
    bare_time = 1 / 100 + 1 / 250 + 1 / 125
    metered_time = 1 / 90 + 1 / 300 + 1 / 100
    assert r.pooled == pytest.approx(bare_time / metered_time)
    assert r.pooled < r.median  # the two slow rounds weigh more than the fast one

    assert Ratios.of([50.0], [100.0]) == Ratios(0.5, 0.5, 0.5, 0.5)
    with pytest.raises(ValueError, match="every round"):
        Ratios.of([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="every round"):
        Ratios.of([], [])


def test_the_least_capture_keeps_each_answers_usage_for_chat_and_stream() -> None:
    """bench/capture_floor.py's floor must capture what a ledger row needs, or it is no floor:
    each chat answer's usage, model, tier and request id, and a stream's usage chunk."""
    from openai._base_client import SyncAPIClient

    from bench.capture_floor import least_capture
    from bench.per_task import CHAT, chat, client

    kept: list[tuple[object, ...]] = []
    original = SyncAPIClient.request
    SyncAPIClient.request = least_capture(original, kept)  # type: ignore[method-assign]
    try:
        c = client()
        chat(c, stream=False)
        chat(c, stream=True)
    finally:
        SyncAPIClient.request = original  # type: ignore[method-assign]
    assert len(kept) == 2
    (_, _, answer), (_, _, streamed_usage) = kept
    usage, model, tier, request_id = answer  # type: ignore[misc]
    assert (usage.prompt_tokens, usage.completion_tokens) == (1200, 40)
    assert (model, tier) == (CHAT["model"], "default")
    assert str(request_id).startswith("req_")
    assert streamed_usage.prompt_tokens_details.cached_tokens == 1024  # type: ignore[attr-defined]
