"""What built a model, as one record: spec, configs, allow-list, each module's registered name, layout.

The builder attaches a BuildRecord to every model it builds; checkpoints, HF
export, summaries and parallel plans read it through `build_record(model)`, the
one accessor. It is plain data, so a model deep-copies and pickles with it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, NamedTuple

from torch import nn

from megaspec.config import TransformerConfig
from megaspec.configs import Configs, make_configs
from megaspec.errors import SpecError
from megaspec.spec import ModuleSpec

_ATTRIBUTE = "_megaspec_record"


class Registered(NamedTuple):
    """The registry entry a module was built from."""

    name: str
    kind: str


@dataclass(frozen=True)
class BuildRecord:
    """spec + configs (+ the caller's allow-list) -> the model; `modules` maps module paths ('' = root) to entries."""

    spec: ModuleSpec
    configs: Mapping[str, TransformerConfig]
    allow_imports: tuple[str, ...] = ()
    modules: Mapping[str, Registered] = field(default_factory=dict)
    parallel: Mapping[str, Any] | None = None  # the ParallelConfig fields, once a layout was applied

    def __post_init__(self) -> None:
        object.__setattr__(self, "configs", MappingProxyType(dict(self.configs)))
        object.__setattr__(self, "modules", MappingProxyType(dict(self.modules)))

    def __reduce__(self) -> tuple[Any, ...]:
        # Mapping proxies do not pickle: rebuild from plain dicts.
        return (BuildRecord, (self.spec, dict(self.configs), self.allow_imports, dict(self.modules),
                              None if self.parallel is None else dict(self.parallel)))

    def __deepcopy__(self, memo: dict[int, Any]) -> BuildRecord:
        return self  # immutable: a copied model can share it

    @property
    def config(self) -> TransformerConfig:
        """The config the root module was built with."""
        named = self.spec.config if isinstance(self.spec.config, str) else None
        return self.configs[named] if named in self.configs else next(iter(self.configs.values()))

    def with_parallel(self, layout: Mapping[str, Any]) -> BuildRecord:
        """This record, with the parallel layout that was applied to the model."""
        return replace(self, parallel=dict(layout))


def attach_record(model: nn.Module, record: BuildRecord) -> nn.Module:
    """Record on `model` what built it (replacing an earlier record)."""
    object.__setattr__(model, _ATTRIBUTE, record)
    return model


def build_record(model: nn.Module) -> BuildRecord:
    """What built `model`; SpecError for a module megaspec did not build."""
    record = getattr(model, _ATTRIBUTE, None)
    if record is None:
        raise SpecError(f"{type(model).__name__} was not built by megaspec, so it records no spec and config "
                        "(build it with megaspec.build_model or megaspec.build_module)")
    return record


def has_record(model: nn.Module) -> bool:
    """True for a model megaspec built (or loaded, or converted)."""
    return getattr(model, _ATTRIBUTE, None) is not None


def described(model: nn.Module, spec: ModuleSpec | None = None,
              config: Any = None) -> tuple[ModuleSpec, Configs, tuple[str, ...]]:
    """(spec, configs, allow_imports): given explicitly, else from the model's record."""
    if spec is not None and config is not None:
        return spec, make_configs(config), build_record(model).allow_imports if has_record(model) else ()
    if not has_record(model):
        raise SpecError(f"{type(model).__name__} does not record the spec and config it was built from "
                        "(build it with megaspec.build_module, or pass spec= and config=)")
    record = build_record(model)
    return (record.spec if spec is None else spec, make_configs(record.configs if config is None else config),
            record.allow_imports)


def registered_modules(model: nn.Module) -> dict[nn.Module, Registered]:
    """Each module of a megaspec-built model -> its registry entry, by object (stable under wrapping)."""
    modules = build_record(model).modules
    return {m: modules[path] for path, m in model.named_modules() if path in modules}


def modules_of_kind(model: nn.Module, kind: str) -> list[nn.Module]:
    """The modules of `model` registered as `kind`, in module order."""
    return [m for m, entry in registered_modules(model).items() if entry.kind == kind]
