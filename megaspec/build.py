"""Build torch modules from resolved specs: meta first, then materialise and init once.

Construction follows one convention for every registered class:
`Cls(config, **params, **built_children)`. The whole tree is constructed on the
meta device (no memory, no init cost), moved to the target device with
`to_empty`, and each module initialises only its own parameters and buffers,
exactly once, TorchTitan-style. The model gets a BuildRecord of what built it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

import megaspec.catalog  # noqa: F401  (the built-in modules, registered before anything is resolved)
from megaspec.config import DTYPES, FieldReads, TransformerConfig, recording_reads
from megaspec.configs import Configs, make_configs
from megaspec.errors import Problem, SpecError
from megaspec.field_use import config_settings, refuse_kept_configs, refuse_unread
from megaspec.init import batched_init, check_buffers, init_weights, poison_buffers
from megaspec.memory import check_weights_fit
from megaspec.record import BuildRecord, Registered, attach_record
from megaspec.resolve import Resolved, resolve
from megaspec.spec import ModuleSpec

Built = dict[nn.Module, Registered]  # every constructed module -> the entry it was built from


class ModuleFactory:
    """What a slot with `provides` receives: call it with the sizes the parent knows."""

    def __init__(self, resolved: Resolved, built: Built) -> None:
        self.resolved = resolved
        self.built = built

    @property
    def cls(self) -> type[nn.Module]:
        """The class this factory builds."""
        return self.resolved.entry.cls

    def __call__(self, **provided: Any) -> nn.Module:
        """Construct the module with the parent-supplied arguments."""
        return _construct(self.resolved, self.built, provided)

    def __repr__(self) -> str:
        return f"ModuleFactory({self.resolved.entry.name})"


def _child(r: Resolved, built: Built) -> nn.Module | ModuleFactory:
    return ModuleFactory(r, built) if r.provides else _construct(r, built)


def _construct(r: Resolved, built: Built, provided: Mapping[str, Any] | None = None) -> nn.Module:
    kwargs: dict[str, Any] = {}
    for slot, child in r.children.items():
        if child is None:
            continue
        kwargs[slot] = [_child(c, built) for c in child] if isinstance(child, list) else _child(child, built)
    try:
        module = r.entry.cls(r.config, **r.params, **kwargs, **(provided or {}))
    except SpecError:
        raise
    except Exception as exc:  # a constructor's own check: report it at the node, once
        file, line = r.spec.smap.locate(("module",))
        raise SpecError(Problem(
            f"building '{r.entry.name}' ({r.entry.cls.__qualname__}) failed: {type(exc).__name__}: {exc}",
            r.path or "<root>", file, line)) from exc
    _own_tensors_to(module, DTYPES[r.config.params_dtype], built)
    built[module] = Registered(r.entry.name, r.entry.kind)
    return module


def _own_tensors_to(module: nn.Module, dtype: torch.dtype, built: Built) -> None:
    """Cast the floating tensors `module` owns (not its registered children's) to its config's params_dtype.

    Per node, so a subtree built with another config (a vision tower) keeps its own dtype,
    and a plug-in that creates plain nn.Linear layers still follows params_dtype.
    """
    todo = [module]
    while todo:
        m = todo.pop()
        for param in m._parameters.values():
            if param is not None and param.is_floating_point() and param.dtype != dtype:
                param.data = param.data.to(dtype)
        for name, buf in m._buffers.items():
            if buf is not None and buf.is_floating_point() and buf.dtype != dtype:
                m._buffers[name] = buf.to(dtype)
        todo += [c for c in m.children() if c not in built]


def materialize(model: nn.Module, device: str | torch.device = "cpu") -> nn.Module:
    """Allocate a meta-built model's storage on `device` and initialise it; every buffer must get a value.

    A model whose weights do not fit in the device's available memory is a SpecError, before any allocation.
    """
    check_weights_fit(model, device)
    model.to_empty(device=device)
    with torch.no_grad():
        poisoned = poison_buffers(model)
        with batched_init():
            init_weights(model)
    check_buffers(poisoned)
    return model


def _construct_watched(spec: ModuleSpec, configs: Configs, allow_imports: tuple[str, ...] | list[str],
                       ) -> tuple[nn.Module, Resolved, Built, FieldReads, list[tuple[TransformerConfig, dict]]]:
    """The model on the meta device, with a record of which set config fields its modules read."""
    settings = config_settings(configs)
    built: Built = {}
    with recording_reads() as reads:
        for cfg, tokens in settings:
            reads.watch(cfg, tokens)
        root = resolve(spec, configs, allow_imports)
        with torch.device("meta"):
            model = _construct(root, built)
    return model, root, built, reads, settings


def fields_read(spec: ModuleSpec, config: TransformerConfig | Configs | Mapping[str, Any],
                allow_imports: tuple[str, ...] | list[str] = ()) -> dict[str, set[str]]:
    """{config name: its set fields that some module of the model reads}, from a meta build that refuses none."""
    configs = make_configs(config)
    _, _, _, reads, settings = _construct_watched(spec, configs, allow_imports)
    return {name: {f for f, token in tokens.items() if token in reads.read}
            for name, (_, tokens) in zip(configs, settings, strict=True)}


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
    model, root, built, reads, _ = _construct_watched(spec, configs, allow_imports)
    refuse_kept_configs(built, {m: path for path, m in model.named_modules()})
    # Every config field that was set must be read by some module while the tree is built.
    refuse_unread(reads, root)
    modules = {path: built[m] for path, m in model.named_modules(remove_duplicate=False) if m in built}
    attach_record(model, BuildRecord(spec, configs, tuple(allow_imports), modules))
    if str(device) == "meta":
        return model
    return materialize(model, device or "cpu")


def meta_forward(model: nn.Module, batch: int = 1, seq: int = 8) -> Any:
    """Run a forward pass on meta tensors: a memory-free shape check of the whole graph.

    A module that fails (slots whose shapes do not fit) is a SpecError naming its path in the model.
    """
    make = getattr(model, "example_inputs", None)
    if make is None:
        raise SpecError(f"{type(model).__name__} has no example_inputs(); cannot shape-check it")
    inputs = make(batch=batch, seq=seq, device="meta")
    with torch.no_grad(), _running(model) as running:
        try:
            return model(**inputs)
        except SpecError:
            raise
        except Exception as exc:  # a shape mismatch between slots surfaces here
            where = running[-1] if running else ""
            raise SpecError(Problem(f"meta forward failed: {type(exc).__name__}: {exc}",
                                    where or "<root>")) from None


@contextmanager
def _running(model: nn.Module) -> Iterator[list[str]]:
    """The paths of the modules whose forward is running, innermost last."""
    names = {m: name for name, m in model.named_modules()}
    running: list[str] = []

    def enter(module: nn.Module, args: Any) -> None:
        running.append(names[module])

    def leave(module: nn.Module, args: Any, output: Any) -> None:  # returns None: the output stays as it is
        running.pop()

    handles = [h for m in names for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    try:
        yield running
    finally:
        for handle in handles:
            handle.remove()
