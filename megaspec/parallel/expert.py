"""Expert parallelism: each rank holds num_moe_experts / EP experts; tokens reach them by all-to-all.

Any module registered as kind `experts` works, if it follows the experts'
interface: `forward(hidden [t, h], probs [t, k], indices [t, k], tokens_per_expert
[E]) -> [t, h]`, parameters stacked by expert on dim 0, and a `num_experts`
attribute. The dispatch and combine are forward hooks, so the experts' own code runs unchanged on its local experts.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.placement_types import _StridedShard

from megaspec.errors import SpecError
from megaspec.record import Registered


class ExpertParallel:
    """Dispatch each (token, expert) assignment to the expert's rank, run local experts, send results back."""

    def __init__(self, num_experts: int, mesh: DeviceMesh) -> None:
        self.num_experts = num_experts
        self.ep = mesh.size()
        self.local = num_experts // self.ep
        self.group = mesh.get_group()
        self.route: tuple[Tensor, int, int, list[int], list[int]] | None = None

    def dispatch(self, module: nn.Module, inputs: tuple, mesh: DeviceMesh) -> tuple:
        hidden, probs, indices, _ = inputs  # [t, h], [t, k], [t, k], [E]
        t, k = indices.shape
        flat = indices.flatten()  # [t * k]; index E marks an assignment dropped over capacity
        order = flat.argsort(stable=True)
        kept = int((flat < self.num_experts).sum())
        order = order[:kept]  # assignments sorted by expert, hence by destination rank
        send_counts = torch.bincount(flat[order], minlength=self.num_experts)  # [E]
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)  # [ep * E/ep]: per source, per expert
        send_splits = send_counts.view(self.ep, self.local).sum(1).tolist()
        recv_splits = recv_counts.view(self.ep, self.local).sum(1).tolist()
        rows = all_to_all_single_autograd(hidden[order // k], recv_splits, send_splits, self.group)  # [n, h]
        weights = all_to_all_single_autograd(probs.flatten()[order], recv_splits, send_splits, self.group)  # [n]
        # Received rows come grouped by source rank, then by local expert.
        expert = torch.arange(self.local, device=flat.device).repeat(self.ep)  # [ep * E/ep]
        expert = expert.repeat_interleave(recv_counts)  # [n]
        self.route = (order, k, t, send_splits, recv_splits)
        per_expert = recv_counts.view(self.ep, self.local).sum(0)  # [E/ep]
        return rows, weights.unsqueeze(1), expert.unsqueeze(1), per_expert

    def combine(self, module: nn.Module, outputs: Tensor, mesh: DeviceMesh) -> Tensor:
        assert self.route is not None
        order, k, t, send_splits, recv_splits = self.route
        back = all_to_all_single_autograd(outputs, send_splits, recv_splits, self.group)  # [kept, h]
        # Each token sums its k experts' (probability-weighted) outputs.
        return back.new_zeros(t, back.size(-1)).index_add(0, order // k, back)  # [t, h]


def apply_ep(registered: dict[nn.Module, Registered], mesh: DeviceMesh) -> list[nn.Module]:
    """Keep this rank's experts (still on the meta device) and route tokens to them; returns the experts modules."""
    ep, rank = mesh.size(), mesh.get_local_rank()
    found = [m for m, entry in registered.items() if entry.kind == "experts"]
    for module in found:
        total = module.num_experts
        if total % ep:
            raise SpecError(f"num_moe_experts ({total}) is not divisible by expert_model_parallel_size ({ep})")
        local = total // ep
        for name, param in list(module.named_parameters(recurse=False)):
            if not param.is_meta:
                raise SpecError("expert parallelism needs a model built on the meta device "
                                "(megaspec.build_model(cfg, device='meta'))")
            shape = (local, *param.shape[1:])
            module.register_parameter(name, nn.Parameter(torch.empty(shape, dtype=param.dtype, device="meta"),
                                                         requires_grad=param.requires_grad))
        # Initialisation draws all experts' weights, then keeps these rows (layout-independent init).
        module._megaspec_expert_rows = (total, rank * local, (rank + 1) * local)
        module.num_experts = local
        style = ExpertParallel(total, mesh)
        # Hooks around the experts' own forward; the local experts stay plain tensors (FSDP shards them further).
        module.register_forward_pre_hook(lambda m, inputs, s=style: s.dispatch(m, inputs, mesh))
        module.register_forward_hook(lambda m, inputs, outputs, s=style: s.combine(m, outputs, mesh))
    return found


# ---- checkpoints: local experts seen as shards of the global [E, ...] tensors ----

def _clean(name: str) -> str:
    """A module name as state dicts key it (without compile or activation-checkpoint wrappers)."""
    for wrapper in ("_orig_mod.", "_checkpoint_wrapped_module."):
        name = name.replace(wrapper, "")
    return name


Spec = tuple[DeviceMesh, tuple, tuple[int, ...]]  # (mesh, placements, shape) of a global DTensor


def _global_spec(param: Tensor, total: int, mesh: DeviceMesh) -> Spec | None:
    """(mesh, placements, shape) of the global [E, ...] tensor whose shard this rank's expert weight is."""
    if not isinstance(param, DTensor):  # expert parallelism always comes with FSDP over "edp"
        return None
    shape = (total, *param.shape[1:])
    ep, edp = mesh["ep"], mesh["edp"]
    if edp.size() == 1:
        return ep, (Shard(0),), shape
    # Dim 0 is split by ep first (whole experts per rank), then FSDP splits each rank's experts over edp:
    # listed in mesh order (edp, ep), the edp split is the strided one.
    return mesh["edp", "ep"], (_StridedShard(0, split_factor=ep.size()), Shard(0)), shape


def expert_checkpoint_specs(model: nn.Module, mesh: DeviceMesh | None) -> dict[str, Spec]:
    """State-dict name -> (mesh, placements, global shape) of every expert-parallel weight."""
    specs = {}
    for name, module in model.named_modules():
        rows = getattr(module, "_megaspec_expert_rows", None)
        if rows is None or mesh is None:
            continue
        for pname, param in module.named_parameters(recurse=False):
            spec = _global_spec(param, rows[0], mesh)
            if spec is not None:
                specs[_clean(f"{name}.{pname}" if name else pname)] = spec
    return specs


def unsupported_expert_checkpoint(model: nn.Module) -> str | None:
    """Why this model's expert weights cannot be checkpointed as global tensors, if they cannot."""
    for module in model.modules():
        rows = getattr(module, "_megaspec_expert_rows", None)
        for param in module.parameters(recurse=False) if rows is not None else ():
            if not isinstance(param, DTensor) or len(param.placements) != 1 or param.placements[0] != Shard(0):
                return "expert weights that are not sharded by FSDP on dim 0"
            local, edp = rows[2] - rows[1], param.device_mesh.size()
            if local % edp:
                return (f"num_moe_experts / expert_model_parallel_size ({local}) not divisible by the "
                        f"expert data-parallel size ({edp})")
    return None


def _to_global(value: Any, spec: Spec) -> Any:
    mesh, placements, shape = spec
    if not isinstance(value, DTensor) or value.ndim != len(shape):
        return value  # e.g. the optimizer's step count
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(value.to_local(), mesh, placements, run_check=False, shape=shape, stride=stride)


def _to_local(value: Any, like: DTensor) -> Any:
    if not isinstance(value, DTensor) or value.shape == like.shape:
        return value  # not a global expert tensor
    return DTensor.from_local(value.to_local(), like.device_mesh, like.placements, run_check=False,
                              shape=like.shape, stride=like.stride())


def _convert(model_sd: dict[str, Any], optim_sd: dict[str, Any], names: list[str], fn: Any) -> tuple[dict, dict]:
    """Copies of both state dicts with `fn(name, value)` applied to the named weights and their optimizer state.

    Copies, because the optimizer's state dict shares its per-parameter dicts with the optimizer itself.
    """
    model_sd, states = dict(model_sd), dict(optim_sd.get("state", {}))
    for name in names:
        if name in model_sd:
            model_sd[name] = fn(name, model_sd[name])
        if name in states:
            states[name] = {key: fn(name, value) for key, value in states[name].items()}
    return model_sd, {**optim_sd, "state": states} if "state" in optim_sd else optim_sd


def globalize_experts(model: nn.Module, mesh: DeviceMesh | None, model_sd: dict[str, Any],
                      optim_sd: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Expert weights and their optimizer state as shards of the global [E, ...] tensors.

    Every rank holds different experts under the same names; as global DTensors sharded
    by expert over `ep`, a checkpoint holds every expert once and loads at any layout.
    """
    specs = expert_checkpoint_specs(model, mesh)
    return _convert(model_sd, optim_sd, list(specs), lambda name, value: _to_global(value, specs[name]))


def localize_experts(model: nn.Module, mesh: DeviceMesh | None, model_sd: dict[str, Any],
                     optim_sd: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Undo `globalize_experts`: back to the FSDP shards of this rank's experts."""
    specs = expert_checkpoint_specs(model, mesh)
    if not specs:
        return model_sd, optim_sd
    params = {_clean(k): v for k, v in model.named_parameters()}
    return _convert(model_sd, optim_sd, list(specs), lambda name, value: _to_local(value, params[name]))
