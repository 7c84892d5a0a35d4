"""Materialise a sharded meta-device model: allocate each rank's shards, then initialise them.

Initialisation does not depend on the layout: each module is initialised from a
seed derived from (seed, its name), on full-size tensors, and each rank keeps
its slice. The same seed therefore gives the same full weights at any world
size, with any mix of tensor, data, expert or pipeline parallelism.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, distribute_tensor

from megaspec.init import check_buffers, init_method, poison_buffers

# A wrapper's prefix that is not part of a parameter's name (activation checkpointing).
_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.",)


def module_seed(seed: int, name: str) -> int:
    """The seed of one module's initialisation: a function of the base seed and its name only."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


@contextlib.contextmanager
def _full_size(module: nn.Module) -> Iterator[None]:
    """Swap the module's sharded parameters for full-size ones; afterwards keep this rank's slice."""
    # Expert parallelism keeps rows start:stop of `total` experts (dim 0) as the local tensor.
    experts = getattr(module, "_megaspec_expert_rows", None)
    swapped: dict[str, tuple[Tensor, nn.Parameter]] = {}
    for name, param in list(module._parameters.items()):
        if param is None or not (isinstance(param, DTensor) or experts):
            continue
        shape = (experts[0], *param.shape[1:]) if experts else param.shape
        device = param.to_local().device if isinstance(param, DTensor) else param.device
        full = nn.Parameter(torch.empty(shape, dtype=param.dtype, device=device), requires_grad=param.requires_grad)
        swapped[name] = (param, full)
        module._parameters[name] = full
    try:
        yield
    finally:
        for name, (sharded, full) in swapped.items():
            module._parameters[name] = sharded
            value = full.detach()[experts[1]:experts[2]] if experts else full.detach()
            if isinstance(sharded, DTensor):
                # Slicing needs no communication: every rank holds the same full tensor.
                value = distribute_tensor(value, sharded.device_mesh, sharded.placements, src_data_rank=None).to_local()
                sharded.to_local().copy_(value)
            else:
                sharded.copy_(value)


def init_sharded(model: nn.Module, seed: int) -> None:
    """Run every module's init_weights (else reset_parameters) once, layout-independently."""
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        for name, module in model.named_modules():
            init = init_method(module)
            if not callable(init):
                continue
            torch.manual_seed(module_seed(seed, name))
            with _full_size(module):
                init()


def materialize_sharded(model: nn.Module, device: str | torch.device, seed: int) -> nn.Module:
    """Allocate this rank's shards on `device` (`to_empty`) and initialise them from `seed`."""
    model.to_empty(device=device)
    with torch.no_grad():
        poisoned = poison_buffers(model)
    init_sharded(model, seed)
    check_buffers(poisoned)
    return model
