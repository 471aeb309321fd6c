"""The application's configuration, read from the environment in one place.

Every setting has a default that works offline on a fresh clone: an SQLite file under
``var/``, no broker server, the loopback sandbox as the OpenAI endpoint.  tokenmeter's own
settings (ledger, spool, budgets, metrics) are the library's: ``tokenmeter.settings``.  Names
follow the ecosystem (``DATABASE_URL``, ``CELERY_BROKER_URL``, ``OPENAI_API_KEY``...), so an
existing deployment's environment is picked up as it is.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from tokenmeter.settings import get_settings as get_tokenmeter_settings

PROJECT_ROOT = Path(__file__).resolve().parent.parent
VAR_DIR = PROJECT_ROOT / "var"
# The demo application keeps tokenmeter's data (SQLite ledger, spool) in the repository's var/
# unless told otherwise; a library user gets tokenmeter's own default (see tokenmeter.settings).
os.environ.setdefault("TOKENMETER_DATA_DIR", str(VAR_DIR))


class Settings(BaseSettings):
    """The application's settings.  Field names map to upper-case environment variables."""

    model_config = SettingsConfigDict(env_file=None, extra="ignore", case_sensitive=False)

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
    app_db_outage_budget_s: float = Field(
        default=150.0,
        ge=0,
        description="How long a task waits out a database outage at one step before failing.",
    )
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

    @property
    def database_url(self) -> str:
        """The application's tables live in tokenmeter's database (``DATABASE_URL``)."""
        return get_tokenmeter_settings().ledger_url


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once.  Tests call ``get_settings.cache_clear()``."""
    return Settings()
