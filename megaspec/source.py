"""YAML loading that remembers where every key came from (file and line)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from megaspec.errors import Problem, SpecError

Key = tuple[Any, ...]  # a path of mapping keys and list indices into the YAML data
COMMAND_LINE = "command line"


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
        """The (file, line) to blame for the value at `path`."""
        if self.file is None:
            return None, None
        if path in self.lines:
            changed = value is not ... and path in self.values and self.values[path] != value
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


class _LineLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """SafeLoader (libyaml's when installed, ~10x faster): plain data only, so a spec file can never run code."""


def _walk(loader: _LineLoader, node: yaml.Node, path: Key, smap: SourceMap) -> Any:
    smap.lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            if key in out:
                raise SpecError(Problem(f"duplicate key '{key}'", "", smap.file, key_node.start_mark.line + 1))
            out[key] = _walk(loader, value_node, (*path, key), smap)
            smap.lines[(*path, key)] = key_node.start_mark.line + 1
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_walk(loader, item, (*path, i), smap) for i, item in enumerate(node.value)]
    value = loader.construct_object(node, deep=True)
    smap.values[path] = value
    return value


def parse_yaml(text: str, file: str | None = None) -> tuple[Any, SourceMap]:
    """Parse YAML text into plain data plus its SourceMap."""
    smap = SourceMap(file)
    loader = _LineLoader(text)
    try:
        root = loader.get_single_node()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        reason = getattr(exc, "problem", None) or str(exc)
        raise SpecError(Problem(f"invalid YAML: {reason}", "", file, line)) from None
    finally:
        loader.dispose()
    if root is None:
        return None, smap
    return _walk(loader, root, (), smap), smap


def load_yaml(path: str | Path, display: str | None = None) -> tuple[Any, SourceMap]:
    """Load a YAML file; errors name it as `display` (default: the path given)."""
    path = Path(path)
    name = display or str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError(Problem(f"cannot read file: {exc.strerror or exc}", "", name)) from None
    return parse_yaml(text, name)
