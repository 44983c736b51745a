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

Large arrays (images decoded from files or the hub, token ids) are a folder
entry instead (:func:`cached_files`): one ``.npy`` file per array, opened
memory-mapped, so a process holds in memory only the rows it reads
(:func:`read_rows` reads them through a mapping of their own, which the
process drops afterwards: a Ray actor that serves many clients does not keep
the pages of all of them). With the cache off such an entry is built in a
temporary folder removed when the process exits.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import shutil
import tempfile
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


def tree_fingerprint(path: str | Path) -> dict[str, Any]:
    """:func:`file_fingerprint` of a file; of a folder, the absolute path, the count and
    total size of its files (names starting with ``.`` left out, as ``datasets`` leaves
    them out) and one SHA-256 over their relative paths and contents, in sorted order."""
    p = Path(path).expanduser().resolve()
    if p.is_file():
        return file_fingerprint(p)
    h = hashlib.sha256()
    count = total = 0
    for f in sorted(q for q in p.rglob("*") if q.is_file()
                    and not any(part.startswith(".") for part in q.relative_to(p).parts)):
        rel = f.relative_to(p).as_posix()
        with open(f, "rb") as fh:
            digest = hashlib.file_digest(fh, "sha256").hexdigest()
            size = os.fstat(fh.fileno()).st_size
        h.update(f"{rel}\0{size}\0{digest}\n".encode())
        count, total = count + 1, total + size
    return {"path": str(p), "files": count, "size": total, "sha256": h.hexdigest()}


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


# --- folder entries: memory-mapped .npy files ------------------------------------------
_KEY_FILE, _META_FILE = "key.json", "meta.json"
#: the copy-on-write mode: a mapped array is writable in the process (torch accepts it
#: without a warning) while the file never changes; pages are read from disk on demand
MMAP_MODE = "c"
_TEMP_ENTRIES: list[Path] = []


def _remove_temp_entries() -> None:
    for p in _TEMP_ENTRIES:
        shutil.rmtree(p, ignore_errors=True)


atexit.register(_remove_temp_entries)


def _open_entry(entry: Path, text: str) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
    try:
        if (entry / _KEY_FILE).read_text() != text:
            return None
        meta = json.loads((entry / _META_FILE).read_text())
        arrays = {p.stem: np.load(p, mmap_mode=MMAP_MODE, allow_pickle=False)
                  for p in sorted(entry.glob("*.npy"))}
        return arrays, meta
    except FileNotFoundError:
        return None
    except Exception as e:  # noqa: BLE001 - a damaged entry: build it again
        _log.warning("data cache: ignoring unreadable %s (%s: %s)", entry, type(e).__name__, e)
        return None


def _build(folder: Path, text: str, build: Callable[[Path], Mapping[str, Any]]) -> None:
    meta = dict(build(folder))
    (folder / _META_FILE).write_text(json.dumps(meta, sort_keys=True))
    (folder / _KEY_FILE).write_text(text)  # last: its presence marks a whole entry


def cached_files(kind: str, key: Mapping[str, Any], build: Callable[[Path], Mapping[str, Any]]
                 ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The arrays (memory-mapped ``np.memmap``, by file stem) and JSON metadata of the
    folder entry (``kind``, ``key``). When there is no readable entry, ``build(folder)``
    writes ``NAME.npy`` files into an empty folder and returns the metadata (JSON
    values); the folder then becomes the entry with one atomic rename. ``build`` must
    be a pure function of ``key``."""
    global _warned_unwritable
    text, digest = key_digest(kind, key)
    root = cache_dir()
    if root is not None:
        entry = root / f"{kind}-{digest[:32]}"
        found = _open_entry(entry, text)
        if found is not None:
            return found
        try:
            root.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", suffix=".tmp", dir=root))
        except OSError as e:
            if not _warned_unwritable:
                _warned_unwritable = True
                _log.warning("data cache: cannot write %s (%s); every process decodes its own "
                             "copy (set %s to a writable folder)", root, e, ENV)
        else:
            try:
                _build(tmp, text, build)
                if entry.exists():  # a damaged entry, or one another process just finished
                    found = _open_entry(entry, text)
                    if found is not None:
                        shutil.rmtree(tmp, ignore_errors=True)
                        return found
                    shutil.rmtree(entry, ignore_errors=True)
                os.rename(tmp, entry)  # atomic: readers see no entry or the whole one
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            _log.info("data cache: stored %s", entry.name)
            found = _open_entry(entry, text)
            if found is None:
                raise OSError(f"data cache: {entry} cannot be read back")
            return found
    tmp = Path(tempfile.mkdtemp(prefix=f"bonsai-{kind}-"))
    _TEMP_ENTRIES.append(tmp)
    _build(tmp, text, build)
    found = _open_entry(tmp, text)
    if found is None:
        raise OSError(f"data cache: {tmp} cannot be read back")
    return found


def read_rows(array: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``array[rows]`` as an array in memory. For a memory-mapped ``array`` the rows are
    read through a mapping of their own that is closed before returning, so the pages
    they touched do not stay in this process's resident set."""
    filename = getattr(array, "filename", None)
    if not isinstance(array, np.memmap) or not filename:
        return np.asarray(array[rows])
    # the mapping's only reference is this local: it is unmapped when the function returns
    mapped = np.load(filename, mmap_mode="r", allow_pickle=False)
    return np.array(mapped[rows])  # a copy in memory, never a view of the mapping
