"""One matmul for all experts: rows sorted by expert times a stacked weight [E, out, in]."""

import torch
import torch.nn.functional as F
from torch import Tensor

_TORCH_VERSION = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
# torch._grouped_mm exists from 2.8, with a CPU kernel from 2.9; its CUDA kernels need sm80+ and bf16.
_HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")
_CPU_GROUPED_MM = _HAS_GROUPED_MM and _TORCH_VERSION >= (2, 9)


def grouped_mm_supported(x: Tensor) -> bool:
    """Whether torch._grouped_mm runs for `x`'s device and dtype (in eager mode and under torch.compile)."""
    if not _HAS_GROUPED_MM:
        return False
    if x.dtype == torch.bfloat16 and x.device.type == "cuda":
        return torch.cuda.get_device_capability(x.device) >= (8, 0)
    if x.device.type == "cpu" and _CPU_GROUPED_MM:
        # The CPU kernel takes fp32 too, but torch.compile's shape propagation only knows bf16.
        return x.dtype == torch.bfloat16 or not torch.compiler.is_compiling()
    return False


def grouped_linear(x: Tensor, weight: Tensor, offsets: Tensor) -> Tensor:
    """x [n, in] with rows grouped by expert, weight [E, out, in] -> [n, out].

    Expert e owns rows offsets[e - 1] .. offsets[e] (offsets [E], int32, cumulative);
    rows past offsets[-1] belong to no expert and come back undefined (the caller masks them).
    """
    if x.is_meta:
        # Meta tensors carry no routing, only shapes; one dense matmul has the output's shape
        # and the same FLOPs as the grouped one, so FLOP counts on the meta device stay right.
        return F.linear(x, weight[0])
    if grouped_mm_supported(x):
        return torch._grouped_mm(x, weight.transpose(-2, -1), offs=offsets)
    # Fallback: one matmul per expert's contiguous segment (reads the sizes on the host).
    ends = offsets.tolist()
    starts = [0, *ends[:-1]]
    parts = [F.linear(x[s:e], w) for s, e, w in zip(starts, ends, weight.unbind(0))]
    parts.append(x.new_zeros(x.size(0) - ends[-1], weight.size(1)))  # rows of no expert
    return torch.cat(parts)
