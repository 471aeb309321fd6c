"""tokenmeter check-usage on both backends: exact totals, groups, formats, clear errors."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from typer.testing import CliRunner

from models import session_scope
from tokenmeter import OpenAICall
from tokenmeter.reporting.cli import app


def seed() -> None:
    now = datetime.now(UTC)
    with session_scope() as s:
        s.add_all(
            [
                OpenAICall(
                    request_id="a",
                    operation="chat",
                    model="gpt-4o-mini",
                    task_name="scan",
                    scope_kind="scanned_post",
                    input_tokens=300,
                    output_tokens=40,
                    cost_usd=Decimal("0.000069"),
                    created_at=now - timedelta(hours=1),
                ),
                OpenAICall(
                    request_id="b",
                    operation="image",
                    model="dall-e-3",
                    task_name="commission",
                    scope_kind="pipeline_run",
                    image_count=2,
                    cost_usd=Decimal("0.08"),
                    created_at=now - timedelta(hours=2),
                ),
                OpenAICall(
                    request_id="c",
                    operation="chat",
                    model="mystery",
                    task_name="commission",
                    input_tokens=5,
                    output_tokens=5,
                    cost_usd=None,
                    created_at=now - timedelta(hours=3),
                ),
                OpenAICall(
                    request_id="old",
                    operation="chat",
                    model="gpt-4o-mini",
                    input_tokens=999,
                    cost_usd=Decimal("1"),
                    created_at=now - timedelta(days=30),
                ),
            ]
        )


def test_json_totals_are_exact_and_unknown_prices_are_not_zero(db_url: str) -> None:
    seed()
    result = CliRunner().invoke(app, ["check-usage", "--format", "json", "--since", "1d"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    groups = {g["key"]: g for g in out["groups"]}
    assert (
        groups["dall-e-3"]["cost_usd"] == "0.0800000000" and groups["dall-e-3"]["image_count"] == 2
    )
    assert groups["gpt-4o-mini"]["input_tokens"] == 300  # the 30-day-old call is outside
    assert groups["mystery"]["cost_usd"] is None and groups["mystery"]["unpriced_calls"] == 1
    assert out["total"]["calls"] == 3 and out["total"]["cost_usd"] is None


def test_group_by_kind_and_table_output(db_url: str) -> None:
    seed()
    by_kind = json.loads(
        CliRunner().invoke(app, ["check-usage", "--by", "kind", "--format", "json"]).output
    )
    assert {g["key"] for g in by_kind["groups"]} == {"scanned_post", "pipeline_run", "none"}
    table = CliRunner(env={"COLUMNS": "200"}).invoke(app, ["check-usage", "--since", "1d"])
    assert table.exit_code == 0 and "$0.08" in table.output and "unknown prices" in table.output


def test_bad_input_is_a_clear_error(db_url: str) -> None:
    for args, message in [
        (["--since", "7x"], "m, h, d or w"),
        (["--since", "99999999d"], "at most 100 years"),  # was an OverflowError traceback
        (["--since", "\u0663d"], "use a positive number"),  # an Arabic-Indic 3
        (["--since", "0d"], "use a positive number"),
        (["--since", "1" * 70_000 + "d"], "use a positive number"),
        (["--by", "colour"], "--by must be"),
        (["--format", "xml"], "--format must be"),
        (["--until", "yesterday"], "ISO date"),
    ]:
        result = CliRunner().invoke(app, ["check-usage", *args])
        assert result.exit_code == 2 and message in result.output, (args, result.output)


def test_empty_window_says_so(db_url: str) -> None:
    result = CliRunner().invoke(app, ["check-usage"])
    assert result.exit_code == 0 and "no OpenAI calls" in result.output


def test_scopes_command(db_url: str) -> None:
    assert "no scopes" in CliRunner().invoke(app, ["scopes"]).output
    seed()
    with session_scope() as s:
        s.add(
            OpenAICall(
                request_id="d",
                operation="chat",
                model="mystery",
                scope_kind="pipeline_run",
                scope_ref="7",
                cost_usd=None,
                created_at=datetime.now(UTC) - timedelta(hours=1),
            )
        )
    out = json.loads(CliRunner().invoke(app, ["scopes", "--format", "json"]).output)
    assert [(r["kind"], r["ref"], r["cost_usd"], r["unpriced_calls"]) for r in out] == [
        ("pipeline_run", "", "0.0800000000", 0),
        ("scanned_post", "", "0.0000690000", 0),
        ("pipeline_run", "7", None, 1),  # unknown price: never shown as $0
    ]
    only = json.loads(
        CliRunner().invoke(app, ["scopes", "--kind", "scanned_post", "--format", "json"]).output
    )
    assert [r["kind"] for r in only] == ["scanned_post"]
    table = CliRunner().invoke(app, ["scopes"], env={"COLUMNS": "120"}).output
    assert "$0.08" in table and "unknown" in table
    assert CliRunner().invoke(app, ["scopes", "--limit", "0"]).exit_code == 2


def test_application_reports_read_its_rollup_tables(db_url: str) -> None:
    from models import AgentScannedPost, PipelineRun, PipelineRunUsage
    from tasks import reports

    with session_scope() as s:
        assert reports.top_runs(s) == []
        cheap, dear = PipelineRun(status="completed"), PipelineRun(status="failed")
        s.add_all([cheap, dear])
        s.flush()
        s.add_all(
            [
                PipelineRunUsage(pipeline_run_id=cheap.id, total_cost_usd=Decimal("0.000045")),
                PipelineRunUsage(pipeline_run_id=dear.id, total_cost_usd=Decimal("0.08")),
                AgentScannedPost(
                    post_id="p9",
                    subreddit="gifts",
                    prompt_tokens=7,
                    total_cost_usd=Decimal("0.0000012"),
                ),
            ]
        )
    with session_scope() as s:
        runs = reports.top_runs(s)
        posts = reports.top_posts(s)
    assert [(r.status, r.total_cost_usd) for r in runs] == [
        ("failed", Decimal("0.08")),
        ("completed", Decimal("0.000045")),
    ]
    assert posts[0].post_id == "p9" and posts[0].total_cost_usd == Decimal("0.0000012")
