"""All configuration, read from the environment in one place.

Every setting has a default that works offline on a fresh clone: an SQLite file under
``var/``, no broker server, the loopback sandbox as the OpenAI endpoint.  Names follow the
ecosystem (``DATABASE_URL``, ``CELERY_BROKER_URL``, ``OPENAI_API_KEY``...), so an existing
deployment's environment is picked up as it is.
"""

from __future__ import annotations

from decimal import Decimal
from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent
VAR_DIR = Path.cwd() / "var"


class Settings(BaseSettings):
    """Runtime settings.  Field names map to upper-case environment variables."""

    model_config = SettingsConfigDict(env_file=None, extra="ignore", case_sensitive=False)

    # --- storage -------------------------------------------------------------------------
    database_url: str = Field(
        default_factory=lambda: f"sqlite:///{VAR_DIR / 'tokenmeter.sqlite'}",
        description="SQLAlchemy URL of the usage database (SQLite file by default).",
    )
    database_echo: bool = False

    # --- celery ----------------------------------------------------------------------------
    celery_broker_url: str | None = None
    celery_result_backend: str | None = None

    # --- openai ----------------------------------------------------------------------------
    openai_api_key: str | None = None
    openai_base_url: str | None = None
    openai_idea_model: str = "gpt-4o-mini"
    openai_image_model: str = "dall-e-3"
    openai_community_agent_model: str = "gpt-4o-mini"

    # --- reddit (praw) --------------------------------------------------------------------
    reddit_client_id: str | None = None
    reddit_client_secret: str | None = None
    reddit_username: str | None = None
    reddit_password: str | None = None
    reddit_user_agent: str = "tokenmeter-promotion/0.1"
    reddit_sandbox_url: str | None = Field(
        default=None, description="Send praw to this Reddit-compatible server (the sandbox)."
    )

    # --- the application's tasks ---------------------------------------------------------
    commission_ideas: int = Field(default=3, ge=1, le=10, description="Ideas asked for.")
    commission_images: int = Field(default=2, ge=0, le=10, description="Ideas illustrated.")
    commission_images_per_idea: int = Field(default=1, ge=1, le=10, description="Image `n`.")
    commission_image_size: str = "1024x1024"
    commission_image_quality: str = "standard"
    commission_max_retries: int = 3
    promotion_subreddits: str = Field(
        default="handmade,gifts,crafts", description="Comma-separated subreddits to scan."
    )
    promotion_interval_s: float = Field(default=900.0, description="Beat interval of the scan.")
    promotion_post_limit: int = Field(default=25, ge=1, le=100)
    promotion_threshold: int = Field(default=7, ge=0, le=10, description="Min. 'fit' rating.")
    promotion_dry_run: bool = Field(default=True, description="Rate and write, never post.")
    promotion_concurrency: int = Field(default=4, ge=1, le=32)

    @property
    def subreddits(self) -> list[str]:
        return [s.strip() for s in self.promotion_subreddits.split(",") if s.strip()]

    # --- metering ------------------------------------------------------------------------
    tokenmeter_prices_file: Path | None = Field(
        default=None, description="TOML file whose rows override/extend the built-in prices."
    )
    tokenmeter_store_text: bool = Field(
        default=False, description="Opt-in: keep prompt/completion text. Off by default."
    )
    tokenmeter_spool_dir: Path = Field(default_factory=lambda: VAR_DIR / "spool")
    tokenmeter_write_ahead: bool = Field(
        default=True, description="Log each call to Redis as it happens (survives SIGKILL)."
    )
    tokenmeter_redis_url: str | None = Field(
        default=None,
        description="Redis for the write-ahead log, spool and daily budget "
        "(default: the Celery broker, when it is Redis).",
    )
    tokenmeter_recovery_interval_s: float = Field(
        default=30.0, description="How often a worker replays the spool and orphaned calls."
    )
    tokenmeter_daily_budget_usd: Decimal | None = None
    tokenmeter_task_budget_usd: Decimal | None = None

    # --- reporting -----------------------------------------------------------------------
    tokenmeter_api_token: str | None = Field(
        default=None,
        description="Bearer token for the usage API; the API refuses to start without one.",
    )
    tokenmeter_metrics_port: int | None = None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once.  Tests call ``get_settings.cache_clear()``."""
    return Settings()
