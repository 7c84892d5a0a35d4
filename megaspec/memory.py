"""Memory estimates, checked before anything is allocated.

A spec or checkpoint can ask for any size. Every real (non-meta) build, every
checkpoint load and `megaspec train` first compares what it will allocate with
what the device has, and a model that does not fit is a SpecError stating both
numbers and the ways out, instead of an allocator crash or the OOM killer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from megaspec.errors import SpecError

WAYS_OUT = ("use smaller sizes (model.config.*), build on the meta device to inspect the model without memory "
            "(device=\"meta\"; megaspec build build.device=meta), or spread it over more processes or devices "
            "(torchrun --nproc-per-node N -m megaspec train parallel=fsdp)")


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def available_memory(device: str | torch.device = "cpu") -> int:
    """Bytes that can be allocated on `device` now (MemAvailable on Linux CPUs, free memory on a GPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        check_device(device)
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_device(device: str | torch.device) -> None:
    """Refuse a CUDA device this machine does not have, before anything is placed on it."""
    device = torch.device(device)
    if device.type != "cuda":
        return
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if (device.index or 0) >= count:
        have = f"{count} CUDA device(s)" if count else "no CUDA device"
        raise SpecError(f"device '{device}' was asked for, but this machine has {have}; use cpu (or auto)")


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of all unique parameters and buffers (meta tensors count at their real size)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def check_fits(need: int, device: str | torch.device, what: str, ways_out: str = WAYS_OUT) -> None:
    """Refuse, with both numbers and the ways out, when `need` bytes exceed what `device` has available."""
    device = torch.device(device)
    if device.type == "meta":
        return
    have = available_memory(device)
    if need > have:
        raise SpecError(f"{what} needs about {human_bytes(need)} on {device.type}, but {human_bytes(have)} is "
                        f"available; {ways_out}")


def check_weights_fit(model: nn.Module, device: str | torch.device | None, what: str = "the model") -> None:
    """Before a meta-built model is materialised on `device`: do its weights and buffers fit?"""
    check_fits(parameter_bytes(model), device or "cpu", f"{what} (its weights and buffers)")


@dataclass(frozen=True)
class TrainingMemory:
    """What training one model takes, in bytes, for the whole job (before sharding over processes)."""

    weights: int
    gradients: int
    optimizer: int
    activations: int  # of one micro-batch, per process

    def per_process(self, world_size: int) -> int:
        """Weights, gradients and optimizer state sharded over the processes, plus one micro-batch's activations."""
        return (self.weights + self.gradients + self.optimizer) // max(world_size, 1) + self.activations

    def describe(self, world_size: int) -> str:
        """The estimate, part by part."""
        shared = f" shared by {world_size} processes" if world_size > 1 else ""
        return (f"weights {human_bytes(self.weights)} + gradients {human_bytes(self.gradients)} + AdamW state "
                f"{human_bytes(self.optimizer)}{shared}, + activations {human_bytes(self.activations)} per process "
                "(Korthikanti et al. 2022: s*b*h*(34 + 5*a*s/h) bytes per layer at 16 bits, scaled to the dtype, "
                "plus the logits and their gradient)")


def training_memory(model: nn.Module, num_layers: int, hidden: int, heads: int, vocab: int, micro_batch: int,
                    seq_len: int, activation_bytes: int = 4) -> TrainingMemory:
    """Estimate training memory with AdamW: gradients as large as the weights, two moments each."""
    weights = parameter_bytes(model)
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    s, b, h, a = seq_len, micro_batch, hidden, heads
    per_layer = s * b * h * (34 + 5 * a * s / h) * activation_bytes / 2
    logits = 2 * b * s * vocab * 4  # fp32 logits and their gradient in the loss
    return TrainingMemory(weights, trainable, 2 * trainable, int(num_layers * per_layer + logits))
