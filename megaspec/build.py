"""Build torch modules from resolved specs: meta first, then materialise and init once.

Construction follows one convention for every registered class:
`Cls(config, **params, **built_children)`. The whole tree is constructed on the
meta device (no memory, no init cost), moved to the target device with
`to_empty`, and each module initialises only its own parameters exactly once,
TorchTitan-style.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from megaspec.config import DTYPES, TransformerConfig
from megaspec.errors import Problem, SpecError
from megaspec.init import batched_init
from megaspec.resolve import Configs, Resolved, make_configs, resolve
from megaspec.spec import ModuleSpec


class ModuleFactory:
    """What a slot with `provides` receives: call it with the sizes the parent knows."""

    def __init__(self, resolved: Resolved) -> None:
        self.resolved = resolved

    @property
    def cls(self) -> type[nn.Module]:
        """The class this factory builds."""
        return self.resolved.entry.cls

    def __call__(self, **provided: Any) -> nn.Module:
        """Construct the module with the parent-supplied arguments."""
        return _construct(self.resolved, provided)

    def __repr__(self) -> str:
        return f"ModuleFactory({self.resolved.entry.name})"


def _child(r: Resolved) -> nn.Module | ModuleFactory:
    return ModuleFactory(r) if r.provides else _construct(r)


def _construct(r: Resolved, provided: Mapping[str, Any] | None = None) -> nn.Module:
    kwargs: dict[str, Any] = {}
    for slot, child in r.children.items():
        if child is None:
            continue
        kwargs[slot] = [_child(c) for c in child] if isinstance(child, list) else _child(child)
    try:
        module = r.entry.cls(r.config, **r.params, **kwargs, **(provided or {}))
    except SpecError:
        raise
    except Exception as exc:  # a constructor's own check: report it at the node, once
        file, line = r.spec.smap.locate(("module",))
        raise SpecError(Problem(
            f"building '{r.entry.name}' ({r.entry.cls.__qualname__}) failed: {type(exc).__name__}: {exc}",
            r.path or "<root>", file, line)) from exc
    # Remember where each module came from, for summaries and error messages.
    module._megaspec_name = r.entry.name  # type: ignore[attr-defined]
    return module


def init_weights(model: nn.Module) -> None:
    """Initialise every module's own parameters once (init_weights, else reset_parameters)."""
    for module in model.modules():
        init = getattr(module, "init_weights", None) or getattr(module, "reset_parameters", None)
        if callable(init):
            init()


def materialize(model: nn.Module, device: str | torch.device = "cpu") -> nn.Module:
    """Allocate a meta-built model's storage on `device` and initialise it."""
    model.to_empty(device=device)
    with torch.no_grad(), batched_init():
        init_weights(model)
    return model


def build_module(
    spec: ModuleSpec,
    config: TransformerConfig | Configs | Mapping[str, Any],
    *,
    device: str | torch.device | None = None,
    allow_imports: tuple[str, ...] | list[str] = (),
) -> nn.Module:
    """Validate `spec` against `config` and build it; `device="meta"` allocates nothing.

    `config` is one TransformerConfig (or its fields), or several by name
    ({"language": ..., "vision": ...}) for models whose parts differ in size.
    """
    configs = make_configs(config)
    root = resolve(spec, configs, allow_imports)
    with torch.device("meta"):
        model = _construct(root)
    model.to(DTYPES[root.config.params_dtype])
    # What the model was built from, so checkpoints can describe themselves.
    model.megaspec_spec = spec  # type: ignore[assignment]
    model.megaspec_configs = configs  # type: ignore[assignment]
    model.megaspec_allow_imports = tuple(allow_imports)  # type: ignore[assignment]
    if str(device) == "meta":
        return model
    return materialize(model, device or "cpu")


def build_model(cfg_or_path: Any, device: str | torch.device | None = None) -> nn.Module:
    """Build from a composed config, spec file, model name or checkpoint; `device="meta"` allocates nothing.

    A checkpoint directory gives its spec and config only; `megaspec.load` also reads its weights.
    """
    from megaspec.compose import model_inputs

    spec, config, allow = model_inputs(cfg_or_path)
    return build_module(spec, config, device=device, allow_imports=allow)


def meta_forward(model: nn.Module, batch: int = 1, seq: int = 8) -> Any:
    """Run a forward pass on meta tensors: a memory-free shape check of the whole graph."""
    make = getattr(model, "example_inputs", None)
    if make is None:
        raise SpecError(f"{type(model).__name__} has no example_inputs(); cannot shape-check it")
    inputs = make(batch=batch, seq=seq, device="meta")
    with torch.no_grad():
        return model(**inputs)


def spec_path_display(path: str | Path) -> str:
    """How a file is named in messages: relative to the working directory when inside it."""
    p = Path(path)
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(p)
