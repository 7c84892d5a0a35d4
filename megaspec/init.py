"""Weight initialisation helpers: fast, seeded normal fills on the CPU.

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

import torch
from torch import Tensor, nn

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
