"""Every CLI table at 80 and 200 columns: no figure, money amount or name is ever cut (#18)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from models import session_scope
from tasks import reports
from tokenmeter import OpenAICall
from tokenmeter.reporting.cli import GROUPINGS
from tokenmeter.reporting.cli import app as cli

LONG_MODEL = "ft:gpt-4o-mini-2024-07-18:acme-handmade-gifts::9xYzAbCd"
MODELS = (LONG_MODEL, "gpt-5-mini-2025-08-07", "dall-e-3", "o3-mini-2025-01-31")


@pytest.fixture
def ledger(db_url: str) -> None:
    now = datetime.now(UTC)
    with session_scope() as s:
        for i in range(12):
            s.add(
                OpenAICall(
                    request_id=f"req_cols_{i}",
                    operation="chat",
                    model=MODELS[i % 4],
                    task_name=("shop.tasks.commission_pipeline_with_a_long_name", "t.scan")[i % 2],
                    scope_kind=("pipeline_run", "scanned_post")[i % 2],
                    scope_ref=f"ref-{i}",
                    project=("proj_8Kx2mQ4rT7vW9yZ1aB3cD5eF", None)[i % 2],
                    service_tier=("flex", "priority", None)[i % 3],
                    status=("ok", "error")[i == 5],
                    input_tokens=123_456_789 * (i + 1),
                    cached_input_tokens=1024 * i,
                    output_tokens=98_765 * i,
                    reasoning_tokens=64 * (i % 3),
                    image_count=i % 2,
                    cost_usd=Decimal("1234.5678901234") - Decimal(i),
                    created_at=now - timedelta(hours=i),
                )
            )


def _check(output: str, columns: int, must_contain: list[str]) -> None:
    lines = output.splitlines()
    assert "…" not in output, output
    assert max(map(len, lines)) <= columns, output
    for text in must_contain:
        assert any(text in line for line in lines), (text, output)


@pytest.mark.parametrize("columns", [80, 200])
@pytest.mark.parametrize("by", GROUPINGS)
def test_check_usage_keeps_every_name_and_amount_whole(ledger, by: str, columns: int) -> None:
    as_json = CliRunner().invoke(
        cli, ["check-usage", "--by", by, "--since", "1d", "--format", "json"]
    )
    assert as_json.exit_code == 0, as_json.output
    payload = json.loads(as_json.output)
    expected = [g["key"] for g in payload["groups"]]
    from tokenmeter.reporting.render import money

    expected += [money(Decimal(g["cost_usd"])) for g in payload["groups"] if g["cost_usd"]]
    table = CliRunner().invoke(
        cli, ["check-usage", "--by", by, "--since", "1d"], env={"COLUMNS": str(columns)}
    )
    assert table.exit_code == 0, table.output
    _check(table.output, columns, expected)


@pytest.mark.parametrize("columns", [80, 200])
def test_check_usage_filters_by_model_and_task(ledger, columns: int) -> None:
    result = CliRunner().invoke(
        cli,
        [
            "check-usage",
            "--by",
            "tier",
            "--model",
            LONG_MODEL,
            "--task",
            "t.scan",
            "--format",
            "json",
        ],
    )
    assert result.exit_code == 0, result.output
    # the long model is every 4th call (0, 4, 8): all even, so none of them is t.scan's
    assert json.loads(result.output)["groups"] == []
    only = CliRunner().invoke(
        cli, ["check-usage", "--model", LONG_MODEL, "--since", "1d"], env={"COLUMNS": str(columns)}
    )
    assert only.exit_code == 0
    _check(only.output, columns, [LONG_MODEL, "3 calls"])


@pytest.mark.parametrize("columns", [80, 200])
def test_scopes_and_the_demos_tables_keep_every_amount_whole(ledger, columns: int) -> None:
    result = CliRunner().invoke(cli, ["scopes", "--since", "1d"], env={"COLUMNS": str(columns)})
    assert result.exit_code == 0, result.output
    _check(result.output, columns, ["ref-0", "$1234.5678901234"])
    runs = [
        reports.RunRow(
            7,
            "completed",
            "Paper quilling: a first framed piece " * 3,
            59,
            93,
            2,
            Decimal("0.08006465"),
        )
    ]
    posts = [
        reports.PostRow(
            "120c5c7",
            "handmade",
            "Knitting a fox for my niece, pattern inside " * 2,
            True,
            160,
            48,
            Decimal("0.0000528"),
        )
    ]
    console = Console(width=columns, record=True)
    console.print(reports.runs_table(runs, "runs", columns))
    console.print(reports.posts_table(posts, "posts", columns))
    _check(console.export_text(), columns, ["$0.08006465", "$0.0000528", "completed", "120c5c7"])


def test_a_narrow_terminal_is_told_what_it_is_not_shown(ledger) -> None:
    """At 60 columns the longest model and its cost cannot share a line: the name folds onto
    the next, the amount stays whole, and what was left out is said."""
    from tokenmeter.reporting.render import money

    as_json = CliRunner().invoke(cli, ["check-usage", "--since", "1d", "--format", "json"])
    amounts = [money(Decimal(g["cost_usd"])) for g in json.loads(as_json.output)["groups"]]
    result = CliRunner().invoke(
        cli, ["check-usage", "--by", "model", "--since", "1d"], env={"COLUMNS": "60"}
    )
    assert result.exit_code == 0
    assert "not shown at 60 columns" in result.output and "…" not in result.output
    assert all(a in result.output for a in amounts), result.output


def test_watch_needs_a_table_and_no_until(ledger) -> None:
    for extra in (["--format", "json"], ["--until", "2026-12-01"], []):
        args = ["check-usage", "--watch", "0.01" if not extra else "1", *extra]
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 2 and "--watch takes" in result.output, (extra, result.output)


@pytest.mark.parametrize("columns", [80, 200])
def test_the_price_rows_keep_every_name_and_price_whole(tmp_path, monkeypatch, columns) -> None:
    """Found by trying it: the listing cut a user's fine-tuned model to ``ft:gpt-4o-m…`` and
    dall-e's sizes to ``standard/10…``, and left out cache-write and tool prices."""
    from tests.helpers import clear_settings

    name = "ft:gpt-4o-mini-2024-07-18:acme-corporation:support-bot-v2:9AbCdEfG"
    monkeypatch.chdir(tmp_path)  # a short path: a long one is folded, as it must be
    rows = Path("prices.toml")
    rows.write_text(
        f'[[price]]\nmodel = "{name}"\neffective = 2025-01-01\ninput = "0.30"\n'
        'cached_input = "0.15"\ncache_write = "0.375"\noutput = "1.20"\nweb_search = "10"\n'
    )
    monkeypatch.setenv("TOKENMETER_PRICES_FILE", str(rows))
    clear_settings()
    result = CliRunner().invoke(cli, ["prices"], env={"COLUMNS": str(columns)})
    assert result.exit_code == 0, result.output
    _check(
        result.output,
        columns,
        [
            name,
            f"file:{rows}",
            "$0.375  per 1M tokens",
            "$10  per 1K calls",
            "image standard/1024x1792  $0.080  per image",
            "genai-prices",
        ],
    )
