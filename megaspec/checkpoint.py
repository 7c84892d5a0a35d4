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

A save deletes only files a megaspec manifest lists: those of the previous
checkpoint at that path, and the files a save interrupted there may have left,
which it lists (`pending`) in the previous manifest before writing them. Anything
else in the directory (an HF model's shards, a README) survives; a directory
holding a `megaspec.yaml` that is not a valid manifest is refused untouched.
Loading trusts nothing in the directory: see megaspec.manifest. Weights are only
ever read with safetensors, and nothing is ever unpickled.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn

from megaspec.configs import Configs, make_configs
from megaspec.errors import Problem, SpecError
from megaspec.init import check_buffers, init_method, poison_buffers
from megaspec.field_use import REQUIRED
from megaspec.manifest import (FORMAT, FORMAT_1, MANIFEST, inside, owned_files, parse_entry, read_manifest,
                               read_manifest_located)
from megaspec.memory import check_fits, check_weights_fit, parameter_bytes
from megaspec.record import described
from megaspec.resolve import Resolved, resolve
from megaspec.source import SourceMap
from megaspec.spec import ModuleSpec, parse_spec, walk

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


def atomic_write(target: Path, write: Callable[[Path], None], tmp: Path) -> None:
    """Write `target` via `tmp` (created here, exclusively) in its directory: write, fsync, rename, fsync the directory."""
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))  # never reuses a file already there
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


@contextlib.contextmanager
def _saving(path: Path) -> Iterator[None]:
    """OSErrors while saving as one SpecError naming the path (disk full, read-only, ...)."""
    try:
        yield
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        raise SpecError(Problem(f"cannot save the checkpoint: {exc.strerror or exc}{where}; "
                                "the previous checkpoint there, if any, is unchanged", "", str(path))) from None
    except Exception as exc:
        if type(exc).__name__ != "SafetensorError":  # safetensors reports a failed write as its own error
            raise
        match = re.search(r"I/O error: (.*?)(?: \(os error \d+\))?$", str(exc))
        reason = match.group(1) if match else str(exc)
        raise SpecError(Problem(f"cannot save the checkpoint: {reason}; the previous checkpoint there, if any, "
                                "is unchanged", "", str(path))) from None


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
    """Configs as plain YAML data: the fields each was given (the others keep their defaults), or {name: fields}."""
    dumped = {name: {k: v for k, v in cfg.model_dump(mode="json").items() if k in cfg.model_fields_set}
              for name, cfg in configs.items()}
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
        check_weights_fit(model, device)
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


def _target_directory(directory: Path) -> set[str]:
    """Check where a save goes; returns the files the previous megaspec checkpoint there owns (may be replaced)."""
    if directory.exists() and not directory.is_dir():
        raise SpecError(Problem("cannot save a checkpoint here: the path exists and is not a directory", "",
                                str(directory)))
    if not directory.exists():
        parent = directory.parent
        if not parent.is_dir():
            raise SpecError(Problem(f"cannot save a checkpoint here: the parent directory '{parent}' does not "
                                    "exist", "", str(directory)))
        return set()
    if not (directory / MANIFEST).exists() and not (directory / MANIFEST).is_symlink():
        return set()
    try:
        return owned_files(read_manifest(directory))
    except SpecError as exc:
        raise SpecError([Problem(f"refusing to save: the directory holds a {MANIFEST} that is not a valid megaspec "
                                 "checkpoint, and a save replaces only what megaspec wrote; remove it or choose "
                                 "another directory", "", str(directory)), *exc.problems]) from None


_OWN_NAME = re.compile(rf"^(model-[0-9a-f]{{8}}\.safetensors|\.model-[0-9a-f]{{8}}\.safetensors\.tmp|"
                       rf"\.{re.escape(MANIFEST)}\.[0-9a-f]{{8}}\.tmp)$")


def _fresh_names(directory: Path) -> tuple[str, str, str]:
    """(weights, its temporary file, the manifest's temporary file): names no file in `directory` has."""
    while True:
        token = secrets.token_hex(4)
        names = (f"model-{token}.safetensors", f".model-{token}.safetensors.tmp", f".{MANIFEST}.{token}.tmp")
        if not any(os.path.lexists(directory / n) for n in names):
            return names


def _write_manifest(directory: Path, manifest: Mapping[str, Any], tmp: str) -> None:
    text = yaml.safe_dump(dict(manifest), sort_keys=False, default_flow_style=False, width=120)
    atomic_write(directory / MANIFEST, lambda t: t.write_text(text, encoding="utf-8"), directory / tmp)


def save(model: nn.Module, path: str | os.PathLike[str], *, spec: ModuleSpec | None = None,
         config: Any = None) -> Path:
    """Write `model` as a self-describing checkpoint directory; returns its path.

    The spec and config come from the model (`megaspec.build_module` records them)
    unless given. An existing megaspec checkpoint at `path` is replaced atomically;
    other files there are left alone. Any failure is a SpecError naming the path,
    with the previous checkpoint intact.
    """
    spec, configs, allow = described(model, spec, config)
    root = resolve(spec, configs, allow)
    state = model.state_dict()
    if any(t.is_meta for t in state.values()):
        raise SpecError("the model is on the meta device: it has no weights to save")
    stored, tied = split_tied(state)
    directory = Path(path)
    owned = _target_directory(directory)
    st = _safetensors()
    with _saving(directory):
        directory.mkdir(exist_ok=True)
        weights, weights_tmp, manifest_tmp = _fresh_names(directory)
        new = {weights, weights_tmp, manifest_tmp}
        if owned:  # so that a save interrupted from here on leaves nothing the next one cannot remove
            previous = read_manifest(directory)
            pending = sorted(set(previous.get("pending") or ()) | new)
            _write_manifest(directory, {**previous, "pending": pending}, manifest_tmp)
        manifest = {
            "format": FORMAT,
            "weights": weights,
            "spec": spec.to_dict(),
            "config": _config_data(configs),
            "modules": _modules_used(root),
            "tensors": {n: f"{_dtype_name(t.dtype)} {list(t.shape)}" for n, t in stored.items()},
            "tied": tied,
        }
        atomic_write(directory / weights,
                     lambda tmp: st.torch.save_file(stored, str(tmp), metadata={"format": "pt", "megaspec": FORMAT}),
                     directory / weights_tmp)
        try:
            _write_manifest(directory, manifest, manifest_tmp)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                (directory / weights).unlink()
            raise
    # Committed: the previous checkpoint's files, and those an interrupted save left, are garbage now.
    # Only names of the forms a save writes are removed, whatever else a manifest lists.
    for name in owned - new:
        if _OWN_NAME.match(name):
            with contextlib.suppress(OSError):
                (directory / name).unlink()
    return directory


# ---------------------------------------------------------------- load


def _allowed(name: str, allow: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p.rstrip(".") + ".") for p in allow)


def _check_modules(manifest: Mapping[str, Any], spec: ModuleSpec, allow: tuple[str, ...], file: str) -> None:
    """Every module the checkpoint names is registered, or an import path the caller allowed; nothing imported."""
    from megaspec.registry import names

    registered = set(names())
    info = manifest.get("modules") or {}
    problems = []
    seen: set[str] = set()
    for path, node in [*walk(spec), *(("", ModuleSpec(n)) for n in info)]:
        name = node.module
        if name in registered or name in seen or ("." in name and _allowed(name, allow)):
            continue
        seen.add(name)
        where = node.smap.locate(("module",))
        if "." in name:
            prefix = name.rpartition(".")[0]
            message = (f"module '{name}' is an import path, and a checkpoint cannot allow imports for itself; "
                       f"if you trust this checkpoint's code, allow it: megaspec.load(path, allow_imports="
                       f"['{prefix}']), or --allow-imports {prefix} on the command line")
        else:
            entry = info.get(name) or {}
            message = (f"module '{name}' ({entry.get('kind', '?')}, {entry.get('class', '?')}) is not registered; "
                       f"the checkpoint was saved with it from {entry.get('origin', 'an unknown origin')}: install "
                       "or import that to load it")
        problems.append(Problem(message, path or name, where[0] or file, where[1]))
    if problems:
        raise SpecError(problems)


def checkpoint_inputs(path: str | os.PathLike[str], allow_imports: tuple[str, ...] | list[str] = (),
                      ) -> tuple[ModuleSpec, Configs, tuple[str, ...]]:
    """(spec, configs, allow_imports) to build a checkpoint's model: what `build_module` needs.

    `allow_imports` comes from the caller only: the checkpoint's own list is never
    honoured, and an import path it needs that the caller did not allow is refused
    before anything is imported.
    """
    manifest, smap = read_manifest_located(path)
    allow = tuple(allow_imports)
    spec = parse_spec(manifest["spec"], smap.child(("spec",)))
    _check_modules(manifest, spec, allow, smap.file or str(path))
    configs = make_configs(manifest["config"], smap, ("config",))
    if manifest["format"] == FORMAT_1:
        configs = _read_fields_only(spec, configs, manifest["config"], smap, allow)
    return spec, configs, allow


def _read_fields_only(spec: ModuleSpec, configs: Configs, data: Mapping[str, Any], smap: SourceMap,
                      allow: tuple[str, ...]) -> Configs:
    """A format-1 config (every field recorded, read or not) as format 2 holds it: the fields the model reads.

    The others had no effect when the checkpoint was written either (its modules did not read them),
    so dropping them rebuilds the same model, which the field rule would otherwise refuse.
    """
    from megaspec.build import fields_read  # imported here, as in load(): the builder loads every built-in module

    read = fields_read(spec, configs, allow)
    if list(configs) == [""]:
        kept: dict[str, Any] = {k: v for k, v in data.items() if k in read[""] or k in REQUIRED}
    else:
        kept = {name: {k: v for k, v in fields.items() if k in read[name] or k in REQUIRED}
                for name, fields in data.items()}
    return make_configs(kept, smap, ("config",))


def _header(file: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, dtype) from a safetensors header, which safetensors bounds and checks against the file size."""
    st = _safetensors()
    found = {}
    try:
        with st.safe_open(str(file), framework="pt") as f:  # reads the header only
            for name in f.keys():
                info = f.get_slice(name)
                found[name] = (tuple(info.get_shape()), _ST_DTYPES.get(info.get_dtype(), info.get_dtype()))
    except Exception as exc:  # SafetensorError and OSError: a damaged or hostile file
        raise SpecError(Problem(f"not a readable safetensors file: {exc}", "", str(file))) from None
    return found


def load_weights(model: nn.Module, path: str | os.PathLike[str],
                 device: str | torch.device | None = None) -> nn.Module:
    """Fill `model` (meta-built or materialised) from a checkpoint, after checking every tensor."""
    manifest = read_manifest(path)
    file = inside(Path(path), manifest["weights"], "the weights file")
    tied = dict(manifest.get("tied") or {})
    state = model.state_dict()
    expected = {n: (tuple(t.shape), _dtype_name(t.dtype)) for n, t in state.items() if n not in tied}
    found = _header(file)
    problems = check_tensors(expected, found, f"checkpoint {file.name}")
    listed = {n: parse_entry(v) for n, v in (manifest.get("tensors") or {}).items()}
    if listed != found:
        problems.append(Problem(f"{file.name} does not hold the tensors {MANIFEST} lists"))
    problems += [Problem(f"tied to '{t}', which the checkpoint does not hold", a) for a, t in tied.items()
                 if t not in found]
    problems += [Problem("listed as tied, but the model has no such tensor", a) for a in tied if a not in state]
    if problems:
        raise SpecError([Problem(f"checkpoint '{path}' does not fit the model: {len(problems)} problem(s)"),
                         *problems])
    target = device or next((t.device for t in state.values() if not t.is_meta), "cpu")
    if any(t.is_meta for t in state.values()):  # the model's storage, and the file's tensors until copied in
        check_fits(2 * parameter_bytes(model), target, "loading the checkpoint (the model and the file's tensors)")
    try:
        tensors = _safetensors().torch.load_file(str(file), device=str(target))
    except Exception as exc:
        raise SpecError(Problem(f"cannot read the weights: {exc}", "", str(file))) from None
    tensors.update({alias: tensors[name] for alias, name in tied.items()})
    return fill(model, tensors, target)


def load(path: str | os.PathLike[str], *, device: str | torch.device = "cpu",
         allow_imports: tuple[str, ...] | list[str] = ()) -> nn.Module:
    """Rebuild the model a checkpoint describes, with its weights; no other input needed.

    A checkpoint is data: it can select only registered modules, and import paths
    the caller allows in `allow_imports` (never a list the checkpoint carries).
    """
    from megaspec.build import build_module

    spec, configs, allow = checkpoint_inputs(path, allow_imports)
    model = build_module(spec, configs, device="meta", allow_imports=allow)
    return load_weights(model, path, device)


__all__ = ["FORMAT", "MANIFEST", "checkpoint_inputs", "load", "load_weights", "read_manifest", "save"]
