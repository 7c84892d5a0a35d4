"""Fused [gate | up] weights in DCP checkpoints.

Tensor parallelism splits a gated MLP's fused fc1 weight half by half (each rank keeps
gate_r and up_r), so a rank's rows are two blocks of the [2 * ffn, h] tensor, which a
DCP chunk (one offset, one size) cannot describe: the save failed with "overlapping
chunks". Such a tensor, and its optimizer state, is saved as the [2, ffn, h] view
instead, where a rank's rows are one block. Loading reads which shape the checkpoint
holds, so a checkpoint loads at any world size and layout, the old shape included.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.placement_types import _StridedShard

from megaspec.parallel.plans import tp_plan_of
from megaspec.record import has_record, registered_modules

MODEL, OPTIM = "train.model.", "train.optim.state."  # DCP keys of the model's and the optimizer's tensors


def fused_parameters(model: nn.Module) -> set[str]:
    """Names of the parameters laid out as two halves along dim 0 ([gate | up]), from the modules' tp plans."""
    names = {m: entry.name for m, entry in registered_modules(model).items()} if has_record(model) else {}
    fused = set()
    for prefix, module in model.named_modules():
        for key, style in (tp_plan_of(module, names.get(module)) or {}).items():
            target = module if key == "" else getattr(module, key, None)
            if style == "colwise_gated" and isinstance(target, nn.Module):
                base = ".".join(p for p in (prefix, key) if p)
                fused |= {f"{base}.{name}" if base else name for name, _ in target.named_parameters(recurse=False)}
    return fused


def _split_by_ranks(t: Tensor) -> bool:
    """True when this rank's share of a [2 * n, ...] tensor is two blocks (a strided split)."""
    return isinstance(t, DTensor) and any(isinstance(p, _StridedShard) for p in t.placements)


Bases = dict[tuple[str, str], Tensor]


def halves_for_checkpoint(model_sd: dict[str, Any], optim_sd: dict[str, Any], fused: set[str],
                          stored: Mapping[str, torch.Size] | None = None) -> tuple[dict, dict, Bases]:
    """State dicts with fused tensors (and their optimizer state) as [2, n, ...] views, and what those view.

    Saving (`stored` None): where a rank's rows are two blocks. Loading: where the checkpoint
    holds the [2, n, ...] shape (`stored`: DCP key -> shape of what was saved). The dicts given
    are not changed (the optimizer's own state may be among them).
    """
    model_sd = dict(model_sd)
    optim_sd = {**optim_sd, "state": {k: dict(v) for k, v in (optim_sd.get("state") or {}).items()}}
    bases: Bases = {}

    def split(container: dict[str, Any], key: str, ckpt_key: str) -> None:
        t = container.get(key)
        if not isinstance(t, Tensor) or t.dim() == 0:
            return
        want = _split_by_ranks(t) if stored is None else (
            ckpt_key in stored and len(stored[ckpt_key]) == t.dim() + 1)
        if want:
            bases[(ckpt_key, key)] = t
            container[key] = t.unflatten(0, (2, -1))  # a view: loading into it fills the tensor itself

    for name in fused:
        split(model_sd, name, MODEL + name)
        for state_name in list(optim_sd["state"].get(name) or {}):
            split(optim_sd["state"][name], state_name, f"{OPTIM}{name}.{state_name}")
    return model_sd, optim_sd, bases


def joined(model_sd: dict[str, Any], optim_sd: dict[str, Any], bases: Bases) -> None:
    """Put back, in place, the tensors halves_for_checkpoint viewed (they hold what was loaded into the views)."""
    for (ckpt_key, key), tensor in bases.items():
        if ckpt_key.startswith(MODEL):
            model_sd[key] = tensor
        else:
            name = ckpt_key.removeprefix(OPTIM).removesuffix(f".{key}")
            optim_sd["state"][name][key] = tensor
