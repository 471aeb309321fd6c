"""The read side under hostile or careless input (#17): windows right in every time zone on
both backends, no 500 and no traceback ever, a token that never travels in a URL or a log line,
security headers everywhere, ``--no-auth`` for loopback only, /docs offline."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from models import session_scope
from tests.helpers import clear_settings
from tokenmeter import OpenAICall
from tokenmeter.reporting import web
from tokenmeter.reporting.api import create_app
from tokenmeter.reporting.cli import app as cli

TOKEN = "hardening-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
#: Europe/Berlin leaves CET (+01:00) for CEST (+02:00) at 2026-03-29 01:00 UTC.
DST_CHANGE = datetime(2026, 3, 29, 1, 0, tzinfo=UTC)


@pytest.fixture
def client(db_url: str, monkeypatch: pytest.MonkeyPatch) -> TestClient:
    monkeypatch.setenv("TOKENMETER_API_TOKEN", TOKEN)
    clear_settings()
    with session_scope() as s:  # calls each side of the DST change, and one 5 hours later
        for i, at in enumerate(
            [
                DST_CHANGE - timedelta(minutes=20),
                DST_CHANGE + timedelta(minutes=20),
                DST_CHANGE + timedelta(hours=5),
            ]
        ):
            s.add(
                OpenAICall(
                    request_id=f"tz{i}",
                    operation="chat",
                    model="gpt-4o-mini",
                    input_tokens=10 + i,
                    output_tokens=1,
                    cost_usd=Decimal("0.000001"),
                    created_at=at,
                )
            )
    return TestClient(create_app())


def _calls(client: TestClient, start: str, end: str) -> int:
    response = client.get(
        "/api/usage/summary", headers=AUTH, params={"start_date": start, "end_date": end}
    )
    assert response.status_code == 200, response.text
    return int(response.json()["total"]["calls"])


def test_a_window_means_the_same_moments_in_every_offset(client: TestClient) -> None:
    """On SQLite a window written at +05:00 used to select nothing (stored UTC text compared
    with local text); every bound is now UTC before it reaches the database."""
    assert _calls(client, "2026-03-29T00:30:00Z", "2026-03-29T01:30:00Z") == 2
    assert _calls(client, "2026-03-29T05:30:00+05:00", "2026-03-29T06:30:00+05:00") == 2
    # across Berlin's DST change: 01:30 CET to 03:30 CEST is one hour, 00:30Z to 01:30Z
    assert _calls(client, "2026-03-29T01:30:00+01:00", "2026-03-29T03:30:00+02:00") == 2
    assert _calls(client, "2026-03-29T01:30:00+01:00", "2026-03-29T02:00:00+01:00") == 1
    assert _calls(client, "2026-03-28T19:30:00-05:00", "2026-03-28T20:30:00-05:00") == 2
    assert _calls(client, "2026-03-29T05:30:00-00:30", "2026-03-29T06:30:00-00:30") == 1
    result = CliRunner().invoke(
        cli,
        [
            "check-usage",
            "--until",
            "2026-03-29T06:30:00+05:00",
            "--since",
            "1h",
            "--format",
            "json",
        ],
    )
    assert result.exit_code == 0, result.output
    assert '"calls": 2' in result.output.replace(" ", " ")


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"end_date": "9999-12-31"}, "out of range"),  # was OverflowError: a 500
        ({"end_date": "0001-01-01"}, "out of range"),
        ({"start_date": "0001-01-01T00:00:00+05:00"}, "out of range"),
        ({"start_date": "1" * 50_000}, "is not an ISO date"),  # was accepted and parsed
        ({"start_date": "\u0662\u0660\u0662\u0666-11-24"}, "is not an ISO date"),  # ٢٠٢٦
        ({"start_date": "2026-11-24T00:00:00+25:00"}, "is not an ISO date"),
        ({"start_date": " "}, "is not an ISO date"),
    ],
)
def test_out_of_range_and_malformed_dates_are_422s(client: TestClient, params, message) -> None:
    for path in ("/api/usage/summary", "/api/usage/scopes", "/api/usage/calls"):
        response = client.get(path, headers=AUTH, params=params)
        assert response.status_code == 422, (path, response.text)
        assert message in response.json()["detail"]
        assert len(response.text) < 400  # the 50,000 digits are not echoed back


def test_the_token_is_compared_as_bytes_and_read_from_the_header_only(client) -> None:
    # a non-ASCII bearer token: a 401, never a 500 (compare_digest on str refuses it)
    raw = {"Authorization": "Bearer jeton-é-ü-ß".encode()}
    assert client.get("/api/usage/summary", headers=raw).status_code == 401
    with_query = client.get("/api/usage/summary", params={"token": TOKEN})
    assert with_query.status_code == 401 and "not accepted" in with_query.json()["detail"]
    assert client.get("/api/usage/calls", params={"token": TOKEN}).status_code == 401
    assert client.get("/", params={"token": TOKEN}).status_code == 401  # the sign-in page
    assert client.get("/api/usage/summary", headers=AUTH).status_code == 200


def test_a_non_ascii_token_works_and_a_weak_one_is_refused(db_url, monkeypatch) -> None:
    token = "pässwört-ünïcödé-ßeheim"
    monkeypatch.setenv("TOKENMETER_API_TOKEN", token)
    clear_settings()
    api = TestClient(create_app())
    sent = {"Authorization": f"Bearer {token}".encode()}  # the UTF-8 bytes
    assert api.get("/api/usage/summary", headers=sent).status_code == 200
    signed = api.post("/login", data={"token": token}, follow_redirects=False)
    assert signed.status_code == 303
    for weak in (" ", "short", " " + TOKEN, TOKEN + " "):
        monkeypatch.setenv("TOKENMETER_API_TOKEN", weak)
        clear_settings()
        with pytest.raises(RuntimeError, match="at least 16 characters"):
            create_app()
        result = CliRunner().invoke(cli, ["api"])
        assert result.exit_code == 2 and "at least 16 characters" in result.output


def test_the_dashboard_signs_in_with_a_form_or_a_one_time_link(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 401 and '<form method="post" action="/login">' in page.text
    wrong = client.post("/login", data={"token": "not-the-token-at-all"}, follow_redirects=False)
    assert wrong.status_code == 401 and "wrong token" in wrong.text
    right = client.post("/login", data={"token": TOKEN}, follow_redirects=False)
    assert right.status_code == 303 and right.headers["location"] == "/"
    cookie = right.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and TOKEN not in cookie
    assert client.get("/").status_code == 200  # the cookie, kept by the client
    assert client.get("/api/usage/summary").status_code == 401  # the API: header only
    client.post("/logout", follow_redirects=False)
    client.cookies.clear()
    assert client.get("/").status_code == 401

    once = client.app.state.sign_in.issue_once()  # type: ignore[attr-defined]
    used = client.get("/login", params={"once": once}, follow_redirects=False)
    assert used.status_code == 303 and web.COOKIE in used.headers["set-cookie"]
    client.cookies.clear()
    again = client.get("/login", params={"once": once}, follow_redirects=False)
    assert again.status_code == 401 and "used already or has expired" in again.text
    too_big = client.post("/login", content=b"token=" + b"x" * 10_000)
    assert too_big.status_code == 413


def test_every_response_carries_the_security_headers(client: TestClient) -> None:
    for path, headers in [
        ("/api/usage/summary", AUTH),
        ("/api/usage/summary", {}),
        ("/", AUTH),
        ("/docs", {}),
        ("/no/such/page", {}),
        ("/openapi.json", {}),
    ]:
        response = client.get(path, headers=headers)
        assert response.headers["x-frame-options"] == "DENY", path
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["referrer-policy"] == "no-referrer"
        assert response.headers["cache-control"] == "no-store"
        assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
    dashboard = client.get("/", headers=AUTH).headers["content-security-policy"]
    assert "script-src" not in dashboard and "default-src 'none'" in dashboard


def test_docs_load_their_assets_from_the_server_itself(client: TestClient) -> None:
    page = client.get("/docs")
    assert page.status_code == 200 and "cdn" not in page.text.lower()
    assert "http" not in page.text  # every asset is a path on this server
    for asset in (
        "/docs/assets/swagger-ui-bundle.js",
        "/docs/assets/swagger-ui.css",
        "/docs/init.js",
    ):
        response = client.get(asset)
        assert response.status_code == 200 and len(response.content) > 20, asset
    assert "SwaggerUIBundle" in client.get("/docs/assets/swagger-ui-bundle.js").text[:200_000]


def test_no_auth_answers_loopback_names_only(db_url: str) -> None:
    open_app = create_app(require_auth=False)
    for host, status in [
        ("127.0.0.1:8000", 200),
        ("localhost", 200),
        ("[::1]:8000", 200),
        ("attacker.example", 400),  # a DNS-rebinding page
        ("127.0.0.1.attacker.example", 400),
    ]:
        response = TestClient(open_app, base_url="http://127.0.0.1").get(
            "/api/usage/summary", headers={"Host": host}
        )
        assert response.status_code == status, host
    refused = CliRunner().invoke(cli, ["api", "--no-auth", "--host", "0.0.0.0"])
    assert refused.exit_code == 2 and "loopback only" in refused.output


def test_no_secret_reaches_the_access_log(caplog) -> None:
    logger = logging.getLogger("uvicorn.access")
    web.install_log_redaction()
    with caplog.at_level(logging.INFO, logger="uvicorn.access"):
        logger.info(
            '%s - "%s %s HTTP/%s" %d',
            "127.0.0.1:5555",
            "GET",
            f"/?token={TOKEN}&days=7",
            "1.1",
            401,
        )
        logger.info(
            '%s - "%s %s HTTP/%s" %d', "127.0.0.1:5555", "GET", "/login?once=abc", "1.1", 303
        )
    text = caplog.text
    assert TOKEN not in text and "once=abc" not in text
    assert "token=[redacted]&days=7" in text and "once=[redacted]" in text


@given(
    since=st.one_of(st.text(max_size=12), st.from_regex(r"\A[0-9]{1,12}[smhdwx]\Z")),
    until=st.one_of(
        st.none(),
        st.text(max_size=30),
        st.datetimes(timezones=st.timezones()).map(lambda d: d.isoformat()),
    ),
    by=st.sampled_from(["model", "task", "kind", "day", "status", "tier", "colour", ""]),
    fmt=st.sampled_from(["table", "json", "csv", "xml"]),
)
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)
def test_check_usage_never_ends_in_a_traceback(since, until, by, fmt) -> None:
    """Whatever the options, exit 0 (or 1, 2) with a message: never an exception."""
    args = ["check-usage", "--since", since, "--by", by, "--format", fmt]
    if until is not None:
        args += ["--until", until]
    result = CliRunner().invoke(cli, args, env={"DATABASE_URL": _PROPERTY_DB})
    assert result.exit_code in (0, 1, 2), (args, result.output)
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        args,
        repr(result.exception),
    )


_PROPERTY_DB = ""


@pytest.fixture(autouse=True)
def _property_db(request, tmp_path_factory) -> None:
    """The property test's ledger: one migrated SQLite file (hypothesis runs many examples in
    one test call, so function-scoped fixtures cannot give each its own)."""
    global _PROPERTY_DB
    if request.node.name.startswith(
        ("test_check_usage_never", "test_scopes_never", "test_audit_options")
    ):
        from models import migrate

        path = tmp_path_factory.mktemp("property") / "ledger.sqlite"
        _PROPERTY_DB = f"sqlite:///{path}"
        migrate.upgrade(_PROPERTY_DB)


@given(
    since=st.one_of(st.text(max_size=12), st.from_regex(r"\A[0-9]{1,12}[smhdwx]\Z")),
    until=st.one_of(st.none(), st.text(max_size=30)),
    kind=st.one_of(st.none(), st.text(max_size=300)),
    limit=st.one_of(st.integers(), st.text(max_size=5)),
    fmt=st.sampled_from(["table", "json", "yaml"]),
)
@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck), database=None)
def test_scopes_never_ends_in_a_traceback(since, until, kind, limit, fmt) -> None:
    args = ["scopes", "--since", since, "--limit", str(limit), "--format", fmt]
    args += [] if until is None else ["--until", until]
    args += [] if kind is None else ["--kind", kind]
    result = CliRunner().invoke(cli, args, env={"DATABASE_URL": _PROPERTY_DB})
    assert result.exit_code in (0, 1, 2), (args, result.output)
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        args,
        repr(result.exception),
    )


@given(
    since=st.text(max_size=12),
    settle=st.text(max_size=8),
    bucket=st.text(max_size=4),
    by=st.text(max_size=40),
    fmt=st.sampled_from(["table", "json", "csv", "html"]),
)
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
def test_audit_options_never_end_in_a_traceback(since, settle, bucket, by, fmt) -> None:
    """(No admin key in the environment: every run stops at its options or at the key.)"""
    args = ["audit", "--since", since, "--settle", settle, "--bucket", bucket, "--by", by]
    result = CliRunner().invoke(
        cli, [*args, "--format", fmt], env={"DATABASE_URL": _PROPERTY_DB, "OPENAI_ADMIN_KEY": ""}
    )
    assert result.exit_code == 2, (args, result.output)
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        args,
        repr(result.exception),
    )
