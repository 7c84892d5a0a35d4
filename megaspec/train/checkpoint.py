"""Sharded training checkpoints with torch.distributed.checkpoint (DCP).

Each process writes its own shards of the model and optimizer state under
`<dir>/step_<N>/`; the keys are the model's fully-qualified parameter names,
so a checkpoint saved at one world size (or parallel layout) loads at another.
Expert-parallel weights are saved as the global [E, ...] tensors, sharded by expert.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful

from megaspec.errors import SpecError
from megaspec.parallel.expert import globalize_experts, localize_experts, unsupported_expert_checkpoint
from megaspec.parallel.parallelize import parallel_state

STEP_DIR = re.compile(r"^step_(\d+)$")


class TrainState(Stateful):
    """Model, optimizer and step as one DCP-stateful object."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int = 0) -> None:
        self.model, self.optimizer, self.step = model, optimizer, step

    def state_dict(self) -> dict[str, Any]:
        """Sharded state dicts keyed by parameter name (world-size independent)."""
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        model_sd, optim_sd = globalize_experts(self.model, _mesh(self.model), model_sd, optim_sd)
        return {"model": model_sd, "optim": optim_sd, "step": torch.tensor(self.step)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load in place into the (possibly sharded) model and optimizer."""
        model_sd, optim_sd = localize_experts(self.model, _mesh(self.model), state_dict["model"], state_dict["optim"])
        set_state_dict(self.model, self.optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
        self.step = int(state_dict["step"])


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _mesh(model: nn.Module) -> Any:
    layout = parallel_state(model)
    return None if layout is None else layout.mesh


def check_saveable(model: nn.Module) -> None:
    """Refuse layouts whose DCP checkpoint would be wrong, before any step is spent."""
    problem = unsupported_expert_checkpoint(model)
    if problem is not None:
        raise SpecError(f"checkpoints of this expert-parallel layout are not supported: {problem}; train with "
                        "trainer.save_every=0 trainer.save_final=false trainer.export=false, or another layout")


def save(state: TrainState, directory: Path, extra: dict[str, Any] | None = None) -> Path:
    """Write `directory/step_<N>` (every process its shards); returns that path."""
    check_saveable(state.model)
    path = directory / f"step_{state.step:07d}"
    with warnings.catch_warnings():  # single-process runs: DCP warns that no process group exists
        warnings.filterwarnings("ignore", message=".*torch.distributed is .*")
        dcp.save({"train": state}, checkpoint_id=str(path))
    if _rank() == 0:
        meta = {"step": state.step, "world_size": dist.get_world_size() if dist.is_initialized() else 1,
                **(extra or {})}
        (path / "megaspec_train.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return path


def resolve_checkpoint(path: str | Path) -> Path:
    """A step directory as given, or the latest `step_<N>` inside a checkpoints directory."""
    p = Path(path)
    if (p / ".metadata").is_file():
        return p
    steps = []
    for child in p.glob("step_*") if p.is_dir() else []:
        match = STEP_DIR.match(child.name)
        if match and (child / ".metadata").is_file():
            steps.append((int(match.group(1)), child))
    steps.sort()
    if not steps:
        raise SpecError(f"trainer.resume: no DCP checkpoint at {p} (expected a step_<N> directory "
                        "holding .metadata, or a directory of them)")
    return steps[-1][1]


def _config_changes(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """'field: saved -> now' for every model config field that differs (named configs as name.field)."""
    def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    a, b = flat(saved), flat(now)
    return [f"{k}: {a.get(k)} -> {b.get(k)}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def load(state: TrainState, path: str | Path, model_config: dict[str, Any] | None = None) -> Path:
    """Load a checkpoint into `state` (model, optimizer and step), resharding as needed.

    With `model_config` (what `save` recorded as extra), a checkpoint of a differently
    sized model is refused with the fields that differ, before any tensor is read.
    """
    found = resolve_checkpoint(path)
    meta_file = found / "megaspec_train.json"
    if model_config is not None and meta_file.is_file():
        saved = json.loads(meta_file.read_text(encoding="utf-8")).get("model_config")
        changes = _config_changes(saved, model_config) if saved is not None else []
        if changes:
            raise SpecError(f"trainer.resume: {found} holds a different model; model.config differs in "
                            + "; ".join(changes))
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.distributed is .*")
            dcp.load({"train": state}, checkpoint_id=str(found))
    except (RuntimeError, ValueError, KeyError) as exc:  # DCP's CheckpointException is a RuntimeError
        first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise SpecError(f"trainer.resume: cannot load {found} into this model: {first}") from exc
    return found


def export(path: Path, spec: Any, configs: Any, allow: tuple[str, ...], target: Path) -> Path:
    """Read a DCP checkpoint's model weights into a plain model and save it as one megaspec checkpoint.

    Reading the checkpoint back (one process, no collectives) works for every layout,
    pipeline stages included: the shards of all processes are on disk.
    """
    from megaspec.build import build_module, materialize
    from megaspec.checkpoint import save as save_model

    # Built and initialised as usual, so buffers that no checkpoint holds (RoPE tables) are set.
    model = materialize(build_module(spec, configs, device="meta", allow_imports=allow), "cpu")
    weights = model.state_dict()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is .*")
        dcp.load({"train": {"model": weights}}, checkpoint_id=str(path), no_dist=True)
    model.load_state_dict(weights)
    return save_model(model, target)
