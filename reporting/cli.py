"""The ``tokenmeter`` command line."""

from __future__ import annotations

import typer
from rich.console import Console

app = typer.Typer(
    name="tokenmeter",
    help="Exact OpenAI token and cost metering for Celery workers.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()


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
    console.print(f"[green]database at {_redact(url)} is at {revision}[/green]")


@app.command()
def sandbox(
    host: str = typer.Option("127.0.0.1", help="Interface to listen on."),
    openai_port: int = typer.Option(8100, help="OpenAI sandbox port (0: any free port)."),
    reddit_port: int = typer.Option(8200, help="Reddit sandbox port (0: any free port)."),
) -> None:
    """Run the loopback OpenAI and Reddit sandboxes in the foreground."""
    from sandbox.cli import serve

    serve(host, openai_port, reddit_port)


def _redact(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
