"""`trainer.compile=true`: torch.compile each transformer layer in place, as TorchTitan does.

Compiling layer by layer keeps graphs small, and identical layers share one
compiled graph (their parameters are graph inputs), so compile time does not
grow with depth. In place (`Module.compile`), so parameter names, checkpoints
and parallel plans are unchanged.
"""

from __future__ import annotations

from torch import nn

from megaspec.errors import SpecError
from megaspec.record import has_record, modules_of_kind


def compile_layers(model: nn.Module) -> int:
    """Compile every transformer layer of `model` (the modules its record names as layers) in place; returns how many."""
    layers = modules_of_kind(model, "layer") if has_record(model) else []
    if not layers:
        raise SpecError("trainer.compile=true compiles each transformer layer, and this model has none")
    for layer in layers:
        layer.compile()
    return len(layers)
