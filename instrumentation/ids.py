"""Unique ids without a system call each: a random prefix per process and a counter.

``uuid.uuid4()`` reads the kernel's random source every time (a system call, which under a
busy GIL cost tens of microseconds, four times a task).  An id here is 32 hex digits, the
shape of ``uuid4().hex``: 16 random ones drawn once per process (again in a forked child,
which must not repeat its parent's ids) and a 64-bit counter.  Unique across processes and
hosts with the odds of a 64-bit random collision; not a secret.
"""

from __future__ import annotations

import itertools
import os
import threading

_lock = threading.Lock()
_prefix = ""
_counter: itertools.count[int] = itertools.count()


def _reseed() -> None:
    global _prefix, _counter
    _prefix = os.urandom(8).hex()
    _counter = itertools.count(int.from_bytes(os.urandom(2), "big"))


def new_id() -> str:
    """32 hex digits, unique (see the module's docstring)."""
    return f"{_prefix}{next(_counter) & 0xFFFFFFFFFFFFFFFF:016x}"  # next() is atomic


_reseed()
os.register_at_fork(after_in_child=_reseed)
