"""TransformerConfigs from plain fields: one config or several named ones, with located errors."""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Any

from pydantic import TypeAdapter, ValidationError

from megaspec.config import TransformerConfig, field_annotation, field_names, module_fields
from megaspec.errors import Problem, SpecError, did_you_mean
from megaspec.signature import type_name
from megaspec.source import ABSENT, COMMAND_LINE, Key, SourceMap
from megaspec.spec import ModuleSpec


def config_problems(exc: ValidationError, smap: SourceMap, key: Key, tree: str,
                    data: Mapping[str, Any]) -> list[Problem]:
    """Translate a TransformerConfig ValidationError into located Problems."""
    fields = field_names()
    out = []
    for err in exc.errors():
        name = str(err["loc"][0]) if err["loc"] else ""
        where = f"{tree}.{name}" if name else tree
        if err["type"] == "missing":
            msg = f"missing required config field '{name}'"
        elif err["type"] == "extra_forbidden":
            msg = f"unknown config field '{name}'{did_you_mean(name, list(fields))}"
        elif name in fields and len(err["loc"]) == 1 and err["type"] != "value_error":
            finite = " (finite)" if err["type"] == "finite_number" else ""
            msg = f"expected {type_name(field_annotation(name))}{finite}, got {err.get('input')!r}"
        else:
            msg = str(err["msg"]).removeprefix("Value error, ")
        if name:
            out.append(smap.problem((*key, name), where, msg, data.get(name, ABSENT)))
        else:
            out.append(_rule_problem(smap, key, where, msg, data))
    return out


def _rule_problem(smap: SourceMap, key: Key, where: str, message: str, data: Mapping[str, Any]) -> Problem:
    """A broken cross-field rule, blamed on the command line when it changed a field the message names."""
    named = [f for f in field_names() if re.search(rf"\b{re.escape(f)}\b", message)]
    if any(smap.locate((*key, f), data.get(f, ABSENT))[0] == COMMAND_LINE for f in named):
        return Problem(message, where, COMMAND_LINE)
    return smap.problem(key, where, message)


@functools.cache
def _core_defaults() -> dict[str, Any]:
    return {name: TypeAdapter(f.annotation).dump_python(f.default, mode="json")
            for name, f in TransformerConfig.model_fields.items() if not f.is_required()}


def field_defaults() -> dict[str, Any]:
    """Every config field that has a default (core and module-declared), as plain data: {name: default}."""
    out = dict(_core_defaults())
    out.update({name: f.adapter.dump_python(f.default, mode="json") for name, f in module_fields().items()})
    return out


def make_config(data: Mapping[str, Any] | TransformerConfig, smap: SourceMap | None = None,
                key: Key = (), tree: str = "config") -> TransformerConfig:
    """Validate TransformerConfig fields; SpecError lists every problem with its location."""
    if isinstance(data, TransformerConfig):
        return data
    if not isinstance(data, Mapping):
        kind = "a list" if isinstance(data, (list, tuple)) else f"{type(data).__name__} {data!r}"
        raise SpecError((smap or SourceMap()).problem(key, tree, f"expected a mapping of config fields, got {kind}",
                                                      data))
    try:
        return TransformerConfig.model_validate(dict(data))
    except ValidationError as exc:
        raise SpecError(config_problems(exc, smap or SourceMap(), key, tree, data)) from None


class Configs(dict):  # dict[str, TransformerConfig]
    """Configs by name ('' when there is one), with the source map their fields were read from.

    The map locates a field that was set (file:line, or the command line) when the
    builder refuses it; a plain dict of configs is located nowhere.
    """

    def __init__(self, configs: Mapping[str, TransformerConfig] = (), smap: SourceMap | None = None,
                 key: Key = ()) -> None:
        super().__init__(configs)
        self.smap = smap or SourceMap()
        self.key = key

    def field_key(self, name: str, field: str) -> Key:
        """The source-map key of config `name`'s `field`."""
        return (*self.key, *((name,) if name else ()), field)


def is_named(data: Any) -> bool:
    """True for named configs ({language: {...}, vision: {...}}) rather than one config's fields."""
    if isinstance(data, Mapping) and data and all(isinstance(v, TransformerConfig) for v in data.values()):
        return True
    return (isinstance(data, Mapping) and bool(data)
            and all(isinstance(v, Mapping) for v in data.values())
            and not set(data) & set(field_names()))


def make_configs(data: Any, smap: SourceMap | None = None, key: Key = (), tree: str = "config") -> Configs:
    """One config (named '') or several named ones, each validated, all problems at once."""
    if isinstance(data, Configs):
        return data
    if not is_named(data):
        return Configs({"": make_config(data, smap, key, tree)}, smap, key)
    configs, problems = {}, []
    for name, fields in data.items():
        try:
            configs[str(name)] = make_config(fields, smap, (*key, name), f"{tree}.{name}")
        except SpecError as exc:
            problems += exc.problems
    if problems:
        raise SpecError(problems)
    return Configs(configs, smap, key)


def root_config(spec: ModuleSpec, configs: TransformerConfig | Configs) -> TransformerConfig:
    """The config the root node is built with."""
    if isinstance(configs, TransformerConfig):
        return configs
    if isinstance(spec.config, str) and spec.config in configs:
        return configs[spec.config]
    return next(iter(configs.values()))
