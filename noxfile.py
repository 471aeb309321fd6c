"""The declared dependency ranges, tested at both ends: ``make compat`` (nox).

- ``lowest``: every dependency of tokenmeter (and of the demo app and the PostgreSQL extra) at
  the lowest version its range in ``pyproject.toml`` allows, pinned by a constraints file
  generated from those ranges; the unit and capture tests (no worker subprocesses).
- ``latest``: the newest versions the ranges allow; the whole suite.

Python 3.11 is the only interpreter this machine's registries provide (no 3.13 build is on
PyPI or in Debian 12), so both sessions run on it.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import nox
from packaging.requirements import Requirement

nox.options.sessions = ["lowest", "latest"]
nox.options.default_venv_backend = "uv"
nox.options.error_on_missing_interpreters = True

ROOT = Path(__file__).parent
PYTHON = "3.11"


def lowest_constraints() -> list[str]:
    """``name==lower`` for every runtime requirement with a lower bound (``>=`` or ``==``)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    pins = []
    for line in [*project["dependencies"], *extras["postgres"], *extras["demo"]]:
        req = Requirement(line)
        lows = [s.version for s in req.specifier if s.operator in (">=", "==", "~=")]
        if not lows:
            raise SystemExit(f"{line!r} has no lower bound: a range must say where it starts")
        pins.append(f"{req.name}=={lows[0]}")
    return pins


@nox.session(python=PYTHON)
def lowest(session: nox.Session) -> None:
    constraints = Path(session.create_tmp()) / "constraints-lowest.txt"
    constraints.write_text("\n".join(lowest_constraints()) + "\n")
    session.log("lowest versions:\n" + constraints.read_text())
    session.install("-c", str(constraints), ".[dev,postgres,demo]")
    session.run("uv", "pip", "freeze", "--python", "python", silent=False)
    session.run("pytest", "-m", "not slow", "-p", "no:randomly", *session.posargs)


@nox.session(python=PYTHON)
def latest(session: nox.Session) -> None:
    session.install("--upgrade", ".[dev,postgres,demo]")
    session.run("pytest", *session.posargs)
