"""YAML loading that remembers where every key came from (file and line)."""

from __future__ import annotations

import codecs
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from megaspec.errors import Problem, SpecError

Key = tuple[Any, ...]  # a path of mapping keys and list indices into the YAML data
COMMAND_LINE = "command line"
ABSENT: Any = type("Absent", (), {"__repr__": lambda self: "ABSENT"})()  # a value the data no longer has


@dataclass
class SourceMap:
    """Maps a key path in loaded data to the file and line that defined it.

    `composed` marks data that went through Hydra overrides: a path the file
    does not define, or whose value differs from the file's, came from the
    command line and is reported as such rather than blamed on a wrong line.
    """

    file: str | None = None
    lines: dict[Key, int] = field(default_factory=dict)
    values: dict[Key, Any] = field(default_factory=dict)
    composed: bool = False

    def locate(self, path: Key, value: Any = ...) -> tuple[str | None, int | None]:
        """The (file, line) to blame for the value at `path` (`ABSENT`: the data no longer holds it)."""
        if self.file is None:
            return None, None
        if path in self.lines:
            if value is ... or value is ABSENT:
                changed = value is ABSENT
            elif path in self.values:
                changed = self.values[path] != value
            else:  # the file has a list or mapping here
                changed = not isinstance(value, (dict, list, tuple, Mapping))
            if self.composed and changed:
                return COMMAND_LINE, None
            return self.file, self.lines[path]
        if self.composed:
            return COMMAND_LINE, None
        for cut in range(len(path) - 1, -1, -1):
            if path[:cut] in self.lines:
                return self.file, self.lines[path[:cut]]
        return self.file, None

    def problem(self, path: Key, tree_path: str, message: str, value: Any = ...) -> Problem:
        """A Problem located at `path`."""
        file, line = self.locate(path, value)
        return Problem(message, tree_path, file, line)

    def child(self, prefix: Key) -> SourceMap:
        """The map of the sub-tree at `prefix`, with paths relative to it."""
        n = len(prefix)
        lines = {k[n:]: v for k, v in self.lines.items() if k[:n] == prefix}
        values = {k[n:]: v for k, v in self.values.items() if k[:n] == prefix}
        return SourceMap(self.file, lines, values, self.composed)


# Limits that keep a hostile file from exhausting time or memory. A spec or manifest
# of the largest published models is far below each of them.
MAX_FILE_BYTES = 16 * 2**20  # bytes read from one YAML file
MAX_NODES = 100_000  # values in a document once every alias is expanded ("billion laughs")
MAX_DEPTH = 100  # nesting of mappings and lists, aliases expanded

_STR, _MERGE = "tag:yaml.org,2002:str", "tag:yaml.org,2002:merge"
_SCALAR_TAGS = {f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null")}
# YAML 1.1 reads `1e-5` as a string; YAML 1.2 (and OmegaConf, which reads conf/) as a float.
_EXPONENT_FLOAT = re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")
# Dates stay strings (a spec has no use for datetime objects); `=` is PyYAML's `value` tag, a string here too.
_IMPLICIT = {first: [(tag, rx) for tag, rx in resolvers if tag in _SCALAR_TAGS or tag == _MERGE]
             for first, resolvers in yaml.resolver.Resolver.yaml_implicit_resolvers.items()}
_CONSTRUCTOR = yaml.constructor.SafeConstructor()
# C0/C1 control characters other than tab and line breaks, YAML 1.1's extra line breaks (they would put
# line numbers out of step with editors), and a BOM anywhere.
_FORBIDDEN = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u2028\u2029\ufeff]")
_Events = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's parser when installed (~10x faster)


def _tag_name(tag: str) -> str:
    return tag.replace("tag:yaml.org,2002:", "!!")


def _implicit_tag(value: str) -> str:
    """The tag of a plain scalar: null, bool, int, float, merge or str (YAML 1.1 rules, dates as strings)."""
    for tag, regexp in _IMPLICIT.get(value[:1] if value else "", []):
        if regexp.match(value):
            return tag
    return "tag:yaml.org,2002:float" if _EXPONENT_FLOAT.match(value) else _STR


@dataclass
class _Anchor:
    """A composed anchored value, with its locations relative to it, to expand at each alias."""

    value: Any
    lines: list[tuple[Key, int]]
    values: list[tuple[Key, Any]]
    size: int
    height: int


class _Composer:
    """Plain data from YAML parser events, each path's line recorded, with bounded alias expansion.

    Only plain data comes out: a tag other than the core scalar, list and mapping
    tags is refused, so no constructor ever runs code. Every alias is counted at
    its expanded size before it is copied, so a "billion laughs" file stops at
    MAX_NODES, and an alias inside its own anchor is refused at the alias's line.
    """

    def __init__(self, text: str, file: str | None) -> None:
        self.events = _Events(text)
        self.file = file
        self.lines: list[tuple[Key, int]] = []  # append-only: a node's entries are one contiguous run
        self.values: list[tuple[Key, Any]] = []
        self.anchors: dict[str, _Anchor | None] = {}  # None while its node is being composed
        self.count = 0
        self.deepest = 0  # the deepest level reached so far (for an anchor: since it started)

    def fail(self, line: int | None, message: str) -> SpecError:
        return SpecError(Problem(message, "", self.file, line))

    def document(self) -> Any:
        """The one document of the stream (None when there is none)."""
        try:
            self.events.get_event()  # StreamStart
            if self.events.check_event(yaml.StreamEndEvent):
                return None
            self.events.get_event()  # DocumentStart
            root = self.node((), 0)
            self.events.get_event()  # DocumentEnd
            if not self.events.check_event(yaml.StreamEndEvent):
                line = self.events.peek_event().start_mark.line + 1
                raise self.fail(line, "a second YAML document starts here; the file must hold exactly one")
            return root
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            raise self.fail(mark.line + 1 if mark else None, f"invalid YAML: {exc.problem or exc.context}") from None
        except yaml.YAMLError as exc:
            raise self.fail(None, f"invalid YAML: {exc}") from None
        finally:
            self.events.dispose()

    def grow(self, n: int, depth: int, line: int) -> None:
        self.count += n
        if self.count > MAX_NODES:
            raise self.fail(line, f"the document expands to more than {MAX_NODES:,} values (aliases included); "
                                  "refusing to expand it")
        if depth > MAX_DEPTH:
            raise self.fail(line, f"nested more than {MAX_DEPTH} levels deep")
        self.deepest = max(self.deepest, depth)

    def node(self, path: Key, depth: int) -> Any:
        event = self.events.get_event()
        line = event.start_mark.line + 1
        if isinstance(event, yaml.AliasEvent):
            return self.alias(event.anchor, path, depth, line)
        self.grow(1, depth, line)
        anchor = event.anchor
        if anchor is not None:
            self.anchors[anchor] = None
            start, vstart, count0, deepest = len(self.lines), len(self.values), self.count, self.deepest
            self.deepest = depth
        self.lines.append((path, line))
        if isinstance(event, yaml.ScalarEvent):
            value: Any = self.scalar(event, line, path[-1:] == (_KEY,))
            self.values.append((path, value))
        elif isinstance(event, yaml.SequenceStartEvent):
            self.collection_tag(event.tag, "seq", line)
            value = []
            while not self.events.check_event(yaml.SequenceEndEvent):
                value.append(self.node((*path, len(value)), depth + 1))
            self.events.get_event()
        else:  # MappingStartEvent
            self.collection_tag(event.tag, "map", line)
            value = self.mapping(path, depth)
        if anchor is not None:
            n = len(path)
            self.anchors[anchor] = _Anchor(value, [(k[n:], v) for k, v in self.lines[start:]],
                                           [(k[n:], v) for k, v in self.values[vstart:]], self.count - count0,
                                           self.deepest - depth)
            self.deepest = max(deepest, self.deepest)
        return value

    def alias(self, name: str, path: Key, depth: int, line: int) -> Any:
        if name not in self.anchors:
            raise self.fail(line, f"alias '*{name}' refers to no anchor '&{name}' defined before it")
        anchor = self.anchors[name]
        if anchor is None:
            raise self.fail(line, f"recursive alias '*{name}': it is inside the node its anchor '&{name}' names")
        self.grow(anchor.size, depth + anchor.height, line)
        self.lines.append((path, line))
        self.lines += [((*path, *k), v) for k, v in anchor.lines if k]
        self.values += [((*path, *k), v) for k, v in anchor.values]
        return _copy(anchor.value)

    def collection_tag(self, tag: str | None, kind: str, line: int) -> None:
        if tag not in (None, "!", f"tag:yaml.org,2002:{kind}"):
            raise self.fail(line, f"YAML tag '{_tag_name(tag)}' is not allowed: only plain data "
                                  "(strings, numbers, booleans, null, lists and mappings)")

    def scalar(self, event: yaml.ScalarEvent, line: int, as_key: bool) -> Any:
        tag = event.tag
        if tag is None:
            tag = _implicit_tag(event.value) if event.implicit[0] else _STR
        elif tag == "!":
            tag = _STR
        elif tag not in _SCALAR_TAGS:
            raise self.fail(line, f"YAML tag '{_tag_name(tag)}' is not allowed: only plain data "
                                  "(strings, numbers, booleans, null, lists and mappings)")
        if tag == _MERGE:  # `<<` merges only as a key; as a value it is the string
            return _MERGE_KEY if as_key else event.value
        node = yaml.ScalarNode(tag, event.value, event.start_mark, event.end_mark, event.style)
        try:
            return _CONSTRUCTOR.yaml_constructors[tag](_CONSTRUCTOR, node)
        except (yaml.YAMLError, ValueError, TypeError):
            raise self.fail(line, f"{event.value!r} is not a valid {_tag_name(tag)}") from None

    def mapping(self, path: Key, depth: int) -> dict[Any, Any]:
        explicit: dict[Any, Any] = {}
        merged: list[tuple[dict[Any, Any], list[tuple[Key, int]], list[tuple[Key, Any]]]] = []
        while not self.events.check_event(yaml.MappingEndEvent):
            event = self.events.peek_event()
            line = event.start_mark.line + 1
            if not isinstance(event, (yaml.ScalarEvent, yaml.AliasEvent)):
                raise self.fail(line, "a mapping key must be a plain value, not a list or mapping")
            mark = len(self.lines), len(self.values)
            key = self.node((*path, _KEY), depth + 1)
            del self.lines[mark[0]:], self.values[mark[1]:]  # a key's own location is recorded below
            if isinstance(key, (dict, list)):
                raise self.fail(line, "a mapping key must be a plain value, not a list or mapping")
            if key is _MERGE_KEY:
                merged += self.merge(path, depth, line)
                continue
            if key in explicit:
                raise self.fail(line, f"duplicate key '{key}'")
            explicit[key] = self.node((*path, key), depth + 1)
            self.lines.append(((*path, key), line))  # errors about a value point at its key's line
        self.events.get_event()
        out: dict[Any, Any] = {}
        for source, lines, values in merged:  # earlier sources win, and explicit keys win over all
            for key, value in source.items():
                if key in explicit or key in out:
                    continue
                out[key] = value
                self.lines += [((*path, *k), v) for k, v in lines if k[:1] == (key,)]
                self.values += [((*path, *k), v) for k, v in values if k[:1] == (key,)]
        out.update(explicit)
        return out

    def merge(self, path: Key, depth: int, line: int) -> list[tuple[dict[Any, Any], list[Any], list[Any]]]:
        """The mappings a merge key (`<<: *a` or `<<: [*a, *b]`) brings in, with locations relative to them."""
        start, vstart = len(self.lines), len(self.values)
        value = self.node((*path, _MERGE_KEY), depth + 1)
        n = len(path) + 1
        lines, values = [(k[n:], v) for k, v in self.lines[start:]], [(k[n:], v) for k, v in self.values[vstart:]]
        del self.lines[start:], self.values[vstart:]
        if isinstance(value, dict):
            return [(value, lines, values)]
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            return [(v, [(k[1:], ln) for k, ln in lines if k[:1] == (i,)],
                     [(k[1:], x) for k, x in values if k[:1] == (i,)]) for i, v in enumerate(value)]
        raise self.fail(line, "a merge key '<<' takes a mapping or a list of mappings (e.g. '<<: *defaults')")


class _Marker:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


_MERGE_KEY = _Marker("<<")  # a merge key, told apart from the string '<<' (quoted)
_KEY = _Marker("<key>")  # where a key is composed, before it is known


def _copy(value: Any) -> Any:
    """A deep copy of plain data, so that no two paths share a mutable value."""
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def check_text(text: str, file: str | None = None) -> None:
    """Refuse a BOM, control characters and YAML 1.1's extra line breaks, naming the line."""
    found = _FORBIDDEN.search(text)
    if found is None:
        return
    line = text.count("\n", 0, found.start()) + 1
    char = found.group()
    what = "a byte order mark (BOM)" if char == "\ufeff" else f"control character U+{ord(char):04X}"
    raise SpecError(Problem(f"{what} at column {found.start() - text.rfind(chr(10), 0, found.start())}; "
                            "a YAML file here holds printable text only", "", file, line))


def parse_yaml(text: str, file: str | None = None) -> tuple[Any, SourceMap]:
    """Parse YAML text into plain data plus its SourceMap; SpecError (file:line) for anything else."""
    check_text(text, file)
    composer = _Composer(text, file)
    data = composer.document()
    smap = SourceMap(file)
    smap.lines = dict(composer.lines)
    smap.values = dict(composer.values)
    return data, smap


def read_limited(path: str | Path, name: str, limit: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of a regular file of at most `limit` bytes; SpecError naming it otherwise."""
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused below.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise SpecError(Problem(f"cannot read file: {exc.strerror or exc}", "", name)) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise SpecError(Problem("cannot read file: not a regular file", "", name))
    with os.fdopen(fd, "rb") as f:
        try:
            data = f.read(limit + 1)
        except OSError as exc:
            raise SpecError(Problem(f"cannot read file: {exc.strerror or exc}", "", name)) from None
    if len(data) > limit:
        raise SpecError(Problem(f"file is larger than {limit:,} bytes; refusing to read it", "", name))
    return data


def decode_utf8(data: bytes, file: str | None) -> str:
    """UTF-8 text without a BOM; SpecError naming the line of the first bad byte."""
    if data.startswith(codecs.BOM_UTF8):
        raise SpecError(Problem("starts with a byte order mark (BOM); save the file as UTF-8 without one",
                                "", file, 1))
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise SpecError(Problem(f"not UTF-8 text: byte 0x{data[exc.start]:02x} cannot be decoded", "",
                                file, line)) from None


def load_yaml(path: str | Path, display: str | None = None) -> tuple[Any, SourceMap]:
    """Load a YAML file; errors name it as `display` (default: the path given)."""
    name = display or str(path)
    return parse_yaml(decode_utf8(read_limited(path, name), name), name)


def load_mapping(path: str | Path, what: str, display: str | None = None) -> tuple[dict[Any, Any], SourceMap]:
    """Load a YAML file whose root must be a mapping (`what` names the file's role in errors)."""
    data, smap = load_yaml(path, display)
    if data is None:
        raise SpecError(Problem(f"the file is empty; {what} is a YAML mapping", "", smap.file, 1))
    if not isinstance(data, dict):
        kind = "a list" if isinstance(data, list) else f"{type(data).__name__} {data!r}"
        raise SpecError(Problem(f"{what} is a YAML mapping, but the file holds {kind}", "", smap.file,
                                smap.lines.get((), 1)))
    return data, smap
