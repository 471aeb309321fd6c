"""Start and stop both sandbox servers together (tests, the demo, ``tokenmeter sandbox``)."""

from __future__ import annotations

from types import TracebackType
from typing import Any

from . import openai_server, reddit_server
from .ground_truth import Ledger
from .openai_server import OpenAISandbox
from .reddit_server import RedditState


class SandboxServers:
    """The OpenAI and Reddit sandboxes on loopback ports (0 = any free port)."""

    def __init__(self, host: str = "127.0.0.1", openai_port: int = 0, reddit_port: int = 0):
        self._openai_http, self.openai = openai_server.make_server(host, openai_port)
        self._reddit_http, self.reddit = reddit_server.make_server(host, reddit_port)
        self.host = host
        self._started = False

    @property
    def ledger(self) -> Ledger:
        """What the OpenAI sandbox billed, by request id."""
        return self.openai.ledger

    @property
    def openai_base_url(self) -> str:
        return f"http://{self.host}:{self._openai_http.port}/v1"

    @property
    def reddit_base_url(self) -> str:
        return f"http://{self.host}:{self._reddit_http.port}"

    def praw_settings(self) -> dict[str, Any]:
        """Keyword arguments for ``praw.Reddit(...)`` that reach this sandbox."""
        return {
            "client_id": "sandbox-client",
            "client_secret": "sandbox-secret",
            "username": "tokenmeter_bot",
            "password": "sandbox-password",
            "user_agent": "tokenmeter-sandbox/1 (by u/tokenmeter_bot)",
            "oauth_url": self.reddit_base_url,
            "reddit_url": self.reddit_base_url,
            "short_url": self.reddit_base_url,
            "check_for_updates": "false",
        }

    def start(self) -> SandboxServers:
        if not self._started:
            self._openai_http.start_background("sandbox-openai")
            self._reddit_http.start_background("sandbox-reddit")
            self._started = True
        return self

    def stop(self) -> None:
        if self._started:
            self._openai_http.stop()
            self._reddit_http.stop()
            self._started = False

    def __enter__(self) -> SandboxServers:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


__all__ = ["OpenAISandbox", "RedditState", "SandboxServers"]
