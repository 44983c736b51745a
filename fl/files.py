"""Writing files so that a reader (or a crash) never sees half of one.

Every file Bonsai rewrites while others may read it (rounds.csv, summary.json,
checkpoints, data-cache entries, study manifests, report tables) is written to a
temporary file in the same folder and renamed over the target: POSIX rename is
atomic, so readers see the old file or the whole new one.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_file", "atomic_write_json", "atomic_write_text"]


@contextmanager
def atomic_file(path: str | Path, mode: str = "w", **open_kw: Any) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path`` for writing (``mode`` "w" or "wb"); on a
    clean exit it replaces ``path``, on an exception it is removed and ``path`` is
    left as it was."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **open_kw) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Replace ``path`` with ``text`` atomically."""
    with atomic_file(path, "w") as f:
        f.write(text)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Replace ``path`` with ``obj`` as indented JSON (and a newline) atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")
