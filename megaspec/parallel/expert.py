"""Expert parallelism: each rank holds num_moe_experts / EP experts; tokens reach them by all-to-all.

Any module registered as kind `experts` works, if it follows the experts'
interface: `forward(hidden [t, h], probs [t, k], indices [t, k], tokens_per_expert
[E]) -> [t, h]`, parameters stacked by expert on dim 0, and a `num_experts`
attribute. The dispatch and combine are forward hooks, so the experts' own code runs unchanged on its local experts.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh

from megaspec.errors import SpecError
from megaspec.registry import iter_entries


def experts_of(model: nn.Module) -> list[nn.Module]:
    """Every module registered as kind `experts`."""
    names = {e.name for e in iter_entries() if e.kind == "experts"}
    return [m for m in model.modules() if getattr(m, "_megaspec_name", None) in names]


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


def apply_ep(model: nn.Module, mesh: DeviceMesh) -> list[nn.Module]:
    """Keep this rank's experts (still on the meta device) and route tokens to them; returns the experts modules."""
    ep, rank = mesh.size(), mesh.get_local_rank()
    found = experts_of(model)
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
