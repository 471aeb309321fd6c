"""Is a process (still) the one we saw?  Liveness that survives pid reuse."""

from __future__ import annotations

import os
from pathlib import Path


def pid_alive(pid: int) -> bool:
    """True if a process with ``pid`` exists on this host (it may be another one by now)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def process_started(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot (Linux), or None where unknown.

    A pid reused after a restart (a container restarted with the same hostname) belongs to a
    process that started at another time: ``(pid, started)`` names one process.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    try:  # the command name (field 2) may hold spaces and parentheses: count after its end
        return int(stat[stat.rindex(")") + 2 :].split()[19])
    except (ValueError, IndexError):
        return None
