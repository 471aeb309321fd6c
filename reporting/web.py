"""What keeps the usage API and dashboard safe to serve: the token check, the dashboard's
sign-in, security headers, the loopback-only Host check of ``--no-auth``, and an access log
that never carries a secret.

- The API takes its token from ``Authorization: Bearer`` only, compared byte-wise in constant
  time.  A query string is written to access logs, so ``?token=`` is refused with a 401 that
  says where the token goes.
- The dashboard signs in with a form (``POST /login``) or a one-time link
  (``/login?once=...``, printed by ``tokenmeter api``, valid once and for 10 minutes).  Either
  sets an ``HttpOnly``, ``SameSite=Strict`` cookie holding an HMAC of the token, never the
  token itself.
- Every response carries a Content-Security-Policy, ``X-Frame-Options: DENY``,
  ``X-Content-Type-Options: nosniff``, ``Referrer-Policy: no-referrer`` and
  ``Cache-Control: no-store``.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import logging
import re
import secrets
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

#: A token shorter than this is refused at start-up (``secrets.token_urlsafe(32)`` is 43).
MIN_TOKEN_LENGTH = 16
COOKIE = "tokenmeter_session"
ONCE_TTL_S = 600.0
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})

#: The dashboard is server-rendered: no script at all; inline styles and SVG only.
DASHBOARD_CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
#: /docs: Swagger UI's own files, served from the package (never a CDN).
DOCS_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'"
)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def check_token(token: str | None) -> str:
    """The configured API token, or RuntimeError saying what is wrong with it."""
    if not token:
        raise RuntimeError(
            "TOKENMETER_API_TOKEN is not set: set it (clients send 'Authorization: Bearer "
            "<token>'), or run `tokenmeter api --no-auth` on a trusted machine"
        )
    if token != token.strip() or len(token) < MIN_TOKEN_LENGTH:
        raise RuntimeError(
            f"TOKENMETER_API_TOKEN must be at least {MIN_TOKEN_LENGTH} characters, without "
            "leading or trailing spaces (make one: python -c 'import secrets; "
            "print(secrets.token_urlsafe(32))')"
        )
    return token


def header_bytes(value: str) -> bytes:
    """A header value as the bytes the client sent (ASGI servers decode headers as latin-1)."""
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:
        return value.encode("utf-8")


def same_secret(given: bytes, expected: bytes) -> bool:
    """Constant-time comparison of bytes (``compare_digest`` on str refuses non-ASCII)."""
    return hmac.compare_digest(given, expected)


class SignIn:
    """The dashboard's session cookie and one-time links for one configured token."""

    def __init__(self, token: str) -> None:
        self._key = token.encode("utf-8")
        self.cookie_value = hmac.new(
            self._key, b"tokenmeter dashboard v1", hashlib.sha256
        ).hexdigest()
        self._once: dict[str, float] = {}
        self._lock = threading.Lock()

    def token_matches(self, given: bytes) -> bool:
        return same_secret(given, self._key)

    def cookie_matches(self, value: str | None) -> bool:
        return value is not None and same_secret(
            value.encode("utf-8", "replace"), self.cookie_value.encode()
        )

    def issue_once(self) -> str:
        """A code for ``/login?once=...``: good for one sign-in within ``ONCE_TTL_S``."""
        code = secrets.token_urlsafe(24)
        with self._lock:
            now = time.monotonic()
            self._once = {c: t for c, t in self._once.items() if t > now}
            self._once[code] = now + ONCE_TTL_S
        return code

    def redeem_once(self, code: str) -> bool:
        with self._lock:
            expires = self._once.pop(code, None)
        return expires is not None and expires > time.monotonic()


class SecurityHeaders:
    """ASGI middleware: the security headers on every response and, when ``loopback_only``
    (``--no-auth``), a 400 for any Host but a loopback name (a DNS-rebinding page names its
    own host)."""

    def __init__(self, app: ASGIApp, *, loopback_only: bool = False) -> None:
        self.app = app
        self.loopback_only = loopback_only

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.loopback_only and _host(scope) not in LOOPBACK_HOSTS:
            await _plain(send, 400, b"tokenmeter api --no-auth answers loopback names only")
            return
        path: str = scope.get("path", "")
        csp = DOCS_CSP if path.startswith("/docs") else DASHBOARD_CSP

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [
                    (b"content-security-policy", csp.encode()),
                    (b"x-frame-options", b"DENY"),
                    (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"no-referrer"),
                    (b"cache-control", b"no-store"),
                ]
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, with_headers)


def _host(scope: Scope) -> str:
    for name, value in scope.get("headers", []):
        if name == b"host":
            host = value.decode("latin-1").lower()
            if host.startswith("["):
                return host.split("]", 1)[0] + "]"
            return host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    return ""


async def _plain(send: Send, status: int, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"text/plain; charset=utf-8")],
        }
    )
    await send({"type": "http.response.body", "body": body})


_SECRET_QUERY = re.compile(r"(?i)([?&](?:token|once|api_key|key)=)[^&\s\"]*")


def redact_query(text: str) -> str:
    """``/x?token=abc&a=1`` -> ``/x?token=[redacted]&a=1``."""
    return _SECRET_QUERY.sub(r"\1[redacted]", text)


class RedactSecrets(logging.Filter):
    """A logging filter for uvicorn's access log: secrets in a query string never reach a log
    line, whatever a client puts there."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(redact_query(a) if isinstance(a, str) else a for a in record.args)
        if isinstance(record.msg, str):
            record.msg = redact_query(record.msg)
        return True


def install_log_redaction() -> None:
    for name in ("uvicorn.access", "uvicorn.error"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactSecrets) for f in logger.filters):
            logger.addFilter(RedactSecrets())


class AnswerCache:
    """Bodies of recent answers by query, each kept ``ttl_s`` seconds (at most ``size``): what
    a dashboard, a metrics scraper and a script polling the same summary would otherwise
    compute again and again.  Used from the event loop only (no lock needed)."""

    def __init__(self, ttl_s: float, size: int = 512) -> None:
        self.ttl_s = ttl_s
        self.size = size
        self._bodies: dict[Any, tuple[float, bytes]] = {}
        self._flights: dict[Any, asyncio.Future[bytes]] = {}

    async def answer(self, key: Any, compute: Callable[[], Awaitable[bytes]]) -> bytes:
        """The kept body of ``key``, else ``compute()``'s, computed once however many ask at
        the same moment (when the answer expires under load, the requests that arrive while
        it is recomputed wait for that one computation instead of each starting their own).
        A failure reaches every waiter and is not kept.  With the cache off (ttl 0), every
        request computes its own."""
        body = self.get(key)
        if body is not None:
            return body
        if self.ttl_s <= 0:
            return await compute()
        flight = self._flights.get(key)
        if flight is None:
            flight = asyncio.ensure_future(compute())
            self._flights[key] = flight
            flight.add_done_callback(functools.partial(self._landed, key))
        return await asyncio.shield(flight)  # a waiter that leaves does not cancel it

    def _landed(self, key: Any, flight: asyncio.Future[bytes]) -> None:
        self._flights.pop(key, None)
        if not flight.cancelled() and flight.exception() is None:
            self.put(key, flight.result())

    def get(self, key: Any) -> bytes | None:
        if self.ttl_s <= 0:
            return None
        kept = self._bodies.get(key)
        if kept is None:
            return None
        if kept[0] <= time.monotonic():
            del self._bodies[key]
            return None
        return kept[1]

    def put(self, key: Any, body: bytes) -> None:
        if self.ttl_s <= 0:
            return
        if len(self._bodies) >= self.size:
            now = time.monotonic()
            self._bodies = {k: v for k, v in self._bodies.items() if v[0] > now}
            if len(self._bodies) >= self.size:
                self._bodies.pop(next(iter(self._bodies)))
        self._bodies[key] = (time.monotonic() + self.ttl_s, body)
