"""bench/RESULTS.md: each benchmark owns a section and rewrites only its own."""

from __future__ import annotations

import os
import platform
from datetime import UTC, datetime
from pathlib import Path


def write_section(path: Path, name: str, body: str) -> None:
    """Replace (or append) the ``name`` section of the results file, keeping the others."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    stamp = (
        f"_{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.node()}: {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, {platform.machine()}_"
    )
    block = f"{start}\n{stamp}\n\n{body}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


def publish(body: str, results: Path | None, name: str) -> None:
    """Print a benchmark's table and, when asked (``--results``), write it as its section."""
    print()
    print(body)
    if results:
        write_section(results, name, body)
        print(f"written to {results}")
