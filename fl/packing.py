"""Several clients' message contents in one Flower RecordDict (cohort mode).

In cohort mode (``simulation.cohort_size``) a worker SuperNode trains many
clients, and the server sends it one message per round instead of one per
client (server/cohorts.py packs; clients/app.py unpacks, answers for each client
and packs the answers). A packed RecordDict holds

- every distinct record of the clients' contents once, as ``cohort-r0``,
  ``cohort-r1``, ... (records are told apart by object identity: Flower's FedAvg
  family and Bonsai's SparseStrategy give many clients the same RecordDict, so the
  global model a worker's clients share travels once), and
- a ``cohort-layout`` ConfigRecord: JSON ``[{"id": client, "records": {name:
  index}} | {"id": client, "error": reason}, ...]`` in message order.

Unpacking gives back, per client, a RecordDict with the client's own record
names (records shared before packing are shared again after unpacking) or the
reason the client failed.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from flwr.app import ConfigRecord, RecordDict

from fl import contract

__all__ = ["Entry", "PackError", "is_packed", "pack", "unpack"]

#: a client's content, or the reason it has none (a failed client in a packed reply)
Entry = tuple[int, RecordDict | str]
_LAYOUT_KEY = "layout"


class PackError(ValueError):
    """A packed RecordDict whose layout does not match its records."""


def is_packed(content: RecordDict) -> bool:
    """Whether ``content`` is a packed message (:func:`pack`)."""
    return contract.COHORT_LAYOUT in content


def pack(entries: Sequence[Entry]) -> RecordDict:
    """One RecordDict holding every client's content (each distinct record once)."""
    out = RecordDict()
    index: dict[int, int] = {}  # id(record) -> its place in the packed RecordDict
    layout: list[dict[str, Any]] = []
    for client, content in entries:
        if isinstance(content, str):
            layout.append({"id": int(client), "error": content})
            continue
        names = {}
        for name, record in content.items():
            key = id(record)
            if key not in index:
                index[key] = len(index)
                out[f"{contract.COHORT_RECORD_PREFIX}{index[key]}"] = record
            names[name] = index[key]
        layout.append({"id": int(client), "records": names})
    out[contract.COHORT_LAYOUT] = ConfigRecord({_LAYOUT_KEY: json.dumps(layout)})
    return out


def unpack(content: RecordDict) -> list[Entry]:
    """The clients' contents (or failure reasons) of a packed RecordDict, in order.

    Raises PackError when the layout is missing, malformed or names a record
    that is not there.
    """
    if contract.COHORT_LAYOUT not in content:
        raise PackError(f"not a packed message (no {contract.COHORT_LAYOUT!r} record)")
    try:
        layout = json.loads(str(content[contract.COHORT_LAYOUT][_LAYOUT_KEY]))
    except (KeyError, TypeError, ValueError) as e:
        raise PackError(f"unreadable {contract.COHORT_LAYOUT!r} record: {e}") from None
    if not isinstance(layout, list):
        raise PackError(f"{contract.COHORT_LAYOUT!r}: expected a list of clients")
    out: list[Entry] = []
    for item in layout:
        if not isinstance(item, dict) or not isinstance(item.get("id"), int):
            raise PackError(f"{contract.COHORT_LAYOUT!r}: bad entry {str(item)[:80]}")
        if "error" in item:
            out.append((item["id"], str(item["error"])))
            continue
        records = item.get("records")
        if not isinstance(records, dict):
            raise PackError(f"{contract.COHORT_LAYOUT!r}: client {item['id']} has no records")
        client = RecordDict()
        for name, idx in records.items():
            key = f"{contract.COHORT_RECORD_PREFIX}{idx}"
            if key not in content:
                raise PackError(f"client {item['id']}: record {name!r} ({key}) is missing")
            client[name] = content[key]
        out.append((item["id"], client))
    return out
