"""The entry points that take "a composed config, a spec file, a model name or a checkpoint".

This module sits above composition, checkpoints and the builder, and is the only
place that dispatches between them; `build.py` never reaches up into Hydra or
checkpoint loading.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from megaspec.build import build_module
from megaspec.checkpoint import checkpoint_inputs
from megaspec.compose import cfg_inputs, compose, given_config, models_using_spec
from megaspec.configs import Configs, is_named, make_configs
from megaspec.errors import Problem, SpecError
from megaspec.paths import conf_dir, specs_dir
from megaspec.spec import ModuleSpec, load_spec


class NoSizes(SpecError):
    """A spec file with no sizes: no root `config:`, no model given, none in conf/model using it."""

    def __init__(self, spec: ModuleSpec) -> None:
        super().__init__(Problem(
            "no sizes: give TransformerConfig fields under the root node's 'config', or name a model "
            "(--model NAME) whose config to use", "", spec.file, 1))
        self.spec = spec


def spec_file_inputs(path: Path, display: str | None = None, model: str | None = None,
                     ) -> tuple[ModuleSpec, Configs, tuple[str, ...]]:
    """(spec, configs) for a spec file: sizes from its root `config`, over a model that uses it."""
    spec = load_spec(path, display)
    base: dict[str, Any] = {}
    in_shipped = path.resolve().parent == specs_dir().resolve()
    model = model or next(iter(models_using_spec(path) if in_shipped else []), None)
    if model:
        base = given_config(compose([f"model={model}"]))
    if isinstance(spec.config, str):  # the root selects one of the model's named configs
        fields: dict[str, Any] = base
    elif is_named(base) or is_named(spec.config):
        fields = {n: {**base.get(n, {}), **dict(spec.config.get(n, {}))} for n in {**base, **spec.config}}
    else:
        fields = {**base, **dict(spec.config)}
    if not fields:
        raise NoSizes(spec)
    configs = make_configs(fields, spec.smap, ("config",))
    if not isinstance(spec.config, str):
        # The root's fields became the base config; the node keeps no override of its own.
        spec = ModuleSpec(spec.module, spec.params, spec.submodules, {}, spec.repeat, spec.smap)
    return spec, configs, ()


def model_inputs(source: Any, allow_imports: tuple[str, ...] | list[str] = (),
                 ) -> tuple[ModuleSpec, Configs, tuple[str, ...]]:
    """(spec, configs, allow_imports) from a composed config, a spec file path, a model name or a checkpoint.

    Import paths a spec may name come from the caller: `allow_imports`, plus a composed
    config's own `allow_imports` (the user's Hydra config); never from a file or checkpoint.
    """
    allow = tuple(allow_imports)
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_dir():  # a megaspec checkpoint directory: the spec and config it was saved with
            return checkpoint_inputs(path, allow)
        if path.suffix in (".yaml", ".yml"):
            spec, configs, _ = spec_file_inputs(path)
            return spec, configs, allow
        if isinstance(source, str) and (conf_dir() / "model" / f"{source}.yaml").is_file():
            spec, configs, _ = cfg_inputs(compose([f"model={source}"]))
            return spec, configs, allow
        raise SpecError(f"'{source}' is neither a spec file (.yaml), a checkpoint directory nor a model name in "
                        "conf/model")
    spec, configs, own = cfg_inputs(source)
    return spec, configs, tuple(dict.fromkeys((*own, *allow)))


def build_model(source: Any, device: str | torch.device | None = None,
                allow_imports: tuple[str, ...] | list[str] = ()) -> nn.Module:
    """Build from a composed config, spec file, model name or checkpoint; `device="meta"` allocates nothing.

    A checkpoint directory gives its spec and config only; `megaspec.load` also reads its weights.
    `allow_imports`: import-path prefixes a spec may name as `module:` (see `model_inputs`).
    """
    spec, configs, allow = model_inputs(source, allow_imports)
    return build_module(spec, configs, device=device, allow_imports=allow)
