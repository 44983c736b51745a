"""Characters as token ids for next-character prediction (LEAF's Shakespeare task).

LEAF (Caldas et al. 2018, arXiv:1812.01097) turns each speaking role's lines into
windows of 80 characters, each labelled with the character that follows it, and
maps characters to ids with one fixed vocabulary of 80 characters. The hub copy
``flwrlabs/shakespeare`` stores the windows already (``x``: 80 characters, ``y``:
the next one, ``character_id``: the role); :func:`windows` makes them from raw
text the way LEAF's preprocessing does.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["LEAF_VOCABULARY", "SEQ_LENGTH", "encode", "encode_labels", "windows"]

#: LEAF's character vocabulary, ids 0..79 in this order: ``ALL_LETTERS`` of
#: TalwalkarLab/leaf, models/utils/language_utils.py (commit 0a4689f), which FedProx's
#: Shakespeare code uses too.
LEAF_VOCABULARY = ("\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]"
                   "abcdefghijklmnopqrstuvwxyz}")
#: LEAF's window length
SEQ_LENGTH = 80

_SIZE = 1 + max(map(ord, LEAF_VOCABULARY))  # every character is ASCII
_LOOKUP = np.full(_SIZE, -1, dtype=np.int64)  # code point -> id (-1: not in the vocabulary)
_LOOKUP[[ord(c) for c in LEAF_VOCABULARY]] = np.arange(len(LEAF_VOCABULARY))


def _ids(points: np.ndarray, rows: np.ndarray, what: str) -> np.ndarray:
    ids = np.where(points < _SIZE, _LOOKUP[np.minimum(points, _SIZE - 1)], -1)
    bad = np.argwhere(ids < 0)
    if len(bad):
        r, *col = (int(i) for i in bad[0])
        ch = chr(int(points[tuple(bad[0])]))
        at = f"row {int(rows[r])}" + (f", position {col[0]}" if col else "")
        raise ValueError(f"{what}: character {ch!r} ({at}) is not in LEAF's "
                         f"{len(LEAF_VOCABULARY)}-character vocabulary ({len(bad)} such "
                         "characters in all)")
    return ids


def encode(texts: Sequence[str], what: str = "text", first_row: int = 0) -> np.ndarray:
    """Strings of one length L as (N, L) int64 ids. Raises ValueError (naming the row,
    counted from ``first_row``) for another length or a character outside the vocabulary."""
    n = len(texts)
    rows = np.arange(first_row, first_row + n)
    if n == 0:
        return np.zeros((0, 0), dtype=np.int64)
    lengths = np.fromiter((len(t) if isinstance(t, str) else -1 for t in texts), np.int64, n)
    if lengths.min() < 0:
        r = int(np.argmin(lengths))
        raise ValueError(f"{what}: row {int(rows[r])} holds {type(texts[r]).__name__}, "
                         "not text")
    if lengths.min() != lengths.max():
        r = int(np.flatnonzero(lengths != lengths[0])[0])
        raise ValueError(f"{what}: rows hold texts of different lengths ({int(lengths[0])} "
                         f"characters in row {first_row}, {int(lengths[r])} in row "
                         f"{int(rows[r])}); next-character windows all have one length")
    length = int(lengths[0])
    if length == 0:
        raise ValueError(f"{what}: the texts are empty")
    points = np.asarray(texts, dtype=f"<U{length}").view(np.uint32).reshape(n, length)
    return _ids(points, rows, what)


def encode_labels(chars: Sequence[str], what: str = "label", first_row: int = 0) -> np.ndarray:
    """Single characters (the next character of each window) as (N,) int64 ids."""
    ids = encode(chars, what, first_row)
    if ids.shape[1:] != (1,):
        raise ValueError(f"{what}: expected one character per row, got {ids.shape[1]}")
    return ids[:, 0]


def windows(text: str, length: int = SEQ_LENGTH) -> tuple[np.ndarray, np.ndarray]:
    """Every window of ``length`` characters of ``text`` and the character after it, as
    ids: ``x`` (N, length), ``y`` (N,) with N = len(text) - length (LEAF's
    ``txt_to_data``: windows start at every position)."""
    if len(text) <= length:
        return np.zeros((0, length), dtype=np.int64), np.zeros(0, dtype=np.int64)
    ids = encode([text], "text")[0]
    n = len(ids) - length
    x = np.lib.stride_tricks.sliding_window_view(ids, length)[:n].copy()
    return x, ids[length:].copy()
