"""Self-describing checkpoints: the weights plus the spec, config and module names they need.

A checkpoint is a directory:

    megaspec.yaml               the manifest: format, spec tree, config(s), the registered
                                modules the spec uses (with their origin), the weights file,
                                every tensor's dtype and shape, and tied names
    model-<token>.safetensors   the weights, each tensor stored once
    tokenizer.json              optional: the tokenizer the model reads text with (megaspec train
                                and megaspec convert write it; megaspec generate reads it)

The manifest is written last and is the commit point: each file is written to a
temporary file in the same directory, fsynced and renamed into place, then the
directory is fsynced. The weights file gets a new name on every save, so until
the new manifest replaces the old one, the old manifest still points at intact
old weights: a crash at any moment leaves the previous checkpoint loadable.
Weights are only ever read with safetensors.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn

from megaspec.configs import Configs, make_configs
from megaspec.errors import Problem, SpecError
from megaspec.init import check_buffers, init_method, poison_buffers
from megaspec.record import described
from megaspec.resolve import Resolved, resolve
from megaspec.spec import ModuleSpec, parse_spec

FORMAT = "megaspec-checkpoint/1"
MANIFEST = "megaspec.yaml"
# safetensors' dtype codes -> torch's names.
_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def _safetensors() -> Any:
    try:
        import safetensors.torch
    except ImportError:
        raise SpecError("megaspec checkpoints need safetensors: pip install safetensors") from None
    return safetensors


# ---------------------------------------------------------------- atomic files


def _fsync_dir(directory: Path) -> None:
    """Make a rename inside `directory` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(target: Path, write: Callable[[Path], None]) -> None:
    """Write `target` via a temporary file in its directory: write, fsync, rename over it, fsync the directory."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_dir(target.parent)


# ---------------------------------------------------------------- what a model was built from


def _modules_used(root: Resolved) -> dict[str, dict[str, str]]:
    """Every registered name in the resolved tree (slot defaults included) -> kind, class, origin."""
    found: dict[str, dict[str, str]] = {}
    stack = [root]
    while stack:
        r = stack.pop()
        found[r.entry.name] = {"kind": r.entry.kind, "class": r.entry.qualname, "origin": r.entry.origin}
        for child in r.children.values():
            stack += child if isinstance(child, list) else [child] if child is not None else []
    return dict(sorted(found.items()))


def _config_data(configs: Configs) -> dict[str, Any]:
    """Configs as plain YAML data: one config's fields, or {name: fields}."""
    dumped = {name: cfg.model_dump(mode="json") for name, cfg in configs.items()}
    return dumped[""] if list(dumped) == [""] else dumped


# ---------------------------------------------------------------- tensors


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def split_tied(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors to store, {alias: stored name}): names viewing the same memory the same way are stored once."""
    seen: dict[tuple[Any, ...], str] = {}
    stored: dict[str, Tensor] = {}
    tied: dict[str, str] = {}
    storages: set[int] = set()
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if key in seen:
            tied[name] = seen[key]
            continue
        seen[key] = name
        ptr = t.untyped_storage().data_ptr()
        # A different view of memory already stored (or a non-contiguous one) is copied, as safetensors needs.
        t = t.detach()
        stored[name] = t.clone() if ptr in storages else t.contiguous()
        storages.add(ptr)
    return stored, tied


def _parse_entry(entry: str) -> tuple[tuple[int, ...], str]:
    """A manifest tensor entry "float32 [101, 64]" -> ((101, 64), "float32")."""
    dtype, _, shape = str(entry).partition(" ")
    return tuple(yaml.safe_load(shape) or ()), dtype


def check_tensors(expected: Mapping[str, tuple[tuple[int, ...], str]],
                  found: Mapping[str, tuple[tuple[int, ...], str]], where: str) -> list[Problem]:
    """Every missing, unexpected, mis-shaped or mis-typed tensor: name -> (shape, dtype) on both sides."""
    problems = [Problem(f"missing from {where}", n) for n in expected if n not in found]
    problems += [Problem(f"in {where} but not in the model", n) for n in found if n not in expected]
    for name, (shape, dtype) in found.items():
        if name not in expected:
            continue
        want_shape, want_dtype = expected[name]
        if tuple(shape) != tuple(want_shape):
            problems.append(Problem(f"shape {tuple(shape)} in {where}, but the model has {tuple(want_shape)}", name))
        if dtype != want_dtype:
            problems.append(Problem(f"dtype {dtype} in {where}, but the model has {want_dtype}", name))
    return problems


def fill(model: nn.Module, tensors: Mapping[str, Tensor], device: str | torch.device | None = None) -> nn.Module:
    """Fill a model's weights from `tensors` (names already checked); a meta-built model is allocated first.

    Only modules holding non-persistent buffers (pure functions of the config, such
    as RoPE tables, never in a checkpoint) run their init; every other tensor is
    copied, so nothing is initialised only to be overwritten.
    """
    if any(t.is_meta for t in model.state_dict().values()) or any(b.is_meta for b in model.buffers()):
        model.to_empty(device=device or "cpu")
        with torch.no_grad():
            poisoned = poison_buffers(model)
            for module in model.modules():
                init = init_method(module)
                if getattr(module, "_non_persistent_buffers_set", None) and callable(init):
                    init()
        # Persistent buffers come from the checkpoint below; the others must have been recomputed.
        check_buffers([(p, m, n) for p, m, n in poisoned if n in m._non_persistent_buffers_set])
    with torch.no_grad():
        model.load_state_dict(dict(tensors), strict=True)
    return model


# ---------------------------------------------------------------- save


def save(model: nn.Module, path: str | os.PathLike[str], *, spec: ModuleSpec | None = None,
         config: Any = None) -> Path:
    """Write `model` as a self-describing checkpoint directory; returns its path.

    The spec and config come from the model (`megaspec.build_module` records them)
    unless given. An existing checkpoint at `path` is replaced atomically.
    """
    spec, configs, allow = described(model, spec, config)
    root = resolve(spec, configs, allow)
    state = model.state_dict()
    if any(t.is_meta for t in state.values()):
        raise SpecError("the model is on the meta device: it has no weights to save")
    stored, tied = split_tied(state)
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    weights = f"model-{secrets.token_hex(4)}.safetensors"
    manifest = {
        "format": FORMAT,
        "weights": weights,
        "spec": spec.to_dict(),
        "config": _config_data(configs),
        "allow_imports": list(allow),
        "modules": _modules_used(root),
        "tensors": {n: f"{_dtype_name(t.dtype)} {list(t.shape)}" for n, t in stored.items()},
        "tied": tied,
    }
    st = _safetensors()
    atomic_write(directory / weights,
                 lambda tmp: st.torch.save_file(stored, str(tmp), metadata={"format": "pt", "megaspec": FORMAT}))
    text = yaml.safe_dump(manifest, sort_keys=False, default_flow_style=False, width=120)
    atomic_write(directory / MANIFEST, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    # Committed: weights of earlier saves and leftovers of interrupted ones are garbage now.
    for stale in [*directory.glob("model-*.safetensors"), *directory.glob(".*.tmp")]:
        if stale.name != weights:
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
    return directory


# ---------------------------------------------------------------- load


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of the checkpoint at `path`, checked for format."""
    file = Path(path) / MANIFEST
    if not file.is_file():
        raise SpecError(f"'{path}' is not a megaspec checkpoint (no {MANIFEST})")
    with open(file, encoding="utf-8") as f:
        manifest = yaml.safe_load(f)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise SpecError(Problem(f"unknown checkpoint format {found!r}; this megaspec reads {FORMAT}", "", str(file)))
    return manifest


def _check_modules(manifest: Mapping[str, Any], allow: tuple[str, ...]) -> None:
    """Every module the checkpoint names is registered here; a missing one names where it came from."""
    from megaspec.registry import lookup

    problems = []
    for name, info in (manifest.get("modules") or {}).items():
        try:
            lookup(name, allow)
        except SpecError:
            problems.append(Problem(
                f"module '{name}' ({info.get('kind')}, {info.get('class')}) is not registered; the checkpoint "
                f"was saved with it from {info.get('origin')}: install or import that to load it", name))
    if problems:
        raise SpecError(problems)


def checkpoint_inputs(path: str | os.PathLike[str]) -> tuple[ModuleSpec, Configs, tuple[str, ...]]:
    """(spec, configs, allow_imports) a checkpoint was saved with: what `build_module` needs."""
    manifest = read_manifest(path)
    allow = tuple(manifest.get("allow_imports") or ())
    _check_modules(manifest, allow)
    return parse_spec(manifest["spec"]), make_configs(manifest["config"]), allow


def load_weights(model: nn.Module, path: str | os.PathLike[str],
                 device: str | torch.device | None = None) -> nn.Module:
    """Fill `model` (meta-built or materialised) from a checkpoint, after checking every tensor."""
    manifest = read_manifest(path)
    file = Path(path) / manifest["weights"]
    if not file.is_file():
        raise SpecError(f"checkpoint '{path}' names weights file '{manifest['weights']}', which is missing")
    st = _safetensors()
    tied = dict(manifest.get("tied") or {})
    state = model.state_dict()
    expected = {n: (tuple(t.shape), _dtype_name(t.dtype)) for n, t in state.items() if n not in tied}
    found = {}
    with st.safe_open(str(file), framework="pt") as f:  # reads the header only
        for name in f.keys():
            info = f.get_slice(name)
            found[name] = (tuple(info.get_shape()), _ST_DTYPES.get(info.get_dtype(), info.get_dtype()))
    problems = check_tensors(expected, found, f"checkpoint {file.name}")
    listed = {n: _parse_entry(v) for n, v in (manifest.get("tensors") or {}).items()}
    if listed != found:
        problems.append(Problem(f"{file.name} does not hold the tensors {MANIFEST} lists"))
    problems += [Problem(f"tied to '{t}', which the checkpoint does not hold", a) for a, t in tied.items()
                 if t not in found]
    problems += [Problem("listed as tied, but the model has no such tensor", a) for a in tied if a not in state]
    if problems:
        raise SpecError([Problem(f"checkpoint '{path}' does not fit the model: {len(problems)} problem(s)"),
                         *problems])
    target = device or next((t.device for t in state.values() if not t.is_meta), "cpu")
    tensors = st.torch.load_file(str(file), device=str(target))
    tensors.update({alias: tensors[name] for alias, name in tied.items()})
    return fill(model, tensors, target)


def load(path: str | os.PathLike[str], *, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model a checkpoint describes, with its weights; no other input needed."""
    from megaspec.build import build_module

    spec, configs, allow = checkpoint_inputs(path)
    model = build_module(spec, configs, device="meta", allow_imports=allow)
    return load_weights(model, path, device)


__all__ = ["FORMAT", "MANIFEST", "checkpoint_inputs", "load", "load_weights", "read_manifest", "save"]
