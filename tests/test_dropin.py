"""tokenmeter as a stranger installs it: the wheel, a project with its own generic module names.

The wheel is built from this checkout and installed (not editable) into a fresh virtual
environment whose only other path is the dependencies' folder; the repository is not on
``sys.path``.  A Celery project in a temporary folder has its own ``models.py``, ``tasks.py``,
``settings.py``, ``celeryconfig.py`` and Alembic history (``tests/userproject``).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import sysconfig
import zipfile
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from tests.helpers import subprocess_env, wait_for
from tokenmeter.sandbox.ground_truth import TOKEN_FIELDS
from tokenmeter.sandbox.runner import SandboxServers

ROOT = Path(__file__).resolve().parent.parent
USER_PROJECT = Path(__file__).resolve().parent / "userproject"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "-q",
            "-w",
            str(out),
            str(ROOT),
        ],
        check=True,
        cwd=out,
    )
    (found,) = out.glob("tokenmeter-*.whl")
    return found


def test_the_wheel_installs_one_import_name(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    tops = {n.split("/", 1)[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"tokenmeter"}
    for shipped in (
        "tokenmeter/migrations/env.py",
        "tokenmeter/migrations/versions/0001_openai_calls.py",
        "tokenmeter/migrations/script.py.mako",
        "tokenmeter/prices.toml",
        "tokenmeter/py.typed",
        "tokenmeter/reporting/cli.py",
        "tokenmeter/sandbox/data/posts.json",
    ):
        assert shipped in names, shipped


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel; dependencies come from this environment's site-packages."""
    root = tmp_path_factory.mktemp("venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    python = root / "bin" / "python"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "-q",
            "--no-deps",
            str(wheel),
        ],
        check=True,
    )
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # Only the dependencies: a path line in a .pth is not a site dir, so the checkout's
    # editable install (a .pth of its own in that folder) is not activated.
    Path(site, "_tokenmeter_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return root


@pytest.fixture
def project(tmp_path: Path) -> Path:
    folder = tmp_path / "userapp"
    shutil.copytree(USER_PROJECT, folder, ignore=shutil.ignore_patterns("__pycache__"))
    return folder


def _env(venv: Path, project: Path, db_url: str, **extra: str) -> dict[str, str]:
    """An explicit environment: nothing of the developer's TOKENMETER_* or PYTHONPATH."""
    env = {
        "PATH": f"{venv / 'bin'}:/usr/bin:/bin",
        "HOME": str(project),
        "LANG": "C.UTF-8",
        "DATABASE_URL": db_url,
        "USERAPP_DATA_DIR": str(project / "var"),
        "TOKENMETER_DATA_DIR": str(project / "var" / "tokenmeter"),
    }
    env.update(extra)
    return env


def _run(venv: Path, project: Path, env: dict[str, str], *args: str) -> str:
    result = subprocess.run(
        [str(venv / "bin" / args[0]), *args[1:]],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"{args}: {result.stdout}\n{result.stderr}"
    return result.stdout


def _scalar(url: str, sql: str) -> Any:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(text(sql)).scalar()
    finally:
        engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def user_db(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'userapp.sqlite'}"
    url: str = request.getfixturevalue("pg_url")
    return url


def test_a_celery_project_with_its_own_models_meters_exactly(
    venv: Path, project: Path, user_db: str
) -> None:
    with SandboxServers() as sandbox:
        env = _env(
            venv,
            project,
            user_db,
            OPENAI_BASE_URL=sandbox.openai_base_url,
            OPENAI_API_KEY="sk-sandbox",
        )
        imported = _run(
            venv,
            project,
            env,
            "python",
            "-c",
            "import tokenmeter, models, settings; print(tokenmeter.__file__)",
        )
        assert imported.startswith(str(venv)), imported  # the wheel, not the checkout

        _run(venv, project, env, "python", "-m", "alembic", "upgrade", "head")
        _run(venv, project, env, "tokenmeter", "migrate")
        assert _scalar(user_db, "SELECT version_num FROM alembic_version") == "u1_reports"

        log = open(project / "worker.log", "wb")  # noqa: SIM115
        worker = subprocess.Popen(
            [
                str(venv / "bin" / "python"),
                "-m",
                "celery",
                "-A",
                "tasks",
                "worker",
                "-P",
                "prefork",
                "-c",
                "2",
                "-l",
                "INFO",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
            ],
            cwd=project,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            _run(
                venv,
                project,
                env,
                "python",
                "-c",
                "import tasks\nfor i in range(1, 7): tasks.write_report.delay(i)",
            )
            truth = wait_for(
                lambda: len(sandbox.ledger) >= 12 and sandbox.ledger.rows(), 90, "12 billed calls"
            )

            def ledger_rows() -> int:
                assert worker.poll() is None, (project / "worker.log").read_text()
                try:
                    return int(_scalar(user_db, "SELECT count(*) FROM openai_calls"))
                except Exception:
                    return 0

            wait_for(lambda: ledger_rows() >= 12, 60, "12 ledger rows")
        finally:
            worker.send_signal(signal.SIGTERM)
            worker.wait(timeout=60)
            log.close()

        engine = create_engine(user_db)
        with engine.connect() as conn:
            ours = {
                r["request_id"]: r
                for r in conn.execute(text("SELECT * FROM openai_calls")).mappings()
            }
            reports = conn.execute(
                text("SELECT id, tokens_in, tokens_out, cost_usd FROM reports ORDER BY id")
            ).all()
            version = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
        engine.dispose()
        assert set(ours) == {b.request_id for b in truth}
        for billed in truth:
            for name in TOKEN_FIELDS:
                assert ours[billed.request_id][name] == getattr(billed, name), name
            assert _money(ours[billed.request_id]["cost_usd"]) == billed.cost_usd
        assert {r["scope_kind"] for r in ours.values()} == {"report"}
        assert version == "u1_reports"  # the user's Alembic history is untouched

        # the rollup into the user's own table is exact, per report
        for report_id, tokens_in, tokens_out, cost in reports:
            mine = [r for r in ours.values() if r["scope_ref"] == str(report_id)]
            assert len(mine) == 2
            assert tokens_in == sum(r["input_tokens"] for r in mine)
            assert tokens_out == sum(r["output_tokens"] for r in mine)
            assert _money(cost) == sum(_money(r["cost_usd"]) for r in mine) > 0

        report = json.loads(
            _run(venv, project, env, "tokenmeter", "check-usage", "--format", "json")
        )
        assert report["total"]["calls"] == 12
        assert report["total"]["input_tokens"] == sum(b.input_tokens for b in truth)
        assert Decimal(report["total"]["cost_usd"]) == sum(
            _money(r["cost_usd"]) for r in ours.values()
        )


def _money(raw: Any) -> Decimal:
    """A Money column read with plain SQL: a scaled integer on SQLite, NUMERIC on PostgreSQL."""
    return Decimal(raw).scaleb(-10) if isinstance(raw, int) else Decimal(raw)


# -- install / uninstall ------------------------------------------------------------------------
def _receivers() -> dict[str, int]:
    from celery import signals

    names = (
        "task_prerun",
        "task_postrun",
        "worker_process_init",
        "worker_ready",
        "worker_shutdown",
    )
    return {n: len(getattr(signals, n).receivers) for n in names}


def _threads() -> set[str]:
    import threading

    return {t.name for t in threading.enumerate()}


def test_install_and_uninstall_are_exact_mirrors(
    no_installation: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fakeredis
    from celery import Celery, signals
    from openai._base_client import AsyncAPIClient, SyncAPIClient

    import tokenmeter
    from tokenmeter.celery_signals import active
    from tokenmeter.sink import DatabaseSink, FileSpool

    assert not tokenmeter.is_instrumented()
    originals = (SyncAPIClient.request, AsyncAPIClient.request)
    before, threads_before = _receivers(), _threads()
    app = Celery("mirror")
    handle = tokenmeter.CeleryMetering(
        app,
        sink=DatabaseSink(spool=FileSpool(tmp_path / "spool")),
        redis_client=fakeredis.FakeRedis(),
        recovery_interval_s=0.05,
    )
    for _ in range(2):  # install / uninstall / install again: the same state each time
        assert handle.install() is handle
        assert handle.install() is handle  # the same installation again: no change
        assert active() is handle and tokenmeter.is_instrumented()
        assert all(_receivers()[n] == before[n] + 1 for n in before)
        signals.worker_ready.send(sender=None)  # starts the recovery thread
        assert "tokenmeter-recovery" in _threads()
        with pytest.raises(RuntimeError, match="already installed"):
            tokenmeter.install(Celery("other"))
        tokenmeter.uninstall()
        assert active() is None and not tokenmeter.is_instrumented()
        assert (SyncAPIClient.request, AsyncAPIClient.request) == originals
        assert _receivers() == before
        assert _threads() == threads_before
    tokenmeter.uninstall()  # nothing installed: a no-op


def test_building_the_integration_does_no_io(
    no_installation: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Settings are read and folders made by install(), not by the constructor."""
    from celery import Celery

    import tokenmeter
    from tests.helpers import clear_settings

    data = tmp_path / "data"
    monkeypatch.setenv("TOKENMETER_DATA_DIR", str(data))
    monkeypatch.setenv("TOKENMETER_METRICS_PORT", "0")
    monkeypatch.setenv("TOKENMETER_DAILY_BUDGET_USD", "not a number")
    clear_settings()
    handle = tokenmeter.CeleryMetering(Celery("lazy", broker="redis://127.0.0.1:1/0"))
    assert not data.exists()
    with pytest.raises(ValueError, match="tokenmeter_daily_budget_usd"):
        handle.install()
    assert not handle.installed and not tokenmeter.is_instrumented()


# -- read commands on a missing or unmigrated database ----------------------------------------
def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tokenmeter.reporting.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=subprocess_env(**env),
    )


@pytest.mark.parametrize("command", [["check-usage"], ["scopes"]])
def test_read_commands_on_a_missing_database_create_nothing(
    tmp_path: Path, command: list[str]
) -> None:
    path = tmp_path / "not" / "there" / "usage.sqlite"
    result = _cli(*command, env={"DATABASE_URL": f"sqlite:///{path}"})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "tokenmeter migrate" in lines[0] and str(path) in lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "not").exists()


def test_read_commands_on_an_unmigrated_database_change_nothing(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "theirs.sqlite"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY)")
    before = sorted(p.name for p in tmp_path.iterdir()), path.read_bytes()
    result = _cli("check-usage", env={"DATABASE_URL": f"sqlite:///{path}"})
    assert result.returncode == 2
    assert "has no tokenmeter ledger" in result.stderr and "tokenmeter migrate" in result.stderr
    assert (sorted(p.name for p in tmp_path.iterdir()), path.read_bytes()) == before
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"


@pytest.mark.postgres
def test_read_commands_on_an_unmigrated_postgresql(pg_url: str) -> None:
    result = _cli("check-usage", env={"DATABASE_URL": pg_url})
    assert result.returncode == 2
    assert "has no tokenmeter ledger" in result.stderr and "Traceback" not in result.stderr
    unreachable = _cli(
        "check-usage", env={"DATABASE_URL": "postgresql://nobody:secret@127.0.0.1:1/nothing"}
    )
    assert unreachable.returncode == 2
    assert "cannot read the database" in unreachable.stderr
    assert "secret" not in unreachable.stderr  # the password is never printed


def test_read_commands_on_an_outdated_ledger_say_so(tmp_path: Path) -> None:
    import tokenmeter.migrate as ledger

    url = f"sqlite:///{tmp_path / 'old.sqlite'}"
    ledger.upgrade(url)
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE tokenmeter_alembic_version SET version_num = 'tm0000_old'"))
    engine.dispose()
    result = _cli("check-usage", env={"DATABASE_URL": url})
    assert result.returncode == 2 and "tm0000_old" in result.stderr
    assert ledger.head() in result.stderr
