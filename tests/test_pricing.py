"""Prices as data: the maintained data under tokenmeter's and the user's rows, every billing
dimension at its own rate, the served tier, dates, unknowns never guessed.

Expected figures are written out from OpenAI's published prices (USD per 1M tokens), not read
from the price package: https://openai.com/api/pricing and https://platform.openai.com/docs/pricing
(standard tier), https://openai.com/api-priority-processing/ (priority), the flex guide (flex is
half of standard), all read 2026-12-01; dall-e per image from the pricing page (2025-06-30).
"""

from __future__ import annotations

import json
import logging
import re
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from tokenmeter import maintained
from tokenmeter.context import CallRecord
from tokenmeter.pricing import Price, PriceError, PriceRow, Prices, PriceTable

M = Decimal(1_000_000)
NOW = datetime(2026, 12, 1, 12, tzinfo=UTC)


@pytest.fixture
def prices() -> Prices:
    return Prices.load()


def chat(
    model: str, n_in: int, n_out: int, cached: int = 0, at: datetime | None = NOW, **kw
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


def cost(prices: Prices, call: CallRecord) -> Decimal | None:
    return prices.cost_of(call).cost


# -- the maintained data --------------------------------------------------------------------------
def test_a_dated_snapshot_has_its_own_price_not_its_familys(prices) -> None:
    """gpt-4o-2024-05-13 is listed at $5 / $15; the gpt-4o alias moved to $2.50 / $10."""
    old = prices.cost_of(chat("gpt-4o-2024-05-13", 1000, 1000, at=datetime(2025, 3, 1, tzinfo=UTC)))
    new = prices.cost_of(chat("gpt-4o-2024-08-06", 1000, 1000, at=datetime(2025, 3, 1, tzinfo=UTC)))
    assert old.cost == (1000 * Decimal(5) + 1000 * Decimal(15)) / M
    assert new.cost == (1000 * Decimal("2.5") + 1000 * Decimal(10)) / M
    assert old.source == maintained.source() and old.version.startswith("gpt-4o-2024-05-13@")
    assert cost(prices, chat("gpt-3.5-turbo-1106", 1000, 1000)) == (1000 * 1 + 1000 * 2) / M


def test_today_s_models_are_priced(prices) -> None:
    """gpt-5 family, standard tier: gpt-5 $1.25 / $0.125 cached / $10; mini $0.25 / $0.025 /
    $2; nano $0.05 / $0.005 / $0.40."""
    for model, (inp, cached, out) in {
        "gpt-5-2025-08-07": ("1.25", "0.125", "10"),
        "gpt-5-mini-2025-08-07": ("0.25", "0.025", "2"),
        "gpt-5-nano-2025-08-07": ("0.05", "0.005", "0.40"),
    }.items():
        got = cost(prices, chat(model, 2000, 300, cached=1024, reasoning_tokens=128))
        want = (976 * Decimal(inp) + 1024 * Decimal(cached) + 300 * Decimal(out)) / M
        assert got == want, model


@pytest.mark.parametrize(
    ("tier", "rates"),
    [
        ("default", ("0.25", "0.025", "2.00")),
        ("flex", ("0.125", "0.0125", "1.00")),  # half
        ("priority", ("0.45", "0.045", "3.60")),
        ("fast", ("0.45", "0.045", "3.60")),  # served and billed as priority
        ("auto", ("0.25", "0.025", "2.00")),
        (None, ("0.25", "0.025", "2.00")),
    ],
)
def test_the_served_tier_is_priced_at_its_own_rate(prices, tier, rates) -> None:
    call = chat("gpt-5-mini-2025-08-07", 3000, 500, cached=2048, service_tier=tier)
    inp, cached, out = (Decimal(r) for r in rates)
    assert cost(prices, call) == (952 * inp + 2048 * cached + 500 * out) / M
    version = prices.cost_of(call).version
    assert version is not None and (("flex" in version) == (tier == "flex"))


def test_batch_is_half_price(prices) -> None:
    call = chat("gpt-5-mini-2025-08-07", 1000, 1000, batch=True)
    assert cost(prices, call) == (1000 * Decimal("0.125") + 1000 * Decimal(1)) / M


def test_a_tier_the_data_has_no_price_for_is_unknown_never_standard(prices, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="tokenmeter.pricing"):
        flex_mini = prices.cost_of(chat("gpt-4o-mini-2024-07-18", 1000, 10, service_tier="flex"))
        scale = prices.cost_of(chat("gpt-5-mini-2025-08-07", 1000, 10, service_tier="scale"))
    assert flex_mini.cost is None and scale.cost is None
    assert "no price for the flex tier" in caplog.text


def test_a_price_cut_prices_each_call_by_its_own_day(prices) -> None:
    """o3: $10 / $40 at launch, $2 / $8 from 2025-06-10 (OpenAI's price cut)."""
    before = chat("o3-2025-04-16", 1000, 1000, at=datetime(2025, 6, 9, 23, 59, tzinfo=UTC))
    after = chat("o3-2025-04-16", 1000, 1000, at=datetime(2025, 6, 10, 0, 1, tzinfo=UTC))
    assert cost(prices, before) == (1000 * Decimal(10) + 1000 * Decimal(40)) / M
    assert cost(prices, after) == (1000 * Decimal(2) + 1000 * Decimal(8)) / M
    assert prices.cost_of(after).version == "o3@2025-06-10"
    assert prices.cost_of(before).version == "o3@listed"  # the launch row has no start date


def test_a_tier_read_from_a_response_is_compared_by_value() -> None:
    """Tier names arrive as fresh strings (parsed JSON), never the interned literals."""
    fresh = "".join
    call = chat("gpt-5-mini-2025-08-07", 1000, 100)
    flex = maintained.quote(call, "gpt-5-mini", fresh(["fl", "ex"]), False)
    standard = maintained.quote(call, "gpt-5-mini", fresh(["def", "ault"]), False)
    assert flex is not None and flex.cost is not None and flex.version.endswith(" flex")
    assert standard is not None and standard.cost is not None and " " not in standard.version
    assert flex.cost < standard.cost


def test_the_maintained_quote_says_why_it_is_unknown() -> None:
    batch = maintained.quote(
        chat("text-embedding-3-small", 10, 0), "text-embedding-3-small", "default", True
    )
    assert batch is not None and batch.cost is None
    assert batch.reason is not None and "no price for batch processing" in batch.reason
    # usage the data's rules reject (more image tokens than input tokens): unknown, not raised
    bad = chat("gpt-image-1", 10, 1, input_image_tokens=50)
    rejected = maintained.quote(bad, "gpt-image-1", "default", False)
    assert rejected is not None and rejected.cost is None
    assert rejected.reason is not None and "cannot exceed" in rejected.reason
    with pytest.raises(AttributeError):
        rejected.cost = Decimal(0)  # type: ignore[misc]


def test_a_naive_moment_is_read_as_utc_by_the_maintained_data() -> None:
    aware = chat("o3-2025-04-16", 1000, 1000, at=datetime(2025, 6, 10, 0, 1, tzinfo=UTC))
    naive = chat("o3-2025-04-16", 1000, 1000, at=datetime(2025, 6, 10, 0, 1))
    quotes = [maintained.quote(c, "o3", "default", False) for c in (aware, naive)]
    assert quotes[0] == quotes[1] and quotes[0] is not None
    assert quotes[0].version == "o3@2025-06-10"
    # 01:00 in Berlin on the day of the cut is 23:00 UTC the day before: the launch price
    berlin = chat(
        "o3-2025-04-16",
        1000,
        1000,
        at=datetime(2025, 6, 10, 1, 0, tzinfo=timezone(timedelta(hours=2))),
    )
    before = maintained.quote(berlin, "o3", "default", False)
    assert before is not None and before.version == "o3@listed"


def test_the_data_s_age_is_its_newest_checked_day_up_to_today(monkeypatch) -> None:
    newest = maintained.newest_date()
    assert newest is not None and newest <= datetime.now(UTC).date()

    class Frozen(datetime):
        @classmethod
        def now(cls, tz=None):  # type: ignore[override]
            return datetime(newest.year, newest.month, newest.day, 12, tzinfo=tz)

    monkeypatch.setattr(maintained, "datetime", Frozen)
    assert maintained.newest_date() == newest  # a day checked today counts
    day_before = newest - timedelta(days=1)

    class Earlier(datetime):
        @classmethod
        def now(cls, tz=None):  # type: ignore[override]
            return datetime(day_before.year, day_before.month, day_before.day, tzinfo=tz)

    monkeypatch.setattr(maintained, "datetime", Earlier)
    older = maintained.newest_date()
    assert older is None or older <= day_before  # a day after "today" never counts


class _Starts:
    """A genai-prices start-date constraint, as the data shapes it."""

    def __init__(self, day: date) -> None:
        self.start_date = day

    def active(self, at: datetime) -> bool:
        return at.date() >= self.start_date


def _rows(*constraints: object) -> SimpleNamespace:
    return SimpleNamespace(prices=[SimpleNamespace(constraint=c) for c in constraints])


def test_the_row_in_force_and_the_variants_of_the_day() -> None:
    jan, jun = _Starts(date(2025, 1, 1)), _Starts(date(2025, 6, 1))
    dated = _rows(jan, jun)
    assert maintained._row_start(dated, datetime(2025, 7, 1, tzinfo=UTC)) == date(2025, 6, 1)
    assert maintained._row_start(dated, datetime(2025, 2, 1, tzinfo=UTC)) == date(2025, 1, 1)
    # before every row: the first row's start (the data's earliest figure), not the last's
    assert maintained._row_start(dated, datetime(2024, 1, 1, tzinfo=UTC)) == date(2025, 1, 1)
    assert maintained._row_start(SimpleNamespace(prices="one row"), NOW) is None

    flex = {"service_tier": "flex"}
    info = SimpleNamespace(
        price_variants=[
            SimpleNamespace(constraint=jun, when=flex),  # not yet in force in February
            SimpleNamespace(constraint=None, when={"processing": "batch"}),
            SimpleNamespace(constraint=jan, when=flex),
        ]
    )
    feb = datetime(2025, 2, 1, tzinfo=UTC)
    assert maintained._variant_active(info, flex, feb)  # found past the one not in force
    assert maintained._variant_active(info, {"processing": "batch"}, feb)
    assert not maintained._variant_active(info, {"service_tier": "priority"}, feb)
    assert not maintained._variant_active(
        SimpleNamespace(price_variants=[SimpleNamespace(constraint=jun, when=flex)]), flex, feb
    )


def test_a_variant_of_another_provider_s_model_is_not_this_one_s(monkeypatch) -> None:
    """A model the data finds through another provider keeps its own variants to itself."""
    info = SimpleNamespace(
        id="borrowed",
        prices="one row",
        price_variants=[SimpleNamespace(constraint=None, when={"service_tier": "flex"})],
    )
    provider = SimpleNamespace(models=[SimpleNamespace(id="a"), SimpleNamespace(id="b")])
    monkeypatch.setattr(maintained, "_find", lambda model: (provider, info))
    quote = maintained.quote(chat("borrowed", 10, 1), "borrowed", "flex", False)
    assert quote is not None and quote.cost is None
    assert quote.reason is not None and "no price for the flex tier" in quote.reason


def test_openai_models_are_the_openai_provider_s_only() -> None:
    from genai_prices.data_snapshot import get_snapshot

    [openai] = [p for p in get_snapshot().providers if p.id == "openai"]
    assert maintained.openai_models() == [m.id for m in openai.models]
    assert "gpt-4o-mini" in maintained.openai_models()


def test_web_search_calls_carry_their_fee(prices) -> None:
    """The web search tool: $10 per 1,000 calls on top of the tokens (gpt-4o: $2.50 / $10)."""
    call = CallRecord(
        operation="responses",
        response_model="gpt-4o-2024-08-06",
        input_tokens=1000,
        output_tokens=100,
        web_search_calls=3,
    )
    call.created_at = NOW
    assert cost(prices, call) == (1000 * Decimal("2.5") + 100 * Decimal(10)) / M + 3 * Decimal(
        "0.01"
    )


def test_a_dimension_without_a_price_is_unknown_not_free(prices) -> None:
    searched = chat("gpt-4o-search-preview", 100, 10, web_search_calls=1)
    assert cost(prices, searched) is None  # the model has no per-search price in the data


def test_cache_writes_cost_the_input_rate_before_gpt_5_6_and_more_after() -> None:
    """ "Cache writes have no additional fee on models before the GPT-5.6 family. For GPT-5.6
    models and later model families, cache writes cost 1.25x the uncached input token rate"
    (https://developers.openai.com/api/docs/guides/prompt-caching, read 2026-12-01).
    gpt-5-mini: $0.25 input, $2 output per 1M; gpt-5.6-sol from 2026-08-21: $4 input, $5
    written, $0.40 cached, $20 output (genai-prices 0.2.3)."""
    prices = Prices.load()
    wrote = chat("gpt-5-mini-2025-08-07", 2000, 10, cache_write_tokens=1024)
    assert cost(prices, wrote) == (2000 * Decimal("0.25") + 10 * 2) / M  # no surcharge
    assert cost(prices, wrote) == cost(prices, chat("gpt-5-mini-2025-08-07", 2000, 10))
    sol = chat("gpt-5.6-sol", 3000, 100, cached=1000, cache_write_tokens=1536)
    expected = (464 * 4 + 1536 * 5 + 1000 * Decimal("0.4") + 100 * 20) / M
    assert cost(prices, sol) == expected
    assert cost(prices, sol) > cost(prices, chat("gpt-5.6-sol", 3000, 100, cached=1000))


def test_a_users_row_without_a_write_price(tmp_path: Path) -> None:
    """A negotiated row that says nothing of cache writes: on a model without a surcharge the
    writes are input at the row's rate; on one with a surcharge, or a model nobody knows,
    their price is unknown and so is the call's."""
    override = tmp_path / "prices.toml"
    override.write_text(
        '[[price]]\nmodel = "gpt-4o"\neffective = 2025-01-01\ninput = "2"\noutput = "8"\n\n'
        '[[price]]\nmodel = "gpt-5.6-sol"\neffective = 2025-01-01\ninput = "3"\noutput = "15"\n\n'
        '[[price]]\nmodel = "acme-llm"\neffective = 2025-01-01\ninput = "1"\noutput = "2"\n'
    )
    prices = Prices.load(override)
    assert cost(prices, chat("gpt-4o", 2000, 100, cache_write_tokens=1024)) == Decimal("0.0048")
    assert cost(prices, chat("gpt-5.6-sol", 2000, 100, cache_write_tokens=1024)) is None
    assert cost(prices, chat("acme-llm", 2000, 100, cache_write_tokens=1024)) is None
    assert cost(prices, chat("gpt-5.6-sol", 2000, 100)) == Decimal("0.0075")


def test_gpt_image_tokens_and_embeddings(prices) -> None:
    """gpt-image-1: text input $5, image input $10, output $40; embedding-3-small $0.02."""
    gpt_image = CallRecord(
        operation="image",
        requested_model="gpt-image-1",
        input_tokens=120,
        input_image_tokens=100,
        output_tokens=2 * 1056,
        image_count=2,
    )
    assert cost(prices, gpt_image) == (20 * Decimal(5) + 100 * Decimal(10) + 2112 * 40) / M
    embed = CallRecord(
        operation="embedding", requested_model="text-embedding-3-small", input_tokens=3
    )
    assert cost(prices, embed) == Decimal("0.00000006")


def test_every_openai_model_of_the_data_prices_a_minimal_call(prices) -> None:
    """Each of the data's OpenAI models gives a price for 1,000 in / 100 out tokens, except
    those it prices in other units (listed, with why)."""
    other_units = {  # priced per audio hour or per character, or not at all
        "whisper-1": "per audio minute",
        "gpt-transcribe": "per audio minute",
        "gpt-live-1": "per audio hour",
        "gpt-live-transcribe": "per audio hour",
        "gpt-realtime-translate": "per audio hour",
        "gpt-realtime-whisper": "per audio hour",
        "tts-1": "per character",
        "tts-1-hd": "per character",
        "moderation": "free",
    }
    models = maintained.openai_models()
    assert len(models) > 100
    unpriced = []
    for model in models:
        price = prices.cost_of(chat(model, 1000, 100))
        if price.cost is None or (price.cost == 0 and model not in other_units):
            unpriced.append(model)
    assert [m for m in unpriced if m not in other_units and not m.startswith("ft:")] == []


# -- tokenmeter's rows and the user's ------------------------------------------------------------
def test_dall_e_per_image_from_tokenmeter_s_own_rows(prices) -> None:
    def image(model: str, n: int, size: str, quality: str) -> Price:
        return prices.cost_of(
            CallRecord(
                operation="image",
                requested_model=model,
                image_count=n,
                image_size=size,
                image_quality=quality,
            )
        )

    assert image("dall-e-3", 1, "1024x1024", "standard").cost == Decimal("0.04")
    assert image("dall-e-3", 1, "1792x1024", "hd").cost == Decimal("0.12")
    assert image("dall-e-2", 4, "256x256", "standard").cost == 4 * Decimal("0.016")
    assert image("dall-e-2", 1, "1024x1024", "hd").cost is None  # no such price: unknown
    assert image("dall-e-3", 1, "1024x1024", "standard").source == "tokenmeter"


def test_a_users_file_always_wins_exact_name_first(tmp_path: Path) -> None:
    override = tmp_path / "prices.toml"
    override.write_text(
        '[[price]]\nmodel = "gpt-5-mini"\neffective = 2025-08-07\ninput = "0.20"\n'
        'cached_input = "0.02"\noutput = "1.60"\n\n'
        '[[price]]\nmodel = "gpt-5-mini-2025-08-07"\neffective = 2026-12-01\ninput = "0.10"\n'
        'output = "1"\n\n'
        '[[price]]\nmodel = "acme-llm"\neffective = 2025-01-01\ninput = "1"\noutput = "2"\n'
        'cache_write = "1.25"\n'
    )
    prices = Prices.load(override)
    on_day = chat("gpt-5-mini-2025-08-07", 1000, 1000)
    day_before = chat("gpt-5-mini-2025-08-07", 1000, 1000, at=datetime(2026, 11, 30, tzinfo=UTC))
    assert cost(prices, on_day) == Decimal("0.0011")  # the exact snapshot's negotiated row
    assert prices.cost_of(on_day).source == f"file:{override}"
    # the day before, the snapshot's own row is not yet in force: no price, not the family's
    assert cost(prices, day_before) is None
    assert cost(prices, chat("gpt-5-mini", 1000, 1000)) == Decimal("0.0018")
    wrote = chat("acme-llm", 2000, 1000, cache_write_tokens=1000)
    assert cost(prices, wrote) == (1000 * 1 + 1000 * Decimal("1.25") + 1000 * 2) / M


def test_a_users_tier_row(tmp_path: Path) -> None:
    override = tmp_path / "prices.toml"
    override.write_text(
        '[[price]]\nmodel = "acme-llm"\neffective = 2025-01-01\ninput = "1"\noutput = "2"\n\n'
        '[[price]]\nmodel = "acme-llm"\neffective = 2025-01-01\nservice_tier = "flex"\n'
        'input = "0.5"\noutput = "1"\n'
    )
    prices = Prices.load(override)
    assert cost(prices, chat("acme-llm", 1000, 1000, service_tier="flex")) == Decimal("0.0015")
    flex = prices.cost_of(chat("acme-llm", 1, 1, service_tier="flex"))
    assert flex.version == "acme-llm@2025-01-01 flex"
    assert cost(prices, chat("acme-llm", 1000, 1000)) == Decimal("0.003")
    assert cost(prices, chat("acme-llm", 1000, 1000, service_tier="priority")) is None


def test_a_category_without_a_price_in_a_row_is_unknown_not_free() -> None:
    table = PriceTable(
        [
            PriceRow(model="embed-x", effective=date(2024, 1, 1), input=Decimal("0.02")),
            PriceRow(model="out-only", effective=date(2024, 1, 1), output=Decimal("1.00")),
        ],
        "test",
    )
    prices = Prices(table, PriceTable([], "tokenmeter"))
    assert cost(prices, chat("embed-x", 1_000_000, 0)) == Decimal("0.02")
    assert cost(prices, chat("embed-x", 1_000, 10)) is None
    assert cost(prices, chat("out-only", 0, 1_000_000)) == Decimal("1.00")
    assert cost(prices, chat("out-only", 10, 1_000)) is None


def test_unknown_model_costs_none_and_warns_once(prices, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="tokenmeter.pricing"):
        for _ in range(3):
            assert prices.cost_of(chat("mystery-model-9", 10, 10)) == Price(None)
    warnings = [r for r in caplog.records if "mystery-model-9" in r.getMessage()]
    assert len(warnings) == 1


def test_failed_unanswered_and_unreported_calls(prices) -> None:
    failed = chat("gpt-4o-mini", 0, 0, status="error", usage_reported=False)
    hidden = chat("gpt-4o-mini", 0, 0, usage_reported=False)
    lost = CallRecord(operation="image", requested_model="dall-e-3", status="billed_unknown")
    assert prices.cost_of(failed).cost == Decimal(0)
    assert prices.cost_of(hidden).cost is None
    assert prices.cost_of(lost).cost is None  # never the per-image price of 0 images
    reported = chat("gpt-4o-mini", 1_000_000, 0, status="error")
    assert prices.cost_of(reported).cost == Decimal("0.15")  # a failure that reports input


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
        Prices.load(bad)
    assert str(bad) in str(info.value)


def test_price_rows_are_immutable() -> None:
    from pydantic import ValidationError

    row = PriceRow(model="m", effective=date(2025, 1, 1), input=Decimal(1))
    with pytest.raises(ValidationError):
        row.input = Decimal(0)  # type: ignore[misc]


# -- tokenmeter prices -----------------------------------------------------------------------------
def test_prices_command_quotes_a_model_on_a_tier_and_a_day() -> None:
    from tokenmeter.reporting.cli import app

    cli = CliRunner()
    flex = cli.invoke(app, ["prices", "gpt-5-mini", "--tier", "flex", "--format", "json"])
    assert flex.exit_code == 0, flex.output
    assert json.loads(flex.output) | {"day": None} == {
        "model": "gpt-5-mini",
        "tier": "flex",
        "batch": False,
        "day": None,
        "source": maintained.source(),
        "row": "gpt-5-mini@listed flex",
        "input_per_1m": "0.1250000000",
        "cached_input_per_1m": "0.0125000000",
        "output_per_1m": "1.0000000000",
    }
    cut = cli.invoke(app, ["prices", "o3", "--at", "2025-06-01", "--format", "json"])
    assert json.loads(cut.output)["input_per_1m"] == "10.0000000000"
    image = cli.invoke(app, ["prices", "dall-e-3", "--format", "json"])
    assert json.loads(image.output)["per_image"]["hd/1024x1024"] == "0.080"
    unknown = cli.invoke(app, ["prices", "mystery-model-9"])
    assert unknown.exit_code == 2 and "NULL" in unknown.output
    source = cli.invoke(app, ["prices", "--source", "--format", "json"])
    info = json.loads(source.output)
    assert info["maintained"].startswith("genai-prices ") and info["openai_models"] > 100
    assert date.fromisoformat(info["newest_check"]) <= date.today()


def test_prices_command_lists_tokenmeters_rows_and_says_what_is_wrong(
    monkeypatch, tmp_path
) -> None:
    from tests.helpers import clear_settings
    from tokenmeter.reporting.cli import app

    listed = CliRunner().invoke(app, ["prices", "--format", "json"])
    assert listed.exit_code == 0, listed.output
    rows = {r["model"]: r for r in json.loads(listed.output)}
    assert rows["dall-e-3"]["images"]["standard/1024x1024"] == "0.040"
    monkeypatch.setenv("TOKENMETER_PRICES_FILE", str(tmp_path / "missing.toml"))
    clear_settings()
    missing = CliRunner().invoke(app, ["prices"])
    assert missing.exit_code == 2 and "does not exist" in missing.output
    assert CliRunner().invoke(app, ["prices", "--at", "yesterday"]).exit_code == 2


def test_a_price_that_changes_mid_day_prices_each_call_by_its_own_moment(tmp_path: Path) -> None:
    override = tmp_path / "prices.toml"
    override.write_text(
        '[[price]]\nmodel = "acme-llm"\neffective = 2026-12-01\ninput = "1"\noutput = "2"\n\n'
        '[[price]]\nmodel = "acme-llm"\neffective = 2026-12-01T12:00:00Z\ninput = "3"\n'
        'output = "4"\n'
    )
    prices = Prices.load(override)
    morning = chat("acme-llm", 1000, 1000, at=datetime(2026, 12, 1, 11, 59, 59, tzinfo=UTC))
    noon = chat("acme-llm", 1000, 1000, at=datetime(2026, 12, 1, 12, 0, 0, tzinfo=UTC))
    assert cost(prices, morning) == Decimal("0.003")
    assert cost(prices, noon) == Decimal("0.007")
    assert prices.cost_of(noon).version == "acme-llm@2026-12-01T12:00:00+00:00"


def _one_row(**prices: str) -> Prices:
    row = PriceRow(
        model="acme-llm", effective=date(2025, 1, 1), **{k: Decimal(v) for k, v in prices.items()}
    )
    return Prices(PriceTable([row], "test"), PriceTable([], "tokenmeter"))


def test_a_row_prices_every_dimension_at_its_own_rate() -> None:
    """Found by mutation testing: each of these rates was unchecked in a user's row."""
    prices = _one_row(
        input="1",
        cached_input="0.1",
        cache_write="1.25",
        image_input="2",
        input_audio="4",
        output="8",
        output_audio="16",
        web_search="10",
        file_search="2.5",
    )
    call = chat(
        "acme-llm",
        10_000,
        3_000,
        cached=1_000,
        cache_write_tokens=2_000,
        input_image_tokens=500,
        input_audio_tokens=1_500,
        output_audio_tokens=1_000,
        web_search_calls=3,
        file_search_calls=2,
    )
    text_in = 10_000 - 1_000 - 2_000 - 500 - 1_500
    tokens = (
        text_in * 1
        + 1_000 * Decimal("0.1")
        + 2_000 * Decimal("1.25")
        + 500 * 2
        + 1_500 * 4
        + (3_000 - 1_000) * 8
        + 1_000 * 16
    )
    assert cost(prices, call) == tokens / M + (3 * 10 + 2 * Decimal("2.5")) / 1000


def test_a_row_without_a_cached_rate_bills_cached_input_as_input() -> None:
    prices = _one_row(input="1", output="2")
    assert cost(prices, chat("acme-llm", 1_000, 0, cached=600)) == Decimal("0.001")


def test_unreported_usage_and_per_image_rows() -> None:
    prices = Prices.load()
    dalle = CallRecord(
        operation="image", requested_model="dall-e-3", image_count=2, usage_reported=False
    )
    assert prices.cost_of(dalle).cost == Decimal("0.08")  # dall-e reports no usage: per image
    tokens = _one_row(input="1", output="2")
    assert cost(tokens, chat("acme-llm", 0, 0, usage_reported=False)) is None


def test_rows_in_force_a_naive_moment_and_the_batch_default() -> None:
    rows = [
        PriceRow(model="m", effective=date(2025, 1, 1), input=Decimal(1)),
        PriceRow(model="m", effective=datetime(2025, 6, 1, 12), input=Decimal(2)),  # naive: UTC
        PriceRow(model="m", effective=date(2025, 1, 1), batch=True, input=Decimal("0.5")),
    ]
    table = PriceTable(rows, "test")
    assert [r.input for r in table.rows(date(2025, 3, 1))] == [Decimal(1), Decimal("0.5")]
    assert [r.input for r in table.rows(date(2024, 3, 1))] == []
    # "on a day" is its end: a row taking effect in the day's last second is the day's row
    late = PriceTable([PriceRow(model="m", effective=datetime(2025, 2, 1, 23, 59, 59))], "t")
    assert [r.model for r in late.rows(date(2025, 2, 1))] == ["m"]
    assert late.rows(date(2025, 1, 31)) == []
    at_noon = datetime(2025, 6, 1, 12, tzinfo=UTC)
    assert table.price_for("m", at_noon).input == Decimal(2)  # not the batch row
    assert table.price_for("m", at_noon - timedelta(seconds=1)).input == Decimal(1)
    prices = Prices(table, PriceTable([], "tokenmeter"))
    price, call = prices.quote("m", at=date(2025, 3, 1))
    # the default row, not the batch one (no output price: the 1M output tokens are unknown)
    assert not call.batch and price.version == "m@2025-01-01" and price.cost is None


def test_a_price_is_immutable() -> None:
    with pytest.raises(AttributeError):
        Price(Decimal(1)).cost = Decimal(0)  # type: ignore[misc]


def test_a_row_names_a_real_tier() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="service_tier"):
        PriceRow(model="m", effective=date(2025, 1, 1), service_tier="flexx")


def test_a_moment_in_another_time_zone_is_compared_in_utc() -> None:
    """02:00 at +05:00 on the 10th is 21:00 UTC on the 9th: the row of the 10th is not yet in
    force (found by mutation testing)."""
    rows = [
        PriceRow(model="m", effective=date(2025, 6, 1), input=Decimal(1)),
        PriceRow(model="m", effective=date(2025, 6, 10), input=Decimal(2)),
    ]
    prices = Prices(PriceTable(rows, "test"), PriceTable([], "tokenmeter"))
    plus5 = timezone(timedelta(hours=5))
    early = chat("m", 1_000_000, 0, at=datetime(2025, 6, 10, 2, tzinfo=plus5))
    late = chat("m", 1_000_000, 0, at=datetime(2025, 6, 10, 6, tzinfo=plus5))
    assert (cost(prices, early), cost(prices, late)) == (Decimal(1), Decimal(2))


def test_the_fast_linear_price_is_the_package_s_own_for_every_openai_model() -> None:
    """``linear_rates`` stands in for ``calc_price`` on plain calls: it must agree to the last
    digit on every OpenAI price row, tier and batch variant of the data, at many usages; a
    tiered (long-context) price is never linearised."""
    import random

    from genai_prices import Usage
    from genai_prices.data_snapshot import get_snapshot
    from genai_prices.types import TieredPrices

    [openai] = [p for p in get_snapshot().providers if p.id == "openai"]
    rng = random.Random(7)
    checked = tiered = 0
    days = [datetime(2024, 6, 1, tzinfo=UTC), datetime(2025, 7, 1, tzinfo=UTC), NOW]
    contexts = [None, {"service_tier": "flex"}, {"service_tier": "priority"}]
    contexts.append({"processing": "batch"})
    for info in openai.models:
        for at in days:
            for context in contexts:
                try:
                    prices = info.get_prices(at, context)
                except LookupError:
                    continue
                rates = maintained.linear_rates(prices)
                if any(isinstance(v, TieredPrices) for v in vars(prices).values()):
                    assert rates is None
                    tiered += 1
                    continue
                assert rates is not None, info.id
                base, per_in, per_cached, per_out = rates
                for _ in range(5):
                    n_in = rng.choice([0, 1, 7, 999, 128_000, 1_999_999])
                    cached = rng.randint(0, n_in)
                    n_out = rng.choice([0, 1, 33, 65_536])
                    usage = Usage(input_tokens=n_in, cache_read_tokens=cached, output_tokens=n_out)
                    expected = Decimal(prices.calc_price(usage)["total_price"])
                    got = base + per_in * n_in + per_cached * cached + per_out * n_out
                    assert got == expected, (info.id, at, context, n_in, cached, n_out)
                    checked += 1
    assert checked > 500 and tiered > 0


def test_a_call_priced_the_fast_way_and_the_package_s_way_cost_the_same(
    prices, monkeypatch
) -> None:
    plain = chat("gpt-5-mini-2025-08-07", 12_345, 678, cached=10_000)
    fast = cost(prices, plain)
    assert fast == (2_345 * Decimal("0.25") + 10_000 * Decimal("0.025") + 678 * Decimal(2)) / M
    monkeypatch.setattr(maintained, "linear_rates", lambda _prices: None)
    assert cost(prices, plain) == fast  # through calc_price


def test_a_plain_call_summed_in_money_units_costs_what_the_decimal_sum_rounds_to() -> None:
    """Rates that are whole units of 1e-10 USD a token (every flat OpenAI price of the data
    today) are summed as integers: the same Decimal, digit and exponent, as the rounded
    Decimal sum; a rate that is not a whole unit is summed in Decimal."""
    import random

    from tokenmeter.pricing import _exact, in_units

    rng = random.Random(5)
    whole = 0
    for model in maintained.openai_models():
        for tier in ("default", "flex", "priority"):
            terms = maintained.terms(model, tier, False, NOW)
            rates = None if terms is None else terms[4]
            if rates is None:
                continue
            units = in_units(rates)
            whole += units is not None
            if units is None:
                continue
            for _ in range(5):
                n_in, n_out = rng.choice([0, 1, 999, 1_999_999]), rng.choice([0, 7, 65_536])
                cached = rng.randint(0, n_in)
                summed = units[0] + units[1] * n_in + units[2] * cached + units[3] * n_out
                got = Decimal(summed).scaleb(-10)
                expected = _exact(maintained.linear_cost(rates, n_in, cached, n_out))
                assert (str(got), got) == (str(expected), expected), (model, tier)
    assert whole > 50
    assert in_units((Decimal(0), Decimal("1.5E-7"), Decimal("-1.35E-7"), Decimal("6E-7"))) == (
        0,
        1500,
        -1350,
        6000,
    )
    assert in_units((Decimal(0), Decimal("1E-11"), Decimal(0), Decimal(0))) is None


def test_a_plain_call_with_a_rate_finer_than_the_money_unit_is_rounded_as_before(
    prices, monkeypatch
) -> None:
    from tokenmeter import pricing

    call = chat("gpt-5-mini-2025-08-07", 3, 1)
    in_units = cost(prices, call)
    assert prices._plain[("gpt-5-mini-2025-08-07", None, None, False, NOW.date())][3] is not None
    monkeypatch.setattr(pricing, "in_units", lambda _rates: None)
    in_decimal = Prices.load()
    assert cost(in_decimal, call) == in_units == (3 * Decimal("0.25") + Decimal(2)) / M
    assert in_decimal._plain[("gpt-5-mini-2025-08-07", None, None, False, NOW.date())][3] is None


def test_only_prices_that_change_at_midnight_are_kept_by_day() -> None:
    from genai_prices.types import StartDateConstraint

    starts = StartDateConstraint(start_date=date(2025, 6, 10))
    daily = SimpleNamespace(prices=[SimpleNamespace(constraint=None)], price_variants=None)
    daily.prices.append(SimpleNamespace(constraint=starts))
    assert maintained._daily(daily)
    hourly = SimpleNamespace(
        prices="one row", price_variants=[SimpleNamespace(constraint=_Starts(date(2025, 1, 1)))]
    )
    assert not maintained._daily(hourly)  # any other constraint: looked up for every call


def test_a_per_request_fee_is_linearised_too() -> None:
    """A price with a fee per request (none of OpenAI's has one today): the fee is the
    constant term, and the rates stay exact."""
    from genai_prices import Usage
    from genai_prices.types import ModelPrice

    price = ModelPrice(
        input_mtok=Decimal(1),
        cache_read_mtok=Decimal("0.1"),
        output_mtok=Decimal(2),
        requests_kcount=Decimal(5),
    )
    rates = maintained.linear_rates(price)
    assert rates == (Decimal("0.005"), Decimal("0.000001"), Decimal("-9E-7"), Decimal("0.000002"))
    base, per_in, per_cached, per_out = rates
    usage = Usage(input_tokens=5_000, cache_read_tokens=1_000, output_tokens=300)
    assert base + per_in * 5_000 + per_cached * 1_000 + per_out * 300 == Decimal(
        price.calc_price(usage)["total_price"]
    )


def test_a_plain_call_is_priced_without_calc_price(prices, monkeypatch) -> None:
    """The fast path is taken for input, cached and output tokens (and only for them)."""
    from genai_prices.types import ModelPrice

    plain = chat("gpt-5-mini-2025-08-07", 1_000, 100, cached=200)
    expected = cost(prices, plain)  # rates read (and kept) here

    def refuse(self, usage):
        raise AssertionError("calc_price called for a plain call")

    monkeypatch.setattr(ModelPrice, "calc_price", refuse)
    assert cost(prices, plain) == expected
    with pytest.raises(AssertionError, match="calc_price called"):
        maintained.quote(
            chat("gpt-5-mini-2025-08-07", 1_000, 100, input_image_tokens=10, web_search_calls=1),
            "gpt-5-mini",
            "default",
            False,
        )


def _full_path(prices: Prices, call: CallRecord) -> Price:
    """What the layers say without the plain-call terms kept per day."""
    keep, prices._plain_cost = prices._plain_cost, lambda _call: None  # type: ignore[method-assign]
    try:
        return prices.cost_of(call)
    finally:
        prices._plain_cost = keep  # type: ignore[method-assign]


def test_a_plain_call_priced_from_the_day_s_terms_is_priced_as_the_layers_say(
    tmp_path: Path,
) -> None:
    """Every OpenAI model of the data, asked for by its id and answered as its snapshot or not
    at all, on every tier and batch, on days with different rows, with a user's file that
    prices some of them: the same Price (cost, source, row) as the full path, call by call,
    and a second call of the same model and day is served from the kept terms."""
    import random

    rng = random.Random(11)
    own = tmp_path / "prices.toml"
    own.write_text(
        '[[price]]\nmodel = "gpt-4o"\neffective = 2024-01-01\ninput = 1\noutput = 2\n'
        '[[price]]\nmodel = "my-model"\neffective = 2024-01-01\ninput = 3\noutput = 4\n'
    )
    models = [*maintained.openai_models(), "gpt-4o-2024-08-06", "my-model-2025-01-01", "nope"]
    days = [datetime(2024, 6, 1, 9, tzinfo=UTC), datetime(2025, 7, 1, 23, 59, tzinfo=UTC), NOW]
    checked = kept = 0
    for table in (Prices.load(), Prices.load(own)):
        for model in models:
            for at in days:
                tier = rng.choice([None, "default", "auto", "flex", "priority", "scale"])
                batch = rng.random() < 0.2
                for answered_as in (model, None):
                    n_in = rng.choice([0, 1, 999, 300_000])
                    call = chat(
                        answered_as,
                        n_in,
                        rng.choice([0, 5, 70_000]),
                        cached=rng.choice([rng.randint(0, n_in), n_in + 5]),  # (more: clamped)
                        at=at,
                        requested_model=model,
                        service_tier=tier,
                        batch=batch,
                    )
                    got = table.cost_of(call)
                    assert got == _full_path(table, call), (model, at, tier, batch)
                    checked += 1
                    kept += (
                        table._plain.get((answered_as, model, tier, batch, at.date())) is not None
                    )
    assert checked > 400 and kept > 100


def test_only_plain_answered_calls_of_a_day_stable_price_use_the_day_s_terms(
    prices, monkeypatch
) -> None:
    plain = chat("gpt-5-mini-2025-08-07", 1_000, 100, cached=200)
    assert prices.cost_of(plain) == _full_path(prices, plain)
    assert prices._plain  # kept
    not_plain = [
        chat("gpt-5-mini-2025-08-07", 1_000, 100, web_search_calls=1),
        chat("gpt-4o-audio-preview", 1_000, 100, input_audio_tokens=10),
        chat("gpt-5-mini-2025-08-07", 1_000, 100, usage_reported=False),
        chat("gpt-5-mini-2025-08-07", 1_000, 100, status="error"),
        chat("gpt-5-mini-2025-08-07", 1_000, 100, at=datetime(2026, 12, 1, 12)),  # naive
    ]
    from tokenmeter.context import SUMMED_FIELDS

    plain_parts = {"input_tokens", "cached_input_tokens", "output_tokens", "reasoning_tokens"}
    for name in sorted(set(SUMMED_FIELDS) - plain_parts):  # (reasoning is billed as output)
        not_plain.append(chat("gpt-5-mini-2025-08-07", 1_000, 100, **{name: 1}))
    not_plain.append(CallRecord("image", "gpt-image-1", input_tokens=10, output_tokens=10))
    for call in not_plain:
        assert prices._plain_cost(call) is None, call
        assert prices.cost_of(call) == _full_path(prices, call)
    # a model whose price may change within a day is looked up for every call
    monkeypatch.setattr(maintained, "daily", lambda _model: False)
    prices._plain.clear()
    assert prices._plain_cost(plain) is None
    assert prices.cost_of(plain).cost is not None
