"""Tensor (and sequence) parallelism: each module's declared plan applied with DTensor's parallel styles.

DTensor's ColwiseParallel / RowwiseParallel accept only nn.Linear and nn.Embedding;
megaspec's linears and embeddings are their own small classes with the same
weight layout, so the styles below reuse DTensor's partition and layout logic
for any module with a `weight` (and optional `bias`).
"""

from __future__ import annotations

from functools import partial

from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)
from torch.distributed.tensor.placement_types import Placement, _StridedShard

from megaspec.errors import SpecError
from megaspec.parallel.plans import tp_plan_of
from megaspec.record import Registered

# Kinds whose weights must be split under tensor parallelism: one without a plan is an error.
MUST_SHARD = ("self_attention", "cross_attention", "mlp", "moe", "experts")


def _shard_params(module: nn.Module, mesh: DeviceMesh, placement: Placement, src_data_rank: int | None) -> None:
    """Replace the module's own parameters by DTensors with `placement`."""
    for name, param in list(module.named_parameters(recurse=False)):
        dist = distribute_tensor(param, mesh, [placement], src_data_rank=src_data_rank)
        module.register_parameter(name, nn.Parameter(dist, requires_grad=param.requires_grad))


class Colwise(ColwiseParallel):
    """Column-parallel for any `weight [out, in]` module; `fused` equal output blocks are split block by block."""

    def __init__(self, *, fused: int = 1) -> None:
        super().__init__()
        self.fused = fused
        # A fused [gate | up] weight: each rank takes the same slice of every block, so its
        # local output is [gate_r | up_r] and the module's chunk(2) still pairs them.
        self.placement: Placement = Shard(0) if fused == 1 else _StridedShard(0, split_factor=fused)

    def _partition(self, name: str, module: nn.Module, mesh: DeviceMesh) -> None:
        _shard_params(module, mesh, self.placement, self.src_data_rank)

    def _local_output(self, module: nn.Module, outputs: DTensor, mesh: DeviceMesh) -> Tensor:
        return outputs.to_local()  # this rank's output features (its heads, its slice of the FFN)

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        return distribute_module(
            module, device_mesh, self._partition,
            partial(self._prepare_input_fn, self.input_layouts, self.desired_input_layouts),
            self._local_output,
        )


class Rowwise(RowwiseParallel):
    """Row-parallel for any `weight [out, in]` module; partial outputs summed (or reduce-scattered)."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        self.desired_input_layouts = (Shard(-1),)
        return distribute_module(
            module, device_mesh, self._partition_linear_fn,
            partial(self._prepare_input_fn, self.input_layouts, self.desired_input_layouts),
            partial(self._prepare_output_fn, self.output_layouts, self.use_local_output),
        )


class VocabParallelEmbedding(RowwiseParallel):
    """An embedding table split over the vocabulary: each rank looks up its rows, outputs are summed."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        self.desired_input_layouts = (Replicate(),)
        return distribute_module(
            module, device_mesh, lambda n, m, mesh: _shard_params(m, mesh, Shard(0), self.src_data_rank),
            partial(self._prepare_input_fn, self.input_layouts, self.desired_input_layouts),
            partial(self._prepare_output_fn, self.output_layouts, self.use_local_output),
        )


class VocabParallelOutput(ParallelStyle):
    """An output layer split over the vocabulary (its own weight, or a tied one passed in); logits gathered."""

    def __init__(self, *, sequence_parallel: bool = False) -> None:
        self.input_layout: Placement = Shard(1) if sequence_parallel else Replicate()

    def _inputs(self, module: nn.Module, inputs: tuple, mesh: DeviceMesh) -> tuple:
        hidden, *rest = inputs  # [b, s, h], then (tied) the embedding's DTensor weight
        if not isinstance(hidden, DTensor):
            hidden = DTensor.from_local(hidden, mesh, [self.input_layout], run_check=False)
        return (hidden.redistribute(placements=[Replicate()]), *rest)

    def _outputs(self, module: nn.Module, outputs: DTensor, mesh: DeviceMesh) -> Tensor:
        # Logits [b, s, vocab / tp] on each rank -> the whole vocabulary, so any loss works unchanged.
        return outputs.redistribute(placements=[Replicate()]).to_local()

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        return distribute_module(
            module, device_mesh, lambda n, m, mesh: _shard_params(m, mesh, Shard(0), self.src_data_rank),
            self._inputs, self._outputs,
        )


class SequenceRedistribute(ParallelStyle):
    """Gather (Shard(1) -> Replicate) or scatter (Replicate -> Shard(1)) a module's first input over the sequence."""

    def __init__(self, gather: bool) -> None:
        self.layouts = ((Shard(1),), (Replicate(),)) if gather else ((Replicate(),), (Shard(1),))

    def _inputs(self, module: nn.Module, inputs: tuple, mesh: DeviceMesh) -> tuple:
        x, *rest = inputs
        if not isinstance(x, DTensor):
            x = DTensor.from_local(x, mesh, self.layouts[0], run_check=False)
        return (x.redistribute(placements=self.layouts[1]).to_local(), *rest)

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        # Hooks only: distribute_module would also turn the subtree's parameters into DTensors.
        module.register_forward_pre_hook(lambda m, inputs: self._inputs(m, inputs, device_mesh))
        return module


class SplitHeadsOutput(ParallelStyle):
    """A replicated module whose output [b, nh, ...] each rank cuts to its own heads (dim 1)."""

    def _outputs(self, module: nn.Module, outputs: Tensor, mesh: DeviceMesh) -> Tensor:
        # Backward gathers the heads' gradients, so the replicated weight's gradient is whole.
        whole = DTensor.from_local(outputs, mesh, [Replicate()], run_check=False)
        return whole.redistribute(placements=[Shard(1)]).to_local()

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        module.register_forward_hook(lambda m, inputs, outputs: self._outputs(m, outputs, device_mesh))
        return module


def make_style(style: str, sequence_parallel: bool) -> ParallelStyle | None:
    """The DTensor parallel style a plan's style name stands for (None: nothing to do)."""
    if style == "colwise":
        return Colwise()
    if style == "colwise_gated":
        return Colwise(fused=2)
    if style == "rowwise":
        return Rowwise(output_layouts=Shard(1) if sequence_parallel else Replicate())
    if style == "vocab_parallel_embedding":
        return VocabParallelEmbedding(input_layouts=Replicate(), output_layouts=Replicate())
    if style == "vocab_parallel_output":
        return VocabParallelOutput(sequence_parallel=sequence_parallel)
    if style == "split_heads_output":
        return SplitHeadsOutput()
    if not sequence_parallel:
        return None
    if style == "sequence_parallel":
        return SequenceParallel(use_local_output=True)
    if style in ("gather_sequence", "scatter_sequence"):
        return SequenceRedistribute(gather=style == "gather_sequence")
    raise SpecError(f"unknown tensor-parallel style '{style}'")


def apply_tp(model: nn.Module, registered: dict[nn.Module, Registered], mesh: DeviceMesh,
             sequence_parallel: bool = False) -> nn.Module:
    """Shard every module that declares a tp_plan over the 1-D tensor-parallel `mesh`, in place."""
    tp = mesh.size()
    if sequence_parallel and any(getattr(m, "cross_attention", None) is not None for m in model.modules()):
        raise SpecError("sequence_parallel is not supported for models with cross-attention (encoder-decoder) yet; "
                        "use tensor parallelism without it")
    planned = [(fqn, m, plan) for fqn, m in model.named_modules()
               if (plan := tp_plan_of(m, registered[m].name if m in registered else None))]
    covered: set[int] = set()
    for fqn, module, plan in planned:
        covered.add(id(module))
        for key, style in plan.items():
            if style == "per_rank":
                value = getattr(module, key)
                if value % tp:
                    raise SpecError(f"{fqn or '<root>'}.{key} ({value}) is not divisible by "
                                    f"tensor_model_parallel_size ({tp})")
                setattr(module, key, value // tp)
                continue
            target = module if key == "" else getattr(module, key, None)
            if not isinstance(target, nn.Module):
                continue  # an empty optional slot
            covered.add(id(target))
            if style == "sequence_parallel" and not any(True for _ in target.parameters()):
                continue  # an identity norm: local shards pass through unchanged
            parallel_style = make_style(style, sequence_parallel)
            if parallel_style is not None:
                parallelize_module(target, mesh, parallel_style)
    for fqn, module in model.named_modules():
        kind = registered[module].kind if module in registered else ""
        if kind in MUST_SHARD and id(module) not in covered and any(True for _ in module.parameters()):
            raise SpecError(
                f"{fqn}: {type(module).__qualname__} ({kind}) declares no tp_plan, so tensor parallelism "
                "cannot split it; add a `tp_plan` class attribute or megaspec.parallel.plans.register_tp_plan")
    return model
