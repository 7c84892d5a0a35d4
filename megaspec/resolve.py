"""Validate a spec tree against the registry and the config, before any weight exists.

Resolution turns a ModuleSpec into a tree of Resolved nodes (class, validated
params, config in force, children), collecting every problem on the way so a
user sees all of them at once, each with file:line and tree path.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Union

from pydantic import ValidationError

from megaspec.config import TransformerConfig
from megaspec.errors import Problem, SpecError, did_you_mean
from megaspec.registry import Entry, Slot, lookup, slots_of
from megaspec.signature import check_params, type_name
from megaspec.source import Key, SourceMap
from megaspec.spec import ModuleSpec, Pattern


@dataclass
class Resolved:
    """A validated node, ready to construct."""

    spec: ModuleSpec
    entry: Entry
    config: TransformerConfig
    params: dict[str, Any]
    children: dict[str, Union[Resolved, list[Resolved], None]] = field(default_factory=dict)
    path: str = ""
    provides: tuple[str, ...] = ()  # constructor args the parent supplies (factory slot)


def config_problems(exc: ValidationError, smap: SourceMap, key: Key, tree: str, data: Mapping[str, Any]) -> list[Problem]:
    """Translate a TransformerConfig ValidationError into located Problems."""
    fields = TransformerConfig.model_fields
    out = []
    for err in exc.errors():
        name = str(err["loc"][0]) if err["loc"] else ""
        where = f"{tree}.{name}" if name else tree
        if err["type"] == "missing":
            msg = f"missing required config field '{name}'"
        elif err["type"] == "extra_forbidden":
            msg = f"unknown config field '{name}'{did_you_mean(name, list(fields))}"
        elif name in fields and len(err["loc"]) == 1 and err["type"] != "value_error":
            msg = f"expected {type_name(fields[name].annotation)}, got {err.get('input')!r}"
        else:
            msg = str(err["msg"]).removeprefix("Value error, ")
        if name:
            out.append(smap.problem((*key, name), where, msg, data.get(name, ...)))
        else:
            out.append(smap.problem(key, where, msg))
    return out


def make_config(data: Mapping[str, Any] | TransformerConfig, smap: SourceMap | None = None,
                key: Key = (), tree: str = "config") -> TransformerConfig:
    """Validate TransformerConfig fields; SpecError lists every problem with its location."""
    if isinstance(data, TransformerConfig):
        return data
    try:
        return TransformerConfig.model_validate(dict(data))
    except ValidationError as exc:
        raise SpecError(config_problems(exc, smap or SourceMap(), key, tree, data)) from None


class _Resolver:
    def __init__(self, allow_imports: tuple[str, ...]) -> None:
        self.allow_imports = allow_imports
        self.problems: list[Problem] = []

    def node(self, spec: ModuleSpec, config: TransformerConfig, path: str,
             slot: tuple[str, str, Slot] | None = None) -> Resolved | None:
        smap = spec.smap
        if spec.config:
            try:
                config = config.updated(**spec.config)
            except ValidationError as exc:
                self.problems += config_problems(exc, smap, ("config",), _join(path, "config"), spec.config)
                return None
        try:
            entry = lookup(spec.module, self.allow_imports)
        except SpecError as exc:
            self.problems.append(smap.problem(("module",), path, exc.problems[0].message, spec.module))
            return None
        provides: tuple[str, ...] = ()
        if slot is not None:
            owner, slot_name, decl = slot
            provides = decl.provides
            if entry.kind != "*" and entry.kind not in decl.kinds:
                self.problems.append(smap.problem(
                    ("module",), path,
                    f"'{entry.name}' is a {entry.kind} module, but slot '{slot_name}' of {owner} "
                    f"takes {' or '.join(decl.kinds)}", spec.module))
                return None
        params, bad = check_params(entry.cls, dict(spec.params), provides, owner=slot[0] if slot else "")
        for name, message, value in bad:
            self.problems.append(smap.problem(("params", name), _join(path, f"params.{name}"), message, value))
        resolved = Resolved(spec, entry, config, params, {}, path, provides)
        self.children(resolved)
        return resolved

    def children(self, r: Resolved) -> None:
        declared = slots_of(r.entry.cls)
        smap = r.spec.smap
        for name, value in r.spec.submodules.items():
            if name not in declared:
                listed = ", ".join(declared) or "no slots"
                self.problems.append(smap.problem(
                    ("submodules", name), _join(r.path, name),
                    f"{r.entry.name} has no slot '{name}'{did_you_mean(name, list(declared))}; slots: {listed}"))
        for name, decl in declared.items():
            value = r.spec.submodules.get(name)
            path = _join(r.path, name)
            if name not in r.spec.submodules and decl.default is not None:
                value = ModuleSpec(decl.default, smap=smap.child(("module",)))
            if value is None or value == ():
                if decl.required:
                    self.problems.append(smap.problem(
                        ("submodules", name) if name in r.spec.submodules else ("module",), path,
                        f"required slot '{name}' of {r.entry.name} is empty (needs a {' or '.join(decl.kinds)} module)"))
                r.children[name] = None
                continue
            owner = (r.entry.name, name, decl)
            if decl.many:
                r.children[name] = self.many(value, r.config, path, owner, smap.child(("submodules", name)))
            elif isinstance(value, ModuleSpec) and value.repeat is None:
                r.children[name] = self.node(value, r.config, path, owner)
            else:
                self.problems.append(smap.problem(
                    ("submodules", name), path, f"slot '{name}' of {r.entry.name} takes one module, got a list"))

    def many(self, value: Any, config: TransformerConfig, path: str,
             owner: tuple[str, str, Slot], smap: SourceMap) -> list[Resolved]:
        decl = owner[2]
        want = getattr(config, decl.count) if decl.count else None
        out: list[Resolved] = []
        if isinstance(value, ModuleSpec):
            count = value.repeat or want or 1
            r = self.node(value, config, f"{path}[*]", owner)
            out = [r] * count if r is not None else []
            got = count
        elif isinstance(value, Pattern):
            count = want or len(value.pattern)
            by_name = {n: self.node(s, config, f"{path}.nodes.{n}", owner) for n, s in value.nodes.items()}
            out = [by_name[value.pattern[i % len(value.pattern)]] for i in range(count)]
            out = [r for r in out if r is not None]
            got = count
        else:
            got = 0
            for i, node in enumerate(value):
                r = self.node(node, config, f"{path}[{i}]", owner)
                got += node.repeat or 1
                if r is not None:
                    out += [r] * (node.repeat or 1)
        if want is not None and got != want:
            self.problems.append(smap.problem(
                (), path, f"{got} modules given but {decl.count} is {want} "
                f"(write one node to repeat it, or set {decl.count})"))
        return out


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def resolve(spec: ModuleSpec, config: TransformerConfig, allow_imports: tuple[str, ...] | list[str] = ()) -> Resolved:
    """Validate the whole tree; raise SpecError listing every problem."""
    resolver = _Resolver(tuple(allow_imports))
    root = resolver.node(spec, config, "")
    if resolver.problems or root is None:
        raise SpecError(resolver.problems)
    return root
