"""The OpenAI and Reddit clients, one per process, from settings."""

from __future__ import annotations

import os
from typing import Any

from openai import OpenAI

from models.settings import get_settings

_openai: tuple[int, OpenAI] | None = None


class ConfigurationError(RuntimeError):
    """A setting the task needs is missing; the message says which and how to set it."""


def openai_client() -> OpenAI:
    """This process's client (created after fork, never shared with a parent)."""
    global _openai
    if _openai is None or _openai[0] != os.getpid():
        settings = get_settings()
        key = settings.openai_api_key
        if not key:
            if not settings.openai_base_url:
                raise ConfigurationError(
                    "OPENAI_API_KEY is not set. Set it, or run against the offline sandbox: "
                    "`tokenmeter sandbox` and OPENAI_BASE_URL=http://127.0.0.1:8100/v1"
                )
            key = "sk-sandbox"
        # Celery retries rate limits with backoff, and keeps each attempt's usage.
        _openai = (
            os.getpid(),
            OpenAI(api_key=key, base_url=settings.openai_base_url, max_retries=0),
        )
    return _openai[1]


def reddit_client() -> Any:
    import praw

    settings = get_settings()
    if settings.reddit_sandbox_url:
        url = settings.reddit_sandbox_url
        return praw.Reddit(
            client_id="sandbox-client",
            client_secret="sandbox-secret",
            username="tokenmeter_bot",
            password="sandbox-password",
            user_agent=settings.reddit_user_agent,
            oauth_url=url,
            reddit_url=url,
            short_url=url,
            check_for_updates=False,
        )
    missing = [
        name
        for name, value in {
            "REDDIT_CLIENT_ID": settings.reddit_client_id,
            "REDDIT_CLIENT_SECRET": settings.reddit_client_secret,
            "REDDIT_USERNAME": settings.reddit_username,
            "REDDIT_PASSWORD": settings.reddit_password,
        }.items()
        if not value
    ]
    if missing:
        raise ConfigurationError(
            f"Reddit credentials missing: {', '.join(missing)} (or set REDDIT_SANDBOX_URL to "
            "use the offline sandbox)"
        )
    return praw.Reddit(
        client_id=settings.reddit_client_id,
        client_secret=settings.reddit_client_secret,
        username=settings.reddit_username,
        password=settings.reddit_password,
        user_agent=settings.reddit_user_agent,
        check_for_updates=False,
    )
