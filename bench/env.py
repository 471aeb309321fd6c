"""An explicit environment for the worker and CLI subprocesses that tests and benches start."""

from __future__ import annotations

import os


def subprocess_env(**extra: str) -> dict[str, str]:
    """Only what a process needs to run, plus ``extra``: nothing of the developer's own settings
    (``TOKENMETER_*``, ``DATABASE_URL``, ``CELERY_*``...) leaks into a measured or tested run."""
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "SYSTEMROOT")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env.update(extra)
    return env
