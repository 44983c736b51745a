"""The one YAML reader of the project: experiment files, study files and ``--set`` values.

PyYAML's ``safe_load`` merges a repeated key silently (the last one wins) and
expands aliases without limit when the result is walked. This reader is
PyYAML's ``SafeLoader`` with two checks on the composed node graph, run before
any Python object is built:

- a key written twice in one mapping is an error naming the key and both lines
  (``partition: defined twice, lines 3 and 9``); keys brought in by a merge
  (``<<: *base``) may be overridden, as YAML intends;
- the document may hold at most :data:`MAX_VALUES` values counted as if every
  alias were expanded where it is used. Anchors and aliases stay usable (merge
  keys are a common way to share settings), but a "billion laughs" file of a
  few hundred bytes that expands to millions of keys is refused at once. The
  count is taken on the node graph with memoisation, so it costs one pass
  over the distinct nodes however large the expansion is.

Every problem is one line (:class:`YamlFileError`): non-UTF-8 bytes, a syntax
error with its line and column, a duplicate key, an alias that refers to
itself, or too many values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

__all__ = ["MAX_VALUES", "YamlFileError", "YamlSyntaxError", "load_yaml", "parse_yaml"]

#: values (scalars, lists, mappings) a document may hold with every alias expanded;
#: the largest shipped study file holds a few hundred
MAX_VALUES = 10_000
_MERGE_TAG = "tag:yaml.org,2002:merge"


class YamlFileError(ValueError):
    """A YAML document that cannot be used; the message is one line naming the source."""


class YamlSyntaxError(YamlFileError):
    """The text is not YAML at all (``--set`` then takes it as a plain string)."""


def _key_text(node: yaml.Node) -> str:
    text = str(node.value) if isinstance(node, yaml.ScalarNode) else node.tag
    return text if len(text) <= 60 else text[:57] + "..."


class _Walk:
    """One pass over a node graph: duplicate keys, cycles, and the expanded size."""

    def __init__(self, source: str):
        self.source = source
        self.size: dict[int, int] = {}
        self.active: set[int] = set()

    def count(self, node: yaml.Node) -> int:
        nid = id(node)
        if nid in self.size:
            return self.size[nid]
        if nid in self.active:
            raise YamlFileError(f"{self.source}: line {node.start_mark.line + 1}: an alias "
                                "refers to the collection that contains it")
        self.active.add(nid)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(self.count(child) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            self._duplicates(node)
            total += sum(self.count(k) + self.count(v) for k, v in node.value)
        self.active.discard(nid)
        self.size[nid] = total
        return total

    def _duplicates(self, node: yaml.MappingNode) -> None:
        """A key written twice in ``node`` (merged keys may be overridden)."""
        seen: dict[tuple[str, str], yaml.Node] = {}
        for key, _ in node.value:
            if key.tag == _MERGE_TAG or not isinstance(key, yaml.ScalarNode):
                continue
            other = seen.setdefault((key.tag, key.value), key)
            if other is not key:
                a, b = other.start_mark, key.start_mark
                where = (f"lines {a.line + 1} and {b.line + 1}" if a.line != b.line else
                         f"line {a.line + 1}, columns {a.column + 1} and {b.column + 1}")
                raise YamlFileError(f"{self.source}: {_key_text(key)}: defined twice, {where}")


class _Loader(yaml.SafeLoader):
    """SafeLoader that checks the composed graph before constructing anything, and
    resolves merge keys (``<<``) itself."""

    source = "YAML"

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        """Replace the merge keys of ``node`` by the pairs they bring in, before its own
        pairs (which therefore win); of several merged mappings the earlier wins, and a
        merged mapping's own merges count as its keys (YAML's merge type).

        PyYAML does this too, but 6.0.4 changed how a merged mapping's own merges
        rank (``{<<: *x, b: 4}`` with ``x: {<<: *b, a: 3}`` gave ``a: 1``), so the
        rule is written here, and the merged nodes are left as they are."""
        node.value = self._pairs(node)

    def _pairs(self, node: yaml.MappingNode) -> list[tuple[yaml.Node, yaml.Node]]:
        merged: list[tuple[yaml.Node, yaml.Node]] = []
        own: list[tuple[yaml.Node, yaml.Node]] = []
        for key, value in node.value:
            if key.tag != _MERGE_TAG:
                own.append((key, value))
                continue
            sources = value.value if isinstance(value, yaml.SequenceNode) else [value]
            for src in reversed(sources):  # later ones first: the earlier ones override
                if not isinstance(src, yaml.MappingNode):
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark,
                        f"expected a mapping or list of mappings for merging, but found "
                        f"{src.id}", src.start_mark)
                merged.extend(self._pairs(src))
        return merged + own

    def construct_document(self, node: yaml.Node) -> Any:
        size = _Walk(self.source).count(node)
        if size > MAX_VALUES:
            raise YamlFileError(
                f"{self.source}: holds {size:,} values with its aliases (*name) expanded; "
                f"allowed: at most {MAX_VALUES:,}")
        return super().construct_document(node)


def parse_yaml(text: str, source: str) -> Any:
    """Parse one YAML document from ``text``; raise YamlFileError (one line) naming
    ``source`` on a syntax error, a duplicate key, a self-referring alias or more
    than :data:`MAX_VALUES` expanded values."""
    loader = None
    try:
        loader = _Loader(text)  # the reader rejects control characters here
        loader.source = source
        return loader.get_single_data()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        what = e.problem or e.context or "parse error"
        raise YamlSyntaxError(f"{source}: not valid YAML: {what}{where}") from None
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise YamlSyntaxError(f"{source}: not valid YAML: {first}") from None
    except RecursionError:
        raise YamlFileError(f"{source}: nested too deeply") from None
    finally:
        if loader is not None:
            loader.dispose()


def load_yaml(path: str | Path, source: str | None = None) -> Any:
    """Read the YAML file ``path`` (UTF-8) and parse it with :func:`parse_yaml`.

    ``source`` names the file in messages (default: the path, quoted). Raises
    YamlFileError (one line) for an unreadable file or non-UTF-8 bytes too.
    """
    p = Path(path)
    source = source or repr(str(p))
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise YamlFileError(f"{source}: cannot be read ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise YamlFileError(f"{source}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset "
                            f"{e.start}); save it as UTF-8") from None
    return parse_yaml(text, source)
