"""The application's sessions, on tokenmeter's engine (one pool per process, fork-safe)."""

from __future__ import annotations

from tokenmeter.db import dispose_after_fork, dispose_all, get_engine, session_scope

__all__ = ["dispose_after_fork", "dispose_all", "get_engine", "session_scope"]
