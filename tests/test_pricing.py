"""Prices as data: family resolution, effective dates, overrides, unknown models, images."""

from __future__ import annotations

import json
import logging
import re
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tokenmeter.context import CallRecord
from tokenmeter.pricing import PriceError, PriceRow, PriceTable

M = Decimal(1_000_000)


@pytest.fixture
def table() -> PriceTable:
    return PriceTable.load()


def chat(
    model: str, n_in: int, n_out: int, cached: int = 0, at: datetime | None = None, **kw
) -> CallRecord:
    call = CallRecord(
        operation="chat",
        response_model=model,
        input_tokens=n_in,
        output_tokens=n_out,
        cached_input_tokens=cached,
        **kw,
    )
    if at is not None:
        call.created_at = at
    return call


@pytest.mark.parametrize(
    ("model", "family"),
    [
        ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
        ("gpt-4o-2024-08-06", "gpt-4o"),
        ("gpt-4.1-nano-2025-04-14", "gpt-4.1-nano"),
        ("gpt-4.1-2025-04-14", "gpt-4.1"),
        ("o3-mini-2025-01-31", "o3-mini"),
        ("gpt-4-0613", "gpt-4"),
        ("gpt-3.5-turbo-0125", "gpt-3.5-turbo"),
        ("gpt-4-turbo-2024-04-09", "gpt-4-turbo"),
        ("gpt-4o-audio-preview", None),  # not gpt-4o's price: unknown
        ("ft:gpt-4o-mini:acme::abc123", None),
    ],
)
def test_dated_names_resolve_to_their_family_and_nothing_else(table, model, family) -> None:
    assert table.family(model) == family


def test_mini_is_not_priced_as_its_big_sibling(table) -> None:
    mini = table.cost_of(chat("gpt-4o-mini-2024-07-18", 1_000_000, 0))
    big = table.cost_of(
        chat("gpt-4o-2024-08-06", 1_000_000, 0, at=datetime(2025, 1, 1, tzinfo=UTC))
    )
    assert mini == (Decimal("0.15"), "gpt-4o-mini@2024-07-18")
    assert big == (Decimal("2.50"), "gpt-4o@2024-10-02")


def test_effective_dates_pick_the_price_of_that_day(table) -> None:
    before = chat("gpt-4o", 1000, 1000, at=datetime(2024, 6, 1, tzinfo=UTC))
    after = chat("gpt-4o", 1000, 1000, at=datetime(2024, 11, 1, tzinfo=UTC))
    assert table.cost_of(before) == (
        (1000 * Decimal(5) + 1000 * Decimal(15)) / M,
        "gpt-4o@2024-05-13",
    )
    assert table.cost_of(after) == (
        (1000 * Decimal("2.5") + 1000 * Decimal(10)) / M,
        "gpt-4o@2024-10-02",
    )
    assert table.price_for("o3", date(2025, 1, 1)) is None  # before the model existed


def test_cached_input_at_cached_rate_and_reasoning_not_double_counted(table) -> None:
    call = chat("o4-mini-2025-04-16", 2048, 500, cached=1024, reasoning_tokens=384)
    cost, _ = table.cost_of(call)
    # 1024 fresh input + 1024 cached input + 500 output (384 of them reasoning, billed once)
    assert cost == (1024 * Decimal("1.10") + 1024 * Decimal("0.275") + 500 * Decimal("4.40")) / M


def test_sub_cent_costs_stay_exact(table) -> None:
    cost, _ = table.cost_of(
        CallRecord(operation="embedding", requested_model="text-embedding-3-small", input_tokens=3)
    )
    assert cost == Decimal("0.00000006") and cost > 0


def test_images_by_size_quality_and_count(table) -> None:
    def image(model: str, n: int, size: str, quality: str) -> Decimal | None:
        return table.cost_of(
            CallRecord(
                operation="image",
                requested_model=model,
                image_count=n,
                image_size=size,
                image_quality=quality,
            )
        )[0]

    assert image("dall-e-3", 1, "1024x1024", "standard") == Decimal("0.04")
    assert image("dall-e-3", 1, "1792x1024", "hd") == Decimal("0.12")
    assert image("dall-e-2", 4, "256x256", "standard") == 4 * Decimal("0.016")
    assert image("dall-e-2", 1, "1024x1024", "hd") is None  # no such price: unknown, not 0
    gpt_image = CallRecord(
        operation="image",
        requested_model="gpt-image-1",
        input_tokens=120,
        input_image_tokens=100,
        output_tokens=2 * 1056,
        image_count=2,
    )
    assert (
        table.cost_of(gpt_image)[0]
        == (20 * Decimal(5) + 100 * Decimal(10) + 2112 * Decimal(40)) / M
    )


def test_unknown_model_costs_none_and_warns_once(table, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="tokenmeter.pricing"):
        for _ in range(3):
            assert table.cost_of(chat("mystery-model-9", 10, 10)) == (None, None)
    warnings = [r for r in caplog.records if "mystery-model-9" in r.getMessage()]
    assert len(warnings) == 1


def test_a_category_without_a_price_is_unknown_not_free() -> None:
    """An embedding row has no output price: output tokens on it are not priced at $0."""
    table = PriceTable(
        [
            PriceRow(model="embed-x", effective=date(2024, 1, 1), input=Decimal("0.02")),
            PriceRow(model="out-only", effective=date(2024, 1, 1), output=Decimal("1.00")),
        ]
    )
    assert table.cost_of(chat("embed-x", 1_000_000, 0))[0] == Decimal("0.02")
    assert table.cost_of(chat("embed-x", 1_000, 10)) == (None, None)
    assert table.cost_of(chat("out-only", 0, 1_000_000))[0] == Decimal("1.00")
    assert table.cost_of(chat("out-only", 10, 1_000)) == (None, None)


def test_failed_calls_cost_zero_and_unknown_usage_costs_none(table) -> None:
    failed = chat("gpt-4o-mini", 0, 0, status="error", usage_reported=False)
    hidden = chat("gpt-4o-mini", 0, 0, usage_reported=False)
    assert table.cost_of(failed) == (Decimal(0), None)
    assert table.cost_of(hidden) == (None, None)


def test_override_file_adds_and_replaces_rows(tmp_path: Path) -> None:
    override = tmp_path / "prices.toml"
    override.write_text(
        '[[price]]\nmodel = "gpt-4o-mini"\neffective = 2024-07-18\ninput = 0.10\n'
        'output = "0.40"\n\n[[price]]\nmodel = "acme-llm"\neffective = 2025-01-01\n'
        'input = "1"\noutput = "2"\n'
    )
    table = PriceTable.load(override)
    assert table.cost_of(chat("gpt-4o-mini-2024-07-18", 1000, 1000))[0] == Decimal("0.0005")
    assert table.cost_of(chat("acme-llm", 1000, 1000))[0] == Decimal("0.003")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('[[price]]\nmodel = "x"\ninput = "0.1"\n', "row 1 (x)"),
        ('[[price]]\nmodel = "x"\neffective = 2025-01-01\nprice = "1"\n', "Extra inputs"),
        ("this is not toml", "not valid TOML"),
    ],
)
def test_bad_override_files_say_which_file_and_row(tmp_path: Path, content, message) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(content)
    with pytest.raises(PriceError, match=re.escape(message)) as info:
        PriceTable.load(bad)
    assert str(bad) in str(info.value)


def test_prices_command_shows_the_table_as_json(monkeypatch, tmp_path) -> None:
    from tokenmeter.reporting.cli import app

    result = CliRunner().invoke(app, ["prices", "--format", "json", "--at", "2024-06-01"])
    assert result.exit_code == 0, result.output
    rows = {r["model"]: r for r in json.loads(result.output)}
    assert rows["gpt-4o"]["input"] == "5.00" and rows["gpt-4o"]["effective"] == "2024-05-13"
    assert "o3" not in rows  # not yet released on that day
    table = CliRunner(env={"COLUMNS": "200"}).invoke(app, ["prices"])
    assert table.exit_code == 0 and "gpt-4o-mini" in table.output
    monkeypatch.setenv("TOKENMETER_PRICES_FILE", str(tmp_path / "missing.toml"))
    from tests.helpers import clear_settings

    clear_settings()
    missing = CliRunner().invoke(app, ["prices"])
    assert missing.exit_code == 2 and "does not exist" in missing.output


def test_a_failed_call_that_reports_tokens_is_priced(table) -> None:
    """Only a failure with no tokens at all costs $0; one that reports input is billed."""
    failed = chat("gpt-4o-mini", 1_000_000, 0, status="error")
    assert table.cost_of(failed)[0] == Decimal("0.15")


def test_price_rows_are_immutable(table) -> None:
    from pydantic import ValidationError

    row = table.price_for("gpt-4o-mini")
    assert row is not None
    with pytest.raises(ValidationError):
        row.input = Decimal(0)  # type: ignore[misc]
