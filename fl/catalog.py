"""The experiment and study files shipped with Bonsai, reachable by name.

They live in the ``simulations`` package (installed as package data with the
wheel), so ``bonsai run quickstart`` and ``bonsai sweep smoke_study`` work from
any directory, and ``bonsai init DIR`` copies them into a user's folder to edit.
A path to a file always wins over a shipped name.
"""

from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path

__all__ = ["CatalogError", "copy_to", "names", "resolve", "shipped"]

SUFFIX = ".yaml"


class CatalogError(ValueError):
    """A name that is neither a file nor a shipped experiment, or an unsafe copy."""


def _root() -> Path:
    return Path(str(resources.files("simulations")))


def shipped() -> dict[str, Path]:
    """Shipped files by name (``quickstart`` -> .../simulations/quickstart.yaml)."""
    return {p.name.removesuffix(SUFFIX): p for p in sorted(_root().glob(f"*{SUFFIX}"))}


def names() -> list[str]:
    """Names of the shipped experiment and study files."""
    return list(shipped())


def resolve(arg: str, what: str = "experiment file") -> str:
    """``arg`` when it is a file; else the shipped file it names (with or without
    ``.yaml``, with or without a leading ``simulations/``).

    Raises CatalogError naming the shipped files when it is neither.
    """
    if Path(arg).expanduser().is_file():
        return arg
    name = arg.removeprefix("simulations/").removesuffix(SUFFIX)
    found = shipped().get(name)
    if found is not None and "/" not in name:
        return str(found)
    raise CatalogError(f"{what}: {arg!r} does not exist and is not a shipped name; shipped: "
                       f"{', '.join(names())} (`bonsai init DIR` copies them to edit)")


def copy_to(folder: str | Path) -> list[Path]:
    """Copy every shipped file into ``folder`` (created). Nothing is overwritten: if any
    target exists, CatalogError names it and nothing is copied."""
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise CatalogError(f"DIR: {str(folder)!r} is a file, not a folder")
    targets = {src: folder / src.name for src in shipped().values()}
    existing = [t for t in targets.values() if t.exists()]
    if existing:
        raise CatalogError(f"DIR: {str(existing[0])!r} already exists ({len(existing)} of "
                           f"{len(targets)} files would be overwritten); nothing was copied")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for src, dst in targets.items():
            shutil.copyfile(src, dst)
    except OSError as e:
        raise CatalogError(f"DIR: cannot write {str(folder)!r} ({e.strerror})") from None
    return list(targets.values())
