"""Data parallelism with FSDP2: `fully_shard` per transformer layer, then at the root."""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.placement_types import _StridedShard


def _placement(param: nn.Parameter) -> Shard | None:
    """FSDP shards dim 0, except under a fused [gate | up] tensor-parallel split of dim 0: then dim 1."""
    if isinstance(param, DTensor) and any(isinstance(p, _StridedShard) for p in param.placements):
        return Shard(1) if param.ndim > 1 else None
    return None


def apply_fsdp(model: nn.Module, layers: list[nn.Module], mesh: DeviceMesh, reshard_after_forward: bool = True,
               expert_mesh: DeviceMesh | None = None, experts: list[nn.Module] = ()) -> nn.Module:
    """Shard parameters, gradients and optimizer state over `mesh`, one all-gather per layer.

    Expert weights that expert parallelism already split are sharded over the
    remaining `expert_mesh` instead (each expert is seen by every rank of `mesh`
    through all-to-all, so its gradient is divided by the whole data-parallel size).
    """
    for module in experts:
        # Even over one rank: this keeps the experts out of their layer's all-gather over `mesh`.
        fully_shard(module, mesh=expert_mesh, reshard_after_forward=reshard_after_forward)
        module.set_gradient_divide_factor(float(mesh.size()))
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward, shard_placement_fn=_placement)
    # The root owns what no layer does (embeddings, final norm, output layer); it is
    # needed again at once for backward, so it is not resharded.
    fully_shard(model, mesh=mesh, reshard_after_forward=False)
    return model
