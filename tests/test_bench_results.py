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
