"""The ``tokenmeter`` command line."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn

import typer
from rich.console import Console

app = typer.Typer(
    name="tokenmeter",
    help="Exact OpenAI token and cost metering for Celery workers.",
    no_args_is_help=True,
    add_completion=False,
)


def console() -> Console:
    """A console per command, so width and colour follow the environment it runs in."""
    return Console()


def fail(message: str, code: int = 2) -> NoReturn:
    """Say what is wrong on stderr (unwrapped, so paths stay whole) and exit."""
    Console(stderr=True, soft_wrap=True).print(f"[red]error:[/red] {message}")
    raise typer.Exit(code)


@app.callback()
def _root() -> None:
    """Exact OpenAI token and cost metering for Celery workers."""


@app.command()
def migrate(
    revision: str = typer.Argument("head", help="Target revision ('head', 'base' or an id)."),
    database_url: str | None = typer.Option(
        None, "--database-url", envvar="DATABASE_URL", help="Database to migrate."
    ),
    down: bool = typer.Option(False, "--down", help="Downgrade to REVISION instead."),
) -> None:
    """Create or upgrade tokenmeter's ledger in the database - safe to run repeatedly.

    Only tokenmeter's own tables and version table (tokenmeter_alembic_version) are touched.
    """
    from tokenmeter import migrate as m
    from tokenmeter.db import normalize_url
    from tokenmeter.settings import get_settings

    url = normalize_url(database_url or get_settings().ledger_url)
    (m.downgrade if down else m.upgrade)(url, revision)
    console().print(f"[green]tokenmeter ledger at {m.redact(url)} is at {revision}[/green]")


@app.command()
def sandbox(
    host: str = typer.Option("127.0.0.1", help="Interface to listen on."),
    openai_port: int = typer.Option(8100, help="OpenAI sandbox port (0: any free port)."),
    reddit_port: int = typer.Option(8200, help="Reddit sandbox port (0: any free port)."),
) -> None:
    """Run the loopback OpenAI and Reddit sandboxes in the foreground."""
    from tokenmeter.sandbox.cli import serve

    serve(host, openai_port, reddit_port)


@app.command()
def prices(
    model: str | None = typer.Argument(None, help="What a call to this model costs, and why."),
    tier: str = typer.Option("default", help="The served service tier: default, flex, priority."),
    batch: bool = typer.Option(False, "--batch", help="At the Batch API's price."),
    at: str | None = typer.Option(None, help="On this day (YYYY-MM-DD; default today)."),
    source: bool = typer.Option(False, "--source", help="Where the prices come from, and how old."),
    fmt: str = typer.Option("table", "--format", help="table or json"),
) -> None:
    """Prices: tokenmeter's own and your TOKENMETER_PRICES_FILE rows, or one model's price."""
    import json
    from datetime import date

    from tokenmeter import maintained
    from tokenmeter.pricing import prices as active_prices

    if fmt not in ("table", "json"):
        fail(f"--format must be table or json, not {fmt!r}")
    try:
        day = date.fromisoformat(at) if at else None
        book = active_prices()
    except ValueError as exc:  # PriceError is a ValueError too
        fail(str(exc))
    if source:
        newest = maintained.newest_date()
        layers = [t.source for t in book.tables]
        models = len(maintained.openai_models())
        if fmt == "json":
            print(
                json.dumps(
                    {
                        "maintained": maintained.source(),
                        "openai_models": models,
                        "newest_check": newest.isoformat() if newest else None,
                        "layers": layers,
                    }
                )
            )
            return
        age = (
            f", newest figure verified on {newest} ({(date.today() - newest).days} days ago)"
            if newest
            else ""
        )
        console().print(
            f"{maintained.source()}: {models} OpenAI models{age}; above it: "
            f"{', '.join(layers)} (upgrade genai-prices to update)"
        )
        return
    if model is not None:
        _price_of(model, tier, batch, day, fmt)
        return
    rows = [r for table in book.tables for r in table.rows(day)]
    if fmt == "json":
        out = [
            {
                k: (str(v) if v is not None and not isinstance(v, bool) else v)
                for k, v in r.model_dump().items()
                if k != "images"
            }
            | {"images": {k: str(v) for k, v in (r.images or {}).items()}}
            for r in rows
        ]
        print(json.dumps(out, indent=2))
        return
    console().print(price_rows_view(book, day, maintained.source()))


#: A price row's dimensions as the listing names them, with the unit each is priced in.
PRICE_DIMENSIONS = (
    ("input", "input", "1M tokens"),
    ("cached_input", "cached input", "1M tokens"),
    ("cache_write", "cache write", "1M tokens"),
    ("image_input", "image input", "1M tokens"),
    ("input_audio", "audio input", "1M tokens"),
    ("output", "output", "1M tokens"),
    ("output_audio", "audio output", "1M tokens"),
    ("web_search", "web search", "1K calls"),
    ("file_search", "file search", "1K calls"),
)


def price_rows_view(book: Any, day: Any, fallback: str) -> Any:
    """The rows in force, a block per row (its model on a line of its own, then one line per
    price it sets): readable at 80 columns whatever the model's name, no figure cut."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    parts: list[Any] = [
        Text(
            f"Price rows in force{' on ' + day.isoformat() if day else ''}, USD; the first layer "
            f"that knows a model wins; every other model: {fallback}",
            style="bold",
        )
    ]
    for layer in book.tables:
        for r in layer.rows(day):
            terms = r.service_tier + (", batch" if r.batch else "")
            parts.append(Text(""))
            parts.append(Text(r.model, style="bold cyan", overflow="fold"))
            parts.append(Text(f"  from {r.effective}, {terms} tier"))
            parts.append(Text(f"  {layer.source}", overflow="fold"))
            lines = Table.grid(padding=(0, 2))
            lines.add_column(no_wrap=True)
            lines.add_column(justify="right", no_wrap=True)
            lines.add_column(no_wrap=True)
            for name, label, unit in PRICE_DIMENSIONS:
                value = getattr(r, name)
                if value is not None:
                    lines.add_row(f"    {label}", f"${value}", f"per {unit}")
            for size, value in (r.images or {}).items():
                lines.add_row(f"    image {size}", f"${value}", "per image")
            parts.append(lines)
    return Group(*parts)


def _price_of(model: str, tier: str, batch: bool, day: Any, fmt: str) -> None:
    """One model's rates, each from a 1M-token call of that one kind."""
    import json
    from dataclasses import replace

    from tokenmeter.pricing import prices as active_prices

    book = active_prices()
    price, call = book.quote(model, tier, batch, day)
    for table in book.tables:  # a per-image row (dall-e): its prices per image
        row = table.price_for(model, call.created_at.date(), tier, batch)
        if row is not None and row.images:
            images = {k: str(v) for k, v in row.images.items()}
            if fmt == "json":
                print(
                    json.dumps(
                        {"model": model, "source": table.source, "row": row.version}
                        | {"per_image": images}
                    )
                )
            else:
                shown = ", ".join(f"{k} ${v}" for k, v in images.items())
                console().print(
                    f"{model}: per image {shown}; from {table.source} row {row.version}"
                )
            return
    parts = {
        "input": replace(call, output_tokens=0),
        "cached_input": replace(call, output_tokens=0, cached_input_tokens=1_000_000),
        "output": replace(call, input_tokens=0),
    }
    rates = {name: book.cost_of(part).cost for name, part in parts.items()}
    if price.source is None and price.cost is None:
        fail(f"no price for {model!r} ({tier}{', batch' if batch else ''}): its calls cost NULL")
    out = {
        "model": model,
        "tier": tier,
        "batch": batch,
        "day": call.created_at.date().isoformat(),
        "source": price.source,
        "row": price.version,
        **{f"{k}_per_1m": None if v is None else str(v) for k, v in rates.items()},
    }
    if fmt == "json":
        print(json.dumps(out))
        return
    shown = ", ".join(
        f"{k.replace('_', ' ')} {'unknown' if v is None else f'${v}'}" for k, v in rates.items()
    )
    console().print(
        f"{model} ({tier}{', batch' if batch else ''}, {out['day']}): {shown} per 1M tokens; "
        f"from {price.source} row {price.version}"
    )


_SINCE_HELP = "Window length back from --until: 30m, 12h, 7d, 2w (default 7d)."


MAX_SINCE = timedelta(days=36500)


def parse_since(text: str, *, zero: bool = False) -> timedelta:
    """``30m``, ``12h``, ``7d``, ``2w`` (``zero``: also ``0`` and seconds, ``30s``) ->
    timedelta, at most 100 years; a clear error otherwise."""
    units = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
    if zero:
        units["s"] = 1
    if zero and text.strip() == "0":
        return timedelta(0)
    number, unit = text[:-1], text[-1:].lower()
    # ASCII digits only (str.isdigit also takes other scripts' digits), and a bounded count
    valid = unit in units and 0 < len(number) <= 9 and all("0" <= c <= "9" for c in number)
    if not valid or (int(number) == 0 and not zero):
        what = "a number" if zero else "a positive number"
        shown = text if len(text) <= 20 else text[:20] + "..."
        letters = "s, m, h, d or w" if zero else "m, h, d or w"
        raise typer.BadParameter(f"{shown!r}: use {what} and {letters} (e.g. 7d)")
    seconds = int(number) * units[unit]
    if seconds > MAX_SINCE.total_seconds():
        raise typer.BadParameter(f"{text[:20]!r}: at most 100 years (36500d)")
    return timedelta(seconds=seconds)


def parse_until(text: str | None) -> datetime:
    from .queries import parse_moment

    if text is None:
        return datetime.now(UTC)
    try:
        return parse_moment(text, end=True, name="--until")
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


GROUPINGS = ("model", "task", "kind", "day", "status", "tier", "project")


@app.command("check-usage")
def check_usage(
    since: str = typer.Option("7d", help=_SINCE_HELP),
    until: str | None = typer.Option(
        None, help="End of the window (ISO; naive = UTC; a bare date includes that day)."
    ),
    by: str = typer.Option("model", help="Group by " + ", ".join(GROUPINGS) + "."),
    model: str | None = typer.Option(None, help="Only calls billed to this model."),
    task: str | None = typer.Option(None, help="Only calls of this task name."),
    fmt: str = typer.Option("table", "--format", help="table, json or csv"),
    watch: float | None = typer.Option(
        None, help="Refresh every this many seconds (a live view; Ctrl-C to stop)."
    ),
    database_url: str | None = typer.Option(None, "--database-url", envvar="DATABASE_URL"),
) -> None:
    """Usage and exact cost over a window: totals, tokens by category, cost per group."""
    import csv
    import json
    import sys

    from sqlalchemy.orm import Session

    from . import queries

    if by not in GROUPINGS:
        fail(f"--by must be {', '.join(GROUPINGS[:-1])} or {GROUPINGS[-1]}, not {by!r}")
    if fmt not in ("table", "json", "csv"):
        fail(f"--format must be table, json or csv, not {fmt!r}")
    if watch is not None and (fmt != "table" or until is not None or not 0.2 <= watch <= 3600):
        fail("--watch takes 0.2 to 3600 seconds, a table, and no --until (it follows now)")
    window = parse_since(since)
    end = parse_until(until)
    engine = ledger_engine(database_url)

    def read() -> tuple[datetime, datetime, list[Any]]:
        finish = end if watch is None else datetime.now(UTC)
        with Session(engine) as session:
            rows = queries.usage_summary(
                session,
                finish - window,
                finish,
                by,  # type: ignore[arg-type]
                model=model,
                task=task,
            )
        return finish - window, finish, rows

    if watch is not None:
        _watch(read, by, watch)
        return
    start, end, rows = read()
    total = queries.total_of(rows)
    if fmt == "json":
        payload = {
            "start": start.isoformat(),
            "end": end.isoformat(),
            "group_by": by,
            "groups": [_row_json(r) for r in rows],
            "total": _row_json(total),
        }
        print(json.dumps(payload, indent=2))
        return
    if fmt == "csv":
        writer = csv.writer(sys.stdout)
        writer.writerow([by, *list(_row_json(total))[1:]])
        for r in rows:
            writer.writerow(list(_row_json(r).values()))
        return
    out = console()
    for part in _usage_view(start, end, rows, by, out.width):
        out.print(part)


def _usage_view(start: datetime, end: datetime, rows: list[Any], by: str, width: int) -> list[Any]:
    """check-usage's table and total line, fitted to ``width`` columns."""
    from . import queries, render

    if not rows:
        return [f"no OpenAI calls between {start:%Y-%m-%d %H:%M} and {end:%Y-%m-%d %H:%M} UTC"]
    title = f"usage by {by}, {start:%Y-%m-%d %H:%M} to {end:%Y-%m-%d %H:%M} UTC"
    t = queries.total_of(rows)
    return [
        render.usage_table(rows, title, by, width=width),
        f"total: {t.calls} calls, {t.input_tokens:,} input ({t.cached_input_tokens:,} "
        f"cached), {t.output_tokens:,} output ({t.reasoning_tokens:,} reasoning) tokens, "
        f"{t.image_count} images, {render.money(t.cost_usd)}"
        + (f" ({t.unpriced_calls} calls with unknown prices)" if t.unpriced_calls else ""),
    ]


def _watch(read: Any, by: str, every: float) -> None:
    """A live view for an operator watching a fleet: re-read and redraw every ``every`` s."""
    import time

    from rich.console import Group
    from rich.live import Live

    out = console()

    def frame() -> Group:
        start, end, rows = read()
        parts = _usage_view(start, end, rows, by, out.width)
        return Group(
            *parts,
            f"[dim]refreshed {datetime.now(UTC):%H:%M:%S} UTC, every {every:g}s; "
            "Ctrl-C to stop[/dim]",
        )

    try:
        with Live(frame(), console=out, auto_refresh=False) as live:
            while True:
                time.sleep(every)
                live.update(frame(), refresh=True)
    except KeyboardInterrupt:
        return


@app.command()
def scopes(
    kind: str | None = typer.Option(None, help="Only this scope kind (pipeline_run, ...)."),
    since: str = typer.Option("30d", help=_SINCE_HELP),
    until: str | None = typer.Option(
        None, help="End of the window (ISO; naive = UTC; a bare date includes that day)."
    ),
    limit: int = typer.Option(10, min=1, max=1000, help="How many."),
    fmt: str = typer.Option("table", "--format", help="table or json"),
    database_url: str | None = typer.Option(None, "--database-url", envvar="DATABASE_URL"),
) -> None:
    """The most expensive scopes (a pipeline run, a scanned post...), with their exact usage."""
    import json

    from sqlalchemy.orm import Session

    from . import queries, render

    if fmt not in ("table", "json"):
        fail(f"--format must be table or json, not {fmt!r}")
    end = parse_until(until)
    start = end - parse_since(since)
    with Session(ledger_engine(database_url)) as session:
        rows = queries.top_scopes(session, start, end, kind=kind, limit=limit)
    if fmt == "json":
        from tokenmeter.reporting.api import ScopeUsage

        print(json.dumps([ScopeUsage.model_validate(r).model_dump(mode="json") for r in rows]))
    elif not rows:
        console().print("no scopes with calls in the window")
    else:
        out = console()
        out.print(render.scopes_table(rows, width=out.width))


@app.command()
def rollups(
    retry: bool = typer.Option(False, "--retry", help="Apply the kept rollups now."),
    dead: bool = typer.Option(False, "--dead", help="With --retry: the dead ones too."),
    fmt: str = typer.Option("table", "--format", help="table or json"),
    database_url: str | None = typer.Option(None, "--database-url", envvar="DATABASE_URL"),
) -> None:
    """Rollups that could not apply to their application row (kept; their calls are in the
    ledger).  Exit 1 while any is kept, so a check can alert on it."""
    import json

    from rich.table import Table

    from tokenmeter import deferred
    from tokenmeter.sink import DatabaseSink

    if fmt not in ("table", "json"):
        fail(f"--format must be table or json, not {fmt!r}")
    if dead and not retry:
        fail("--dead goes with --retry")
    engine = ledger_engine(database_url)
    if retry:
        report = DatabaseSink(database_url=database_url).retry_rollups(include_dead=dead)
        console().print(f"applied {report.applied}, failed again {report.failed}")
    with engine.connect() as conn:
        kept = list(deferred.pending(conn))
    if fmt == "json":
        print(
            json.dumps(
                [
                    {
                        "id": r.id,
                        "task_id": r.task_id,
                        "task_name": r.task_name,
                        "rollup": json.loads(r.rollup),
                        "calls": len(json.loads(r.calls)),
                        "attempts": r.attempts,
                        "dead": r.dead,
                        "last_error": r.last_error,
                        "created_at": r.created_at.isoformat(),
                    }
                    for r in kept
                ]
            )
        )
    elif not kept:
        console().print("no kept rollups: every rollup applied")
    else:
        table = Table("id", "task", "row", "calls", "tries", "state", "last error")
        for r in kept:
            spec = json.loads(r.rollup)
            key = ",".join(f"{k}={v}" for k, v in spec.get("key", {}).items())
            table.add_row(
                str(r.id),
                r.task_name or "-",
                f"{spec.get('table')} {key}",
                str(len(json.loads(r.calls))),
                str(r.attempts),
                "dead" if r.dead else "pending",
                (r.last_error or "").splitlines()[0][:80],
            )
        console().print(table)
    if kept:
        raise typer.Exit(1)


@app.command()
def flush(
    wait: bool = typer.Option(
        False, "--wait", help="First wait until every task that ended on this host is written."
    ),
    timeout: float = typer.Option(60.0, min=0, help="How long --wait waits, in seconds."),
    database_url: str | None = typer.Option(None, "--database-url", envvar="DATABASE_URL"),
    redis_url: str | None = typer.Option(
        None,
        "--redis-url",
        envvar=["TOKENMETER_REDIS_URL", "CELERY_BROKER_URL"],
        help="The Redis of the spool and write-ahead log (when the broker is Redis).",
    ),
) -> None:
    """Write what waits: the spool, the calls of worker processes that died, kept rollups.

    With --wait, first wait for the running workers' writers (task end -> row visible).  Exit 1
    when something is still waiting at the end (the database is down, or --wait timed out)."""
    import time

    from tokenmeter.filewal import FileWriteAheadLog
    from tokenmeter.recovery import Recovery
    from tokenmeter.settings import get_settings

    ledger_engine(database_url)  # a missing ledger is one line, not a traceback
    out = console()
    pending = 0
    if wait:
        wal = FileWriteAheadLog(get_settings().wal_dir)
        deadline = time.monotonic() + timeout
        said = -1
        while (pending := wal.pending()) and time.monotonic() < deadline:
            if pending != said:
                out.print(f"waiting for {pending} ended tasks to be written ...")
                said = pending
            time.sleep(0.05)
    report = Recovery.connect(redis_url, database_url).run_once()
    out.print(
        f"replayed {report.replayed} spooled batches, recovered {report.recovered} executions "
        f"of dead processes, applied {report.rollups_applied} kept rollups"
    )
    problems = []
    if pending:
        problems.append(f"{pending} ended tasks not yet written after {timeout:g} s")
    if report.still_spooled > 0:
        problems.append(f"{report.still_spooled} batches still spooled (is the database up?)")
    if report.rollups_pending:
        problems.append(f"{report.rollups_pending} rollups kept (tokenmeter rollups)")
    if problems:
        out.print("still waiting: " + "; ".join(problems))
        raise typer.Exit(1)
    out.print("everything that ended is in the ledger")


@app.command()
def audit(
    since: str = typer.Option("7d", help="How far back: 30m, 12h, 7d, 2w."),
    bucket: str = typer.Option("1d", help="Bucket width: 1m, 1h or 1d."),
    by: str = typer.Option(
        "model", help="Group by any of model,service_tier,batch,project_id ('' for none)."
    ),
    settle: str = typer.Option(
        "1h", help="Compare only buckets that ended at least this long ago (the data lags)."
    ),
    default_project: str | None = typer.Option(
        None,
        "--default-project",
        envvar="TOKENMETER_AUDIT_DEFAULT_PROJECT",
        help="The project of calls whose client named none (their key's project).",
    ),
    fmt: str = typer.Option("table", "--format", help="table, json or csv"),
    keep: bool = typer.Option(True, "--store/--no-store", help="Keep the run (the API shows it)."),
    database_url: str | None = typer.Option(None, "--database-url", envvar="DATABASE_URL"),
    base_url: str | None = typer.Option(None, "--base-url", envvar="OPENAI_BASE_URL"),
) -> None:
    """The ledger against OpenAI's own Usage and Costs APIs (admin key: OPENAI_ADMIN_KEY).

    Exit 1 when a closed bucket differs (each difference is named: unmetered, missing
    upstream, usage unknown, priced differently), 2 when the audit could not be made."""
    import csv
    import io
    import json

    from . import audit as auditing

    if fmt not in ("table", "json", "csv"):
        fail(f"--format must be table, json or csv, not {fmt!r}")
    if bucket not in auditing.WIDTHS:
        fail(f"--bucket must be one of {', '.join(auditing.WIDTHS)}, not {bucket!r}")
    groups = tuple(g for g in by.split(",") if g)
    try:
        report = auditing.run(
            since_s=int(parse_since(since).total_seconds()),
            bucket=bucket,
            groups=groups,
            settle_s=int(parse_since(settle, zero=True).total_seconds()),
            default_project=default_project,
            database_url=database_url,
            base_url=base_url,
            keep=keep,
        )
    except auditing.AuditError as exc:
        fail(str(exc))

    def when(moment: int) -> str:
        return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%d %H:%M")

    rows = [
        {
            "bucket": when(d.bucket_start),
            "group": ", ".join(str(v) for v in d.group),
            "what": d.what,
            "provider": str(d.provider),
            "ledger": str(d.ledger),
            "difference": f"{d.delta:+}",
            "kind": d.kind,
        }
        for d in report.differences
    ]
    if fmt == "csv":  # one row per difference; no rows (only the header) is a clean audit
        buffer = io.StringIO()
        writer = csv.DictWriter(
            buffer,
            ["bucket", "group", "what", "provider", "ledger", "difference", "kind"],
            lineterminator="\n",
        )
        writer.writeheader()
        writer.writerows(rows)
        print(buffer.getvalue(), end="")
    elif fmt == "json":
        print(
            json.dumps(
                {
                    "start": when(report.start),
                    "end": when(report.end),
                    "bucket": bucket,
                    "group_by": list(groups),
                    "compared_buckets": report.compared,
                    "skipped_open_buckets": [when(s) for s in report.skipped],
                    "clean": report.clean,
                    "dollar_days_compared": report.days_compared,
                    "differences": rows,
                }
            )
        )
    else:
        out = console()
        out.print(
            f"audit {when(report.start)} - {when(report.end)} UTC by {bucket}"
            f"{' and ' + ', '.join(groups) if groups else ''}: {report.compared} closed buckets "
            f"compared, {len(report.skipped)} still open skipped (settle {settle}); dollars: "
            f"{report.days_compared} closed UTC days compared with the Costs API"
        )
        if report.clean and not report.compared:
            out.print("nothing to compare yet: every bucket of the window is still open")
        elif report.clean:
            out.print("clean: the ledger and the provider agree in every closed bucket")
        else:
            out.print(difference_table(report, when))
            if report.unnamed_projects:
                out.print(
                    "note: some calls' clients named no project (group None); they went to "
                    "their key's project: say which with --default-project"
                )
    if not report.clean:
        raise typer.Exit(1)


#: Short names for the measures an audit compares (the table's "what" column).
MEASURES = {
    "requests": "requests",
    "input_tokens": "input",
    "cached_input_tokens": "cached",
    "cache_write_tokens": "written",
    "output_tokens": "output",
    "usd": "usd",
}


def difference_table(report: Any, when: Any) -> Any:
    """An audit's differences, readable at 80 columns: a block per bucket and group (its
    model, tier, ... on one line; a grouping the same in every block is said once, on top),
    then a row per measure.  Model names and figures are never wrapped or cut."""
    from itertools import groupby

    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    headers = {"service_tier": "tier", "project_id": "project"}
    differences = report.differences
    varying, parts = [], []
    for i, name in enumerate(report.groups):
        values = {d.group[i] for d in differences if d.group != ("(all)",)}
        if len(values) > 1:
            varying.append(i)
        elif values:
            parts.append(f"{headers.get(name, name)} {next(iter(values))}")
    names = ("what", "provider", "ledger", "diff", "%", "kind")
    rows = []
    for d in differences:
        share = f"{d.delta / d.provider:+.1%}" if d.provider else "-"
        rows.append(
            (MEASURES.get(d.what, d.what), str(d.provider), str(d.ledger), f"{d.delta:+}", share)
        )
    widths = [max([len(n), *(len(r[i]) for r in rows)]) for i, n in enumerate(names[:-1])]
    blocks: list[Any] = [Text(", ".join(parts))] if parts else []
    pairs = list(zip(differences, rows, strict=True))
    for (bucket, group), block in groupby(pairs, key=lambda p: (p[0].bucket_start, p[0].group)):
        label = ["(all: dollars of the day)"] if group == ("(all)",) else []
        label = label or [str(group[i]) for i in varying]
        blocks.append(Text(f"{when(bucket)}  " + "  ".join(label), style="bold"))
        table = Table(box=None, padding=(0, 1, 0, 0), pad_edge=False, show_header=len(blocks) <= 2)
        for at, name in enumerate(names):
            if name == "kind":
                table.add_column(name, min_width=max(len(w) for w in ["differently", "unmetered"]))
            else:
                table.add_column(
                    name,
                    justify="left" if name == "what" else "right",
                    no_wrap=True,
                    min_width=widths[at],
                )
        for d, row in block:
            table.add_row(*row, d.kind)
        blocks.append(table)
    return Group(*blocks)


def ledger_engine(database_url: str | None) -> Any:
    """A read-only engine on a migrated ledger, or one line saying what to run (exit 2)."""
    from tokenmeter.migrate import LedgerUnavailable, require_ledger

    try:
        return require_ledger(database_url)
    except LedgerUnavailable as exc:
        fail(str(exc))


def _row_json(r: Any) -> dict[str, Any]:
    from tokenmeter.schemas import UsageGroup

    return UsageGroup.model_validate(r).model_dump(mode="json")


@app.command()
def api(
    host: str = typer.Option("127.0.0.1", help="Interface to listen on."),
    port: int = typer.Option(8000, help="Port."),
    no_auth: bool = typer.Option(
        False, "--no-auth", help="No token: loopback only (127.0.0.1, ::1, localhost)."
    ),
) -> None:
    """Serve the usage HTTP API (/api/usage/...), its OpenAPI docs (/docs) and the dashboard (/)."""
    import uvicorn

    from . import web
    from .api import create_app

    if no_auth and host.lower() not in web.LOOPBACK_HOSTS:
        fail(f"--no-auth serves loopback only; not {host!r} (set TOKENMETER_API_TOKEN instead)")
    ledger_engine(None)  # a missing or unmigrated ledger is said now, not on the first request
    try:
        application = create_app(require_auth=not no_auth)
    except RuntimeError as exc:
        fail(str(exc))
    web.install_log_redaction()
    shown = f"[{host}]" if ":" in host else host
    base = f"http://{shown}:{port}"
    out = console()
    out.print(f"usage API on {base}/api/usage/summary (Authorization: Bearer), docs {base}/docs")
    if no_auth:
        out.print(f"dashboard {base}/")
    else:  # a one-time link: it may be logged, and is worthless once used or after 10 minutes
        once = application.state.sign_in.issue_once()
        out.print(f"dashboard {base}/ ; sign in once (10 min): {base}/login?once={once}")
    uvicorn.run(application, host=host, port=port, log_level="info")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
