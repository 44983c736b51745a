"""Dotted keys: the flat form of a nested config (``{"partition": {"alpha": 0.1}}`` is
``{"partition.alpha": 0.1}``), which is how YAML files, ``--set`` overrides, Flower's
run config, config.json and the study grid meet."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["flatten", "nest"]


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings to one level of dotted keys (leaves are kept as they are)."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = prefix + str(k)
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Dotted keys back to nested dicts: the inverse of :func:`flatten`."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        *path, last = key.split(".")
        node = out
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    return out
