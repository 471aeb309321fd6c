"""tokenmeter's own settings, read from the environment in one place.

Every setting has a default that works offline and does not depend on the working directory:
the SQLite ledger and the local spool live under ``TOKENMETER_DATA_DIR`` (default
``$XDG_DATA_HOME/tokenmeter``, i.e. ``~/.local/share/tokenmeter``).  Names follow the
ecosystem (``DATABASE_URL``) or carry the ``TOKENMETER_`` prefix.  The application's own
settings (models, Reddit, its tasks) are not here: the library reads nothing of them.
"""

from __future__ import annotations

import os
from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def default_data_dir() -> Path:
    """``$XDG_DATA_HOME/tokenmeter``, else ``~/.local/share/tokenmeter`` (never the cwd)."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base).expanduser().resolve() / "tokenmeter"


WriteAhead = Literal["local", "redis", "off"]
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off", ""}


def write_ahead_mode(value: object) -> WriteAhead:
    """``local``, ``redis`` or ``off`` from a setting (booleans: true is local, false off)."""
    text = str(value).strip().lower()
    if text in _TRUE:
        return "local"
    if text in _FALSE:
        return "off"
    if text in ("local", "redis"):
        return text  # type: ignore[return-value]
    raise ValueError(f"TOKENMETER_WRITE_AHEAD must be local, redis or off, not {value!r}")


class TokenmeterSettings(BaseSettings):
    """The library's settings.  Field names map to upper-case environment variables."""

    model_config = SettingsConfigDict(env_file=None, extra="ignore", case_sensitive=False)

    tokenmeter_data_dir: Path = Field(
        default_factory=default_data_dir,
        description="Folder of the default SQLite ledger, the local spool and metrics files.",
    )
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL of the ledger (default: tokenmeter.sqlite in the data dir).",
    )
    database_echo: bool = False
    database_timeout_s: float = Field(
        default=5.0, gt=0, description="Connect and statement bound for the ledger database."
    )

    tokenmeter_prices_file: Path | None = Field(
        default=None, description="TOML file whose rows override/extend the built-in prices."
    )
    tokenmeter_azure_deployments: dict[str, str] = Field(
        default_factory=dict,
        description='Azure OpenAI deployment -> model, as JSON ({"prod-dalle3": "dall-e-3"}), '
        "for responses that carry no model (images); others are priced by their response.",
    )
    tokenmeter_spool_dir: Path | None = Field(
        default=None, description="Local spool folder (default: spool/ in the data dir)."
    )
    tokenmeter_write_ahead: WriteAhead = Field(
        default="local",
        description="Log each call as it happens so a killed process's calls are recovered: "
        "'local' (a file per process, no network), 'redis' (also to Redis, one round trip "
        "per call: survives the loss of the host's disk), 'off'.  true/false mean local/off.",
    )
    tokenmeter_flush: Literal["background", "inline"] = Field(
        default="background",
        description="'background': a writer thread per process writes closed tasks to the "
        "ledger, many per transaction, behind the write-ahead log; 'inline': each task writes "
        "its own at its end (always so with the write-ahead log off).",
    )
    tokenmeter_flush_interval_s: float = Field(
        default=0.2,
        ge=0,
        le=10,
        description="The background writer waits this long after a task ends for more to "
        "write in the same transaction (0: commit at once; a row is visible within this plus "
        "one commit; tokenmeter.flush() does not wait for it).",
    )
    tokenmeter_wal_lease_s: float = Field(
        default=120.0,
        gt=0,
        description="A write-ahead execution whose owner did not renew it for this long (the "
        "owner renews it every quarter of it while the task runs) is recovered by any worker.",
    )
    tokenmeter_redis_url: str | None = Field(
        default=None,
        description="Redis for the write-ahead log, spool and daily budget "
        "(default: the Celery broker, when it is Redis).",
    )
    tokenmeter_recovery_interval_s: float = Field(
        default=30.0, description="How often a worker replays the spool and orphaned calls."
    )
    tokenmeter_rollup_max_attempts: int = Field(
        default=10,
        ge=1,
        description="Failed tries after which a rollup that cannot apply is dead (reported).",
    )
    tokenmeter_daily_budget_usd: Decimal | None = None
    tokenmeter_task_budget_usd: Decimal | None = None
    tokenmeter_budget_fail_open: bool = Field(
        default=True,
        description="When Redis is unreachable, let calls go ahead (true) or refuse them.",
    )

    tokenmeter_api_token: str | None = Field(
        default=None,
        description="Bearer token for the usage API; the API refuses to start without one.",
    )
    tokenmeter_api_cache_s: float = Field(
        default=1.0,
        ge=0,
        le=3600,
        description="The usage API answers a summary it computed less than this long ago "
        "from memory (0: compute every one).",
    )
    tokenmeter_metrics_port: int | None = None
    #: Export each call as an OpenTelemetry span and metrics in the GenAI semantic
    #: conventions (``otel.py``; needs opentelemetry-api).  Off by default.
    tokenmeter_otel: bool = False

    @field_validator("tokenmeter_write_ahead", mode="before")
    @classmethod
    def _write_ahead(cls, value: object) -> WriteAhead:
        return write_ahead_mode(value)

    @property
    def ledger_url(self) -> str:
        """``DATABASE_URL``, else the SQLite file in the data dir."""
        return self.database_url or f"sqlite:///{self.tokenmeter_data_dir / 'tokenmeter.sqlite'}"

    @property
    def spool_dir(self) -> Path:
        return self.tokenmeter_spool_dir or self.tokenmeter_data_dir / "spool"

    @property
    def wal_dir(self) -> Path:
        """The local write-ahead files of this host's worker processes."""
        return self.tokenmeter_data_dir / "wal"


@lru_cache(maxsize=1)
def get_settings() -> TokenmeterSettings:
    """The process's settings, read once.  Tests call ``get_settings.cache_clear()``."""
    return TokenmeterSettings()
