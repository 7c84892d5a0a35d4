"""Weight initialisation: fast, seeded normal fills on the CPU, and the checked init of a meta-built model.

CPU `normal_` draws from one serial generator, which makes it the bulk of
materialising a model. Large tensors are filled in fixed-size chunks, each with
its own generator seeded from the global one, so the chunks can run in
parallel threads (the kernel releases the GIL) while `torch.manual_seed` still
fixes the result, whatever the thread count.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch import Tensor, nn

from megaspec.errors import Problem, SpecError

# Elements per random stream. Fixed (not derived from the thread count) so that a
# seed gives the same weights on any machine.
CHUNK = 1 << 20

# (flat slice, std, seed) fills waiting for `batched_init` to run them.
_pending: list[tuple[Tensor, float, int]] | None = None


def _fill(job: tuple[Tensor, float, int]) -> None:
    flat, std, seed = job
    flat.normal_(0.0, std, generator=torch.Generator().manual_seed(seed))


def init_normal_(tensor: Tensor, std: float) -> Tensor:
    """Fill `tensor` in place from N(0, std^2); large CPU tensors are filled in parallel chunks.

    Inside `batched_init` a large tensor is filled when the block ends: do not read
    it back in the same init_weights.
    """
    n_chunks = -(-tensor.numel() // CHUNK)
    if tensor.device.type != "cpu" or n_chunks < 2 or not tensor.is_contiguous():
        return nn.init.normal_(tensor, mean=0.0, std=std)
    flat = tensor.detach().view(-1)
    # Seeds are drawn now, in module order, so deferring the fill changes no value.
    seeds = torch.randint(0, 2**62, (n_chunks,)).tolist()
    jobs = [(flat[i * CHUNK : (i + 1) * CHUNK], std, seed) for i, seed in enumerate(seeds)]
    if _pending is not None:
        _pending.extend(jobs)
        return tensor
    with ThreadPoolExecutor(max_workers=min(n_chunks, torch.get_num_threads())) as pool:
        list(pool.map(_fill, jobs))
    return tensor


@contextlib.contextmanager
def batched_init() -> Iterator[None]:
    """Defer the chunked fills inside the block and run them all in one thread pool at its end.

    One pool for the whole model keeps every thread busy; a pool per tensor idles
    whenever a tensor splits into fewer chunks than there are threads.
    """
    global _pending
    outer, _pending = _pending, []
    try:
        yield
        jobs = _pending
    finally:
        _pending = outer
    if jobs:
        with ThreadPoolExecutor(max_workers=torch.get_num_threads()) as pool:
            list(pool.map(_fill, jobs))


def init_method(module: nn.Module) -> Any:
    """The module's own initialiser: init_weights, else reset_parameters, else None."""
    return getattr(module, "init_weights", None) or getattr(module, "reset_parameters", None)


def init_weights(model: nn.Module) -> None:
    """Initialise every module's own parameters and buffers once (init_weights, else reset_parameters)."""
    for module in model.modules():
        init = init_method(module)
        if callable(init):
            init()


def poison_buffers(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """Fill every floating buffer with NaN, so a buffer no init recomputes cannot pass for a value."""
    poisoned = []
    for path, module in model.named_modules():
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is not None and buffer.is_floating_point():
                buffer.fill_(float("nan"))
                poisoned.append((path, module, name))
    return poisoned


def check_buffers(poisoned: list[tuple[str, nn.Module, str]]) -> None:
    """SpecError naming each buffer still holding the NaN poison: computed in __init__, lost by the meta build."""
    stale = [(path, module, name) for path, module, name in poisoned
             if getattr(module, name) is not None and torch.isnan(getattr(module, name)).any()]
    if stale:
        raise SpecError([Problem(
            f"buffer '{name}' of {type(module).__qualname__} has no value after the meta-device build: it was "
            f"computed in __init__, which runs on the meta device. Implement init_weights() (or "
            f"reset_parameters()) to compute it again; the builder calls it after allocating the module",
            f"{path}.{name}" if path else name) for path, module, name in stale])
