"""On-disk cache of the dataset arrays, split and partitions every process needs.

In a simulation every Ray actor (and the server) needs the same seeded split
of the dataset into a training pool and a test set, and the pool's partition.
Computing them takes scikit-learn (the stratified split, the bundled digits)
and flwr-datasets (the partitioners, on Hugging Face datasets and pyarrow):
about 210 MB resident in every process that imports them, and seconds of work
per process at 1000 clients. So the first process to need an entry computes it
and stores it here with an atomic rename; every other process reads a small
.npz with numpy. ``bonsai run`` and ``bonsai sweep`` fill the cache before the
federation starts (:func:`fl.data.prepare`).

An entry is named by the SHA-256 of its key: everything its content depends on
(the config fields, the seed, the source file's path, size and the SHA-256 of
its whole content (:func:`file_fingerprint`), the versions of the libraries
that computed it, and :data:`FORMAT`). A source file replaced by another, even
one of the same size and modification time, is a new entry, never a stale one;
an unreadable entry is computed again. Location: ``BONSAI_CACHE_DIR``, else
``$XDG_CACHE_HOME/bonsai``, else ``~/.cache/bonsai``; ``BONSAI_CACHE_DIR=off``
turns the cache off.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from fl.files import atomic_file

#: bump when the split, the partitioning or the stored layout changes
FORMAT = 2
ENV = "BONSAI_CACHE_DIR"
_KEY = "__key__"

_log = logging.getLogger("fl.datacache")
_warned_unwritable = False

Arrays = dict[str, np.ndarray]


def cache_dir() -> Path | None:
    """Where entries live; None when ``BONSAI_CACHE_DIR=off``."""
    env = os.environ.get(ENV)
    if env is not None:
        return None if env.strip().lower() in ("off", "0", "none", "") else Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "bonsai"


def versions(*packages: str) -> dict[str, str]:
    """Installed versions of ``packages`` (read from metadata: nothing is imported)."""
    out = {}
    for p in packages:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = "absent"
    return out


def file_fingerprint(path: str | Path) -> dict[str, Any]:
    """Absolute path, size and the SHA-256 of the whole content: a file whose bytes
    changed gets a new key, whatever its modification time says.

    The content, not size and mtime: a file copied over with its times preserved
    (``cp -p``, ``rsync -t``, an unpacked archive) keeps both. Hashing reads the file
    once more in the process that loads it, which already reads and parses all of it.
    """
    p = Path(path).expanduser().resolve()
    with open(p, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
        size = os.fstat(f.fileno()).st_size
    return {"path": str(p), "size": size, "sha256": digest}


def key_digest(kind: str, key: Mapping[str, Any]) -> tuple[str, str]:
    """(canonical JSON of the key, its SHA-256 hex digest)."""
    text = json.dumps({"kind": kind, "format": FORMAT, **key}, sort_keys=True, default=str)
    return text, hashlib.sha256(text.encode()).hexdigest()


def _read(path: Path, text: str) -> Arrays | None:
    try:
        with np.load(path, allow_pickle=False) as f:
            if _KEY not in f.files or str(f[_KEY]) != text:
                return None
            return {n: f[n] for n in f.files if n != _KEY}
    except FileNotFoundError:
        return None
    except Exception as e:  # noqa: BLE001 - a torn or foreign file: compute it again
        _log.warning("data cache: ignoring unreadable %s (%s: %s)", path, type(e).__name__, e)
        return None


def _write(path: Path, text: str, arrays: Arrays) -> None:
    global _warned_unwritable
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path, "wb") as f:  # readers see no entry or the whole entry
            np.savez(f, **{_KEY: np.array(text)}, **arrays)
    except OSError as e:
        if not _warned_unwritable:
            _warned_unwritable = True
            _log.warning("data cache: cannot write %s (%s); every process computes its own "
                         "split (set %s to a writable folder)", path.parent, e, ENV)


def cached(kind: str, key: Mapping[str, Any], compute: Callable[[], Arrays]) -> Arrays:
    """The arrays stored under (``kind``, ``key``); ``compute()`` them and store them
    when there is no readable entry. ``compute`` must be a pure function of ``key``."""
    root = cache_dir()
    if root is None:
        return compute()
    text, digest = key_digest(kind, key)
    path = root / f"{kind}-{digest[:32]}.npz"
    found = _read(path, text)
    if found is not None:
        return found
    arrays = compute()
    _write(path, text, arrays)
    _log.info("data cache: stored %s", path.name)
    return arrays


def pack_parts(parts: tuple[np.ndarray, ...]) -> Arrays:
    """Ragged partitions as one flat array and offsets (what an entry stores)."""
    sizes = np.array([len(p) for p in parts], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    rows = np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
    return {"offsets": offsets, "rows": rows}


def unpack_parts(entry: Mapping[str, np.ndarray]) -> tuple[np.ndarray, ...]:
    """Inverse of :func:`pack_parts`."""
    o, rows = entry["offsets"], entry["rows"]
    return tuple(rows[o[i]:o[i + 1]] for i in range(len(o) - 1))
