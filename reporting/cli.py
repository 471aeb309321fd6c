"""The ``tokenmeter`` command line."""

from __future__ import annotations

from typing import NoReturn

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
    """Create or upgrade the usage database (alembic) - safe to run repeatedly."""
    from models import migrate as m
    from models.db import normalize_url
    from models.settings import get_settings

    url = normalize_url(database_url or get_settings().database_url)
    (m.downgrade if down else m.upgrade)(url, revision)
    console().print(f"[green]database at {_redact(url)} is at {revision}[/green]")


@app.command()
def sandbox(
    host: str = typer.Option("127.0.0.1", help="Interface to listen on."),
    openai_port: int = typer.Option(8100, help="OpenAI sandbox port (0: any free port)."),
    reddit_port: int = typer.Option(8200, help="Reddit sandbox port (0: any free port)."),
) -> None:
    """Run the loopback OpenAI and Reddit sandboxes in the foreground."""
    from sandbox.cli import serve

    serve(host, openai_port, reddit_port)


@app.command()
def prices(
    at: str | None = typer.Option(None, help="Show the prices in force on this day (YYYY-MM-DD)."),
    fmt: str = typer.Option("table", "--format", help="table or json"),
) -> None:
    """Show the active price table (built-ins plus TOKENMETER_PRICES_FILE)."""
    import json
    from datetime import date

    from rich.table import Table

    from instrumentation.pricing import price_table

    try:
        day = date.fromisoformat(at) if at else None
        rows = price_table().rows(day)
    except ValueError as exc:  # PriceError is a ValueError too
        fail(str(exc))
    if fmt == "json":
        out = [
            {
                k: (str(v) if v is not None else None)
                for k, v in r.model_dump().items()
                if k != "images"
            }
            | {"images": {k: str(v) for k, v in (r.images or {}).items()}}
            for r in rows
        ]
        print(json.dumps(out, indent=2))
        return
    if fmt != "table":
        fail(f"--format must be table or json, not {fmt!r}")
    table = Table(title=f"prices (USD per 1M tokens; images per image){' on ' + at if at else ''}")
    for column in (
        "model",
        "effective",
        "input",
        "cached input",
        "image input",
        "output",
        "images",
    ):
        table.add_column(column)
    for r in rows:
        images = ", ".join(f"{k} {v}" for k, v in (r.images or {}).items())
        table.add_row(
            r.model,
            str(r.effective),
            *(
                str(x) if x is not None else ""
                for x in (r.input, r.cached_input, r.image_input, r.output)
            ),
            images,
        )
    console().print(table)


def _redact(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
