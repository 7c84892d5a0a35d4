"""Small helpers shared by the built-in modules."""

from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor, nn

from megaspec.config import TransformerConfig

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Elements per random stream in init_normal_. Fixed (not derived from the thread
# count) so that a seed gives the same weights on any machine.
_CHUNK = 1 << 20


def params_dtype(config: TransformerConfig) -> torch.dtype:
    """The torch dtype parameters are created in (`config.params_dtype`)."""
    return _DTYPES[config.params_dtype]


def init_normal_(tensor: Tensor, std: float) -> Tensor:
    """Fill `tensor` in place from N(0, std^2); large CPU tensors are filled in parallel."""
    n_chunks = -(-tensor.numel() // _CHUNK)
    if tensor.device.type != "cpu" or n_chunks < 2 or not tensor.is_contiguous():
        return nn.init.normal_(tensor, mean=0.0, std=std)
    # CPU normal_ draws from one serial generator, which makes it the bulk of
    # materialising a model. Chunks with their own generators fill in parallel
    # (the kernel releases the GIL), seeded from the global one so that
    # torch.manual_seed still makes the result reproducible.
    flat = tensor.detach().view(-1)
    seeds = torch.randint(0, 2**62, (n_chunks,)).tolist()

    def fill(i: int) -> None:
        generator = torch.Generator().manual_seed(seeds[i])
        flat[i * _CHUNK : (i + 1) * _CHUNK].normal_(0.0, std, generator=generator)

    with ThreadPoolExecutor(max_workers=min(n_chunks, torch.get_num_threads())) as pool:
        list(pool.map(fill, range(n_chunks)))
    return tensor
