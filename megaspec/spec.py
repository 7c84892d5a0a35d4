"""ModuleSpec: the immutable spec tree, parsed from plain data with locations.

The YAML format has exactly three node fields, `module`, `params` and
`submodules` (plus optional `config` overrides for the subtree and `repeat`
inside list slots), so a spec is walkable with plain dict code. A bare string
is a node with no params. A list slot takes a single node (repeated by the
parent's count), a list of nodes, or a pattern of named nodes.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Union

from megaspec.errors import Problem, SpecError, did_you_mean
from megaspec.source import Key, SourceMap, load_mapping

NODE_KEYS = ("module", "params", "submodules", "config", "repeat")
# Modules in one list slot, `repeat` included: ten times the deepest published transformer,
# and a bound checked before any list is made, so a typo of 10**9 cannot exhaust memory.
MAX_LIST = 1024
EMPTY: Mapping[str, Any] = MappingProxyType({})


def _freeze(value: Any) -> Any:
    """Deep-freeze plain data so specs cannot be mutated at build time."""
    if isinstance(value, Mapping):
        return MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    """Inverse of _freeze: plain dicts and lists again."""
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


@dataclass(frozen=True)
class ModuleSpec:
    """One node: which registered module, its params, and its children by slot."""

    module: str
    params: Mapping[str, Any] = field(default_factory=lambda: EMPTY)
    submodules: Mapping[str, SlotValue] = field(default_factory=lambda: EMPTY)
    config: Mapping[str, Any] | str = field(default_factory=lambda: EMPTY)  # overrides, or a config name
    repeat: int | None = None
    smap: SourceMap = field(default_factory=SourceMap, compare=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("params", "submodules", "config"):
            value = getattr(self, name)
            if not isinstance(value, (MappingProxyType, str)):
                # Children are ModuleSpecs already (immutable); only the mapping itself is frozen.
                frozen = MappingProxyType(dict(value)) if name == "submodules" else _freeze(value)
                object.__setattr__(self, name, frozen)

    def __reduce__(self) -> tuple[Any, ...]:
        # Read-only mappings do not pickle: rebuild from plain data, which __post_init__ freezes again.
        config = self.config if isinstance(self.config, str) else _thaw(self.config)
        return (ModuleSpec, (self.module, _thaw(self.params), dict(self.submodules), config, self.repeat, self.smap))

    def __deepcopy__(self, memo: dict[int, Any]) -> ModuleSpec:
        return self  # immutable: a copy would be equal in every way

    @property
    def file(self) -> str | None:
        """File this node was read from."""
        return self.smap.file

    @property
    def line(self) -> int | None:
        """Line of this node in its file."""
        return self.smap.locate(())[1]

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (round-trips through parse_spec)."""
        out: dict[str, Any] = {"module": self.module}
        if self.params:
            out["params"] = _thaw(self.params)
        if self.submodules:
            out["submodules"] = {k: _slot_to_data(v) for k, v in self.submodules.items()}
        if self.config:
            out["config"] = self.config if isinstance(self.config, str) else _thaw(self.config)
        if self.repeat is not None:
            out["repeat"] = self.repeat
        return out


@dataclass(frozen=True)
class Pattern:
    """A list slot written as a pattern of named nodes, cycled to the count.

    `pattern` is either the node names in order, or the name of a config field
    holding one node name per layer (e.g. `moe_layer_pattern`), so the layout
    can follow a size setting without the builder knowing what it means.
    """

    pattern: tuple[str, ...] | str
    nodes: Mapping[str, ModuleSpec]
    smap: SourceMap = field(default_factory=SourceMap, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.nodes, MappingProxyType):
            object.__setattr__(self, "nodes", MappingProxyType(dict(self.nodes)))

    def __reduce__(self) -> tuple[Any, ...]:
        return (Pattern, (self.pattern, dict(self.nodes), self.smap))

    def __deepcopy__(self, memo: dict[int, Any]) -> Pattern:
        return self


SlotValue = Union[ModuleSpec, tuple[ModuleSpec, ...], Pattern, None]


def _slot_to_data(value: SlotValue) -> Any:
    if value is None:
        return None
    if isinstance(value, ModuleSpec):
        return value.to_dict()
    if isinstance(value, Pattern):
        names = value.pattern if isinstance(value.pattern, str) else list(value.pattern)
        return {"pattern": names, "nodes": {k: n.to_dict() for k, n in value.nodes.items()}}
    return [n.to_dict() for n in value]


# ---------------------------------------------------------------- parsing


class _Parser:
    """Turns plain data into ModuleSpecs, collecting every format problem."""

    def __init__(self, smap: SourceMap) -> None:
        self.smap = smap
        self.problems: list[Problem] = []

    def fail(self, key: Key, tree: str, message: str, value: Any = ...) -> None:
        self.problems.append(self.smap.problem(key, tree, message, value))

    def node(self, data: Any, key: Key, tree: str, in_list: bool = False) -> ModuleSpec | None:
        if isinstance(data, str):
            return ModuleSpec(module=data, smap=self.smap.child(key))
        if not isinstance(data, Mapping):
            self.fail(key, tree, f"expected a module name or a mapping with 'module', got {_kind(data)}", data)
            return None
        for extra in [k for k in data if k not in NODE_KEYS]:
            self.fail((*key, extra), tree, f"unknown node field '{extra}'{did_you_mean(str(extra), NODE_KEYS)}; "
                      f"a node has {', '.join(NODE_KEYS)}")
        module = data.get("module")
        if not isinstance(module, str) or not module:
            self.fail((*key, "module") if "module" in data else key, tree,
                      f"'module' must be a registered name, got {_kind(module)}" if "module" in data
                      else "node has no 'module'", module if "module" in data else ...)
            return None
        params = self.mapping(data.get("params"), (*key, "params"), f"{tree}.params" if tree else "params")
        config: Any = data.get("config")
        if not isinstance(config, str):  # a string selects a named config; a mapping overrides fields
            config = self.mapping(config, (*key, "config"), f"{tree}.config" if tree else "config")
        repeat = data.get("repeat")
        if repeat is not None:
            if not in_list:
                self.fail((*key, "repeat"), tree, "'repeat' is only allowed on a node in a list slot")
            elif isinstance(repeat, bool) or not isinstance(repeat, int) or not 1 <= repeat <= MAX_LIST:
                self.fail((*key, "repeat"), tree, f"'repeat' must be an int from 1 to {MAX_LIST}, got {repeat!r}",
                          repeat)
                repeat = None
        subs_data = data.get("submodules")
        subs: dict[str, SlotValue] = {}
        if subs_data is not None:
            if not isinstance(subs_data, Mapping):
                self.fail((*key, "submodules"), tree,
                          f"'submodules' must be a mapping of slot names, got {_kind(subs_data)}")
            else:
                for slot, value in subs_data.items():
                    sub_tree = f"{tree}.{slot}" if tree else str(slot)
                    subs[str(slot)] = self.slot(value, (*key, "submodules", slot), sub_tree)
        repeat = repeat if isinstance(repeat, int) else None
        return ModuleSpec(module, params, subs, config, repeat, self.smap.child(key))

    def mapping(self, data: Any, key: Key, tree: str) -> dict[str, Any]:
        if data is None:
            return {}
        if not isinstance(data, Mapping):
            self.fail(key, tree, f"expected a mapping, got {_kind(data)}")
            return {}
        return {str(k): v for k, v in data.items()}

    def slot(self, value: Any, key: Key, tree: str) -> SlotValue:
        if value is None:
            return None
        if isinstance(value, list):
            items = [self.node(v, (*key, i), f"{tree}[{i}]", in_list=True) for i, v in enumerate(value)]
            return tuple(n for n in items if n is not None)
        if isinstance(value, Mapping) and "pattern" in value:
            return self.pattern(value, key, tree)
        return self.node(value, key, tree, in_list=True)

    def pattern(self, value: Mapping[str, Any], key: Key, tree: str) -> Pattern | None:
        extra = [k for k in value if k not in ("pattern", "nodes")]
        if extra:
            self.fail((*key, extra[0]), tree,
                      f"unknown pattern field '{extra[0]}'; a pattern has 'pattern' and 'nodes'")
        names, nodes_data = value.get("pattern"), value.get("nodes")
        from_config = isinstance(names, str) and bool(names)
        if not from_config and (not isinstance(names, list) or not names
                                or not all(isinstance(n, (str, int)) for n in names)):
            self.fail((*key, "pattern"), tree,
                      f"'pattern' must be a non-empty list of node names or a config field name, got {names!r}")
            return None
        if not isinstance(nodes_data, Mapping) or not nodes_data:
            self.fail((*key, "nodes"), tree, "'nodes' must map each pattern name to a node")
            return None
        nodes = {}
        names = names if from_config else [str(n) for n in names]
        for name, data in nodes_data.items():
            node = self.node(data, (*key, "nodes", name), f"{tree}.nodes.{name}")
            if node is not None:
                nodes[str(name)] = node  # YAML may key nodes by 0/1: compare as strings
        for i, name in enumerate([] if from_config else names):
            if name not in nodes:
                self.fail((*key, "pattern", i), tree, f"pattern names '{name}', which is not in nodes"
                          f"{did_you_mean(name, list(nodes))}; nodes are {', '.join(nodes)}")
        return Pattern(names if from_config else tuple(names), MappingProxyType(nodes), self.smap.child(key))


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, Mapping):
        return "a mapping"
    return f"{type(value).__name__} {value!r}"


def parse_spec(data: Any, smap: SourceMap | None = None) -> ModuleSpec:
    """Parse plain data (a dict or a module name) into a ModuleSpec; SpecError lists every problem."""
    parser = _Parser(smap or SourceMap())
    node = parser.node(data, (), "")
    if parser.problems or node is None:
        raise SpecError(parser.problems or [Problem("empty spec", "", parser.smap.file)])
    return node


def load_spec(path: str | Path, display: str | None = None) -> ModuleSpec:
    """Load a spec YAML file into an immutable ModuleSpec with file:line info."""
    data, smap = load_mapping(path, "a spec (a node: module, params, submodules)", display)
    return parse_spec(data, smap)


# ---------------------------------------------------------------- walking


def iter_slots(spec: ModuleSpec) -> Iterator[tuple[str, ModuleSpec]]:
    """Yield (slot path, child) for every direct child, lists and patterns included."""
    for slot, value in spec.submodules.items():
        if isinstance(value, ModuleSpec):
            yield slot, value
        elif isinstance(value, Pattern):
            for name, node in value.nodes.items():
                yield f"{slot}.nodes.{name}", node
        elif value is not None:
            for i, node in enumerate(value):
                yield f"{slot}[{i}]", node


def walk(spec: ModuleSpec, prefix: str = "") -> Iterator[tuple[str, ModuleSpec]]:
    """Depth-first (path, node) over the whole tree, root first with path ''."""
    yield prefix, spec
    for slot, child in iter_slots(spec):
        yield from walk(child, f"{prefix}.{slot}" if prefix else slot)
