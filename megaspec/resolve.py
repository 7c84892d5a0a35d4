"""Validate a spec tree against the registry and the config, before any weight exists.

Resolution turns a ModuleSpec into a tree of Resolved nodes (class, validated
params, config in force, children), collecting every problem on the way so a
user sees all of them at once, each with file:line and tree path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union

from pydantic import ValidationError

from megaspec.config import Setting, TransformerConfig, current_reads, field_names
from megaspec.configs import Configs, config_problems, root_config
from megaspec.errors import Problem, SpecError, did_you_mean
from megaspec.registry import Entry, Slot, lookup, slots_of
from megaspec.signature import check_params
from megaspec.source import SourceMap
from megaspec.spec import MAX_LIST, ModuleSpec, Pattern


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


class _Resolver:
    def __init__(self, allow_imports: tuple[str, ...], configs: Configs, sizes: bool = True) -> None:
        self.allow_imports = allow_imports
        self.configs = configs
        self.sizes = sizes  # False: no real config; check names, kinds, slots and params only
        self.problems: list[Problem] = []
        self.built = True  # False inside a pattern node no layer uses: checked, but it builds nothing

    def node(self, spec: ModuleSpec, config: TransformerConfig, path: str,
             slot: tuple[str, str, Slot] | None = None) -> Resolved | None:
        smap = spec.smap
        if isinstance(spec.config, str) and not self.sizes:
            pass  # which named configs exist is not known without sizes
        elif isinstance(spec.config, str):  # switch to a named config for this subtree
            if spec.config not in self.configs:
                names = [n for n in self.configs if n]
                self.problems.append(smap.problem(
                    ("config",), _join(path, "config"),
                    f"no config named '{spec.config}'{did_you_mean(spec.config, names)}; "
                    f"configs: {', '.join(names) or 'one unnamed config'}", spec.config))
                return None
            config = self.configs[spec.config]
        elif spec.config:
            try:
                config = config.updated(**spec.config)
            except ValidationError as exc:
                if self.sizes:
                    self.problems += config_problems(exc, smap, ("config",), _join(path, "config"), spec.config)
                    return None
                # Without sizes only the fields themselves can be wrong (unknown names, wrong types),
                # not the rules between them, which the placeholder sizes would break.
                self.problems += [p for e, p in zip(exc.errors(), config_problems(
                    exc, smap, ("config",), _join(path, "config"), spec.config)) if e["type"] != "value_error"]
            reads = current_reads()
            if reads is not None and self.built:  # each field set here must be read somewhere in this subtree
                reads.watch(config, {f: Setting(f, _join(path, f"config.{f}"), *smap.locate(("config", f), v),
                                                scope=path, node=True) for f, v in spec.config.items()})
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
                    f"'{entry.name}' is of kind {entry.kind}, but slot '{slot_name}' of {owner} "
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
                        f"required slot '{name}' of {r.entry.name} is empty "
                        f"(needs a module of kind {' or '.join(decl.kinds)})"))
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
        want = getattr(config, decl.count) if decl.count and self.sizes else None
        # Sizes are checked before any list is made: a count of 10**9 is an error, not an allocation.
        too_many = isinstance(want, int) and want > MAX_LIST
        if too_many:
            self.problems.append(smap.problem(
                (), path, f"{decl.count} is {want:,}, but a list slot holds at most {MAX_LIST} modules"))
            want = None
        runs: list[tuple[Resolved | None, int]]  # (node, times in a row)
        if isinstance(value, ModuleSpec):
            runs = [(self.node(value, config, f"{path}[*]", owner), value.repeat or want or 1)]
            got = runs[0][1]
        elif isinstance(value, Pattern):
            names = [] if too_many else self.pattern_names(value, config, path)
            got = want or len(names)
            picked = [names[i % len(names)] for i in range(got)] if names else []
            by_name = {n: self.unused(s, config, f"{path}.nodes.{n}", owner) if picked and n not in picked
                       else self.node(s, config, f"{path}.nodes.{n}", owner) for n, s in value.nodes.items()}
            runs = [(by_name.get(n), 1) for n in picked]
        else:
            runs = [(self.node(node, config, f"{path}[{i}]", owner), node.repeat or 1) for i, node in enumerate(value)]
            got = sum(n for _, n in runs)
        if want is not None and got != want:
            self.problems.append(smap.problem(
                (), path, f"{got} modules given but {decl.count} is {want} "
                f"(write one node to repeat it, or set {decl.count})"))
        elif got > MAX_LIST:
            self.problems.append(smap.problem((), path, f"{got:,} modules in one list slot; at most {MAX_LIST} "
                                                        "are allowed"))
        if too_many or got > MAX_LIST or (want is not None and got != want):
            return []
        return [r for r, n in runs if r is not None for _ in range(n)]

    def unused(self, spec: ModuleSpec, config: TransformerConfig, path: str,
               slot: tuple[str, str, Slot]) -> Resolved | None:
        """A pattern node no layer picks (Gemma-3's global layer in a model of under six layers): checked like
        any node, but it builds nothing, so the fields its subtree's `config:` sets are no settings of this model."""
        outer, self.built = self.built, False
        try:
            return self.node(spec, config, path, slot)
        finally:
            self.built = outer

    def pattern_names(self, value: Pattern, config: TransformerConfig, path: str) -> list[str]:
        """The per-layer node names: written out, or read from a config field."""
        if not isinstance(value.pattern, str):
            return list(value.pattern)
        field_name = value.pattern
        if not self.sizes:  # the list comes with the sizes; only the field's name can be checked
            if not hasattr(config, field_name):
                fields = [f for f in dir(config) if "pattern" in f or f in field_names()]
                self.problems.append(value.smap.problem(
                    ("pattern",), f"{path}.pattern",
                    f"no config field '{field_name}'{did_you_mean(field_name, fields)}"))
            return []
        found = getattr(config, field_name, None)
        if not isinstance(found, (list, tuple)) or not found:
            fields = [f for f in dir(config) if "pattern" in f or f in field_names()]
            hint = "" if hasattr(config, field_name) else did_you_mean(field_name, fields)
            self.problems.append(value.smap.problem(
                ("pattern",), f"{path}.pattern",
                f"config field '{field_name}' does not hold a per-layer list{hint}"))
            return []
        names = [str(int(v)) if isinstance(v, bool) else str(v) for v in found]
        unknown = sorted(set(names) - set(value.nodes))
        if unknown:
            self.problems.append(value.smap.problem(
                ("pattern",), f"{path}.pattern",
                f"config field '{field_name}' selects node(s) {', '.join(unknown)}, which are not in nodes; "
                f"nodes are {', '.join(value.nodes)}"))
            return []
        return names


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def resolve(spec: ModuleSpec, config: TransformerConfig | Configs,
            allow_imports: tuple[str, ...] | list[str] = ()) -> Resolved:
    """Validate the whole tree; raise SpecError listing every problem.

    With named configs, a node selects one by name (`config: vision`); the root
    uses the first unless it names another.
    """
    configs = config if isinstance(config, dict) else {"": config}
    resolver = _Resolver(tuple(allow_imports), configs)
    root = resolver.node(spec, root_config(spec, configs), "")
    if resolver.problems or root is None:
        raise SpecError(resolver.problems)
    return root


# Stands in for sizes when a spec is checked without any (only its names, kinds and params).
_PLACEHOLDER = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1)


def check_without_sizes(spec: ModuleSpec, allow_imports: tuple[str, ...] | list[str] = ()) -> list[Problem]:
    """Every problem of a spec that needs no sizes: unknown names, wrong kinds, unknown slots, bad params."""
    resolver = _Resolver(tuple(allow_imports), {"": _PLACEHOLDER}, sizes=False)
    resolver.node(spec, _PLACEHOLDER, "")
    return resolver.problems
