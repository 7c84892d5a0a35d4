"""parallelize(model, cfg): the configured plans applied to a meta-built model, then its shards materialised."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh

from megaspec.errors import SpecError
from megaspec.parallel.config import ParallelConfig, parallel_config, validate_parallel
from megaspec.parallel.expert import apply_ep
from megaspec.parallel.fsdp import apply_fsdp
from megaspec.parallel.materialize import materialize_sharded
from megaspec.parallel.mesh import build_mesh, default_device_type, dim_rank, dim_size, world_size
from megaspec.parallel.pipeline import PipelineStageModel, build_schedule, tied_embedding_groups
from megaspec.parallel.recompute import apply_recompute
from megaspec.parallel.tp import apply_tp
from megaspec.record import attach_record, build_record, registered_modules

_STATE = "_megaspec_parallel_state"  # runtime handles (mesh, schedule): not part of the BuildRecord


@dataclass
class ParallelState:
    """What a parallelised model carries for its training step: the layout, and the pipeline schedule if any."""

    config: ParallelConfig
    mesh: DeviceMesh | None
    schedule: Any = None  # torch.distributed.pipelining schedule (pipeline_model_parallel_size > 1)
    tied_group: Any = None  # first + last stage, when the output layer is tied to the embedding

    @property
    def dp_rank(self) -> int:
        """This rank's data-parallel coordinate: which slice of the global batch it reads."""
        return dim_rank(self.mesh, "dp")

    @property
    def dp_size(self) -> int:
        """How many slices the global batch is split into."""
        return dim_size(self.mesh, "dp")


def _device(cfg: Any, mesh: DeviceMesh | None, device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    wanted = None
    try:
        wanted = cfg.get("trainer", {}).get("device")  # a composed config's trainer.device
    except AttributeError:
        pass
    kind = mesh.device_type if mesh is not None else ("cpu" if wanted == "cpu" else default_device_type())
    return torch.device("cuda", torch.cuda.current_device()) if kind == "cuda" else torch.device(kind)


def parallelize(model: nn.Module, cfg: Any, mesh: DeviceMesh | None = None, *,
                device: str | torch.device | None = None, seed: int | None = None) -> nn.Module:
    """Split a (meta-built) model as `cfg` says, then materialise this rank's shards.

    cfg: a ParallelConfig, its fields, or a composed config with a `parallel` group.
    Order: pipeline stage -> tensor parallel -> expert parallel -> recompute -> FSDP ->
    `to_empty` + layout-independent init from `seed` (default: drawn from torch's
    global RNG, so `torch.manual_seed` before this call fixes the weights). For
    pipeline parallelism the returned module is this rank's stage. Returns the
    model; `parallel_state(model)` is the ParallelState that `train_step` uses, and the
    model's BuildRecord gains the layout.
    """
    pc = parallel_config(cfg)
    world = world_size()
    record = build_record(model)
    qk_norms = [path for path in record.modules if path.rsplit(".", 1)[-1] in ("q_layernorm", "k_layernorm")]
    if qk_norms and pc.tensor_model_parallel_size > 1:  # the spec's choice, so checked on the model
        raise SpecError(f"QK-norm ({qk_norms[0]}) is not supported with tensor_model_parallel_size > 1 yet")
    validate_parallel(record.configs, pc, world)
    if mesh is None and world > 1:
        mesh = build_mesh(pc)
    dev = _device(cfg, mesh, device)
    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1, ()).item())  # the same on every rank after manual_seed
    meta = any(p.is_meta for p in model.parameters())
    pp, tp, ep, dp = (dim_size(mesh, d) for d in ("pp", "tp", "ep", "dp"))

    tied = bool(getattr(model, "share_embeddings_and_output_weights", False))
    # Which module is which, by object: found before any plan wraps or re-roots the model.
    registered = registered_modules(model)
    layers = [m for m, entry in registered.items() if entry.kind == "layer"]
    # The last pipeline stage computes the loss from logits, with the function the model declares.
    loss_function = getattr(model, "loss_function", None)
    if pp > 1:
        model = PipelineStageModel(model, dim_rank(mesh, "pp"), pp)
    if tp > 1:
        apply_tp(model, registered, mesh["tp"], pc.sequence_parallel)
    experts = apply_ep(registered, mesh["ep"]) if ep > 1 else []
    stage_layers = {id(m) for m in model.modules()}
    layers = [m for m in layers if id(m) in stage_layers]  # a pipeline stage holds only its own
    apply_recompute(model, layers, pc)
    if dp > 1:
        apply_fsdp(model, layers, mesh["dp"], pc.reshard_after_forward, mesh["edp"], experts)
    if meta:
        materialize_sharded(model, dev, seed)

    state = ParallelState(pc, mesh)
    if pp > 1:
        state.schedule = build_schedule(model, mesh, pc.pipeline_schedule, pc.microbatches, loss_function, dev)
        state.tied_group = tied_embedding_groups(mesh) if tied else None
    object.__setattr__(model, _STATE, state)
    attach_record(model, record.with_parallel(pc.model_dump()))
    return model


def parallel_state(model: nn.Module) -> ParallelState | None:
    """The runtime layout (mesh, pipeline schedule) `parallelize` gave the model; None if it was not parallelised."""
    return getattr(model, _STATE, None)


def local_batch(model: nn.Module, batch: Tensor) -> Tensor:
    """This rank's slice of a global batch [B, ...] (ranks that differ only in TP or PP read the same one)."""
    state = parallel_state(model)
    if state is None or state.dp_size == 1:
        return batch
    return batch.chunk(state.dp_size)[state.dp_rank]


def _mean_over(value: Tensor, mesh: DeviceMesh | None, dim: str) -> Tensor:
    if mesh is None or mesh[dim].size() == 1:
        return value
    dist.all_reduce(value, group=mesh[dim].get_group())  # gloo has no AVG: sum, then divide
    return value / mesh[dim].size()


def _run_schedule(state: ParallelState, input_ids: Tensor, labels: Tensor, forward_only: bool) -> Tensor:
    """One pass of the pipeline schedule over this rank's batch; the mean micro-batch loss, on every stage."""
    schedule = state.schedule
    run = schedule.eval if forward_only else schedule.step
    losses: list[Tensor] = []
    if schedule._stage.is_first:
        run(input_ids)
    elif schedule._stage.is_last:
        run(target=labels, losses=losses)
    else:
        run()
    loss = torch.stack(losses).mean().detach().float() if losses else torch.zeros((), device=input_ids.device)
    dist.all_reduce(loss, group=state.mesh["pp"].get_group())  # only the last stage's is non-zero
    return loss


def train_step(model: nn.Module, input_ids: Tensor, labels: Tensor | None = None, **inputs: Tensor) -> Tensor:
    """Forward and backward on this rank's batch; returns the loss averaged over the whole global batch.

    `inputs` are further model inputs (e.g. decoder_input_ids); pipelined models take tokens only.
    """
    labels = input_ids if labels is None else labels
    state = parallel_state(model)
    if state is None or state.schedule is None:
        loss = model(input_ids=input_ids, labels=labels, **inputs).loss
        loss.backward()
        loss = loss.detach().float()
    else:
        loss = _run_schedule(state, input_ids, labels, forward_only=False)
        if state.tied_group is not None:
            grad = model.embedding.weight.grad
            if grad is not None:
                dist.all_reduce(grad.to_local() if hasattr(grad, "to_local") else grad, group=state.tied_group)
    return _mean_over(loss, state.mesh if state else None, "dp")


@torch.no_grad()
def eval_step(model: nn.Module, input_ids: Tensor) -> Tensor:
    """Forward only on this rank's batch of a pipelined model; the loss averaged over the global batch, on every rank.

    The schedule splits the batch into its micro-batches as in training, but runs no backward.
    """
    state = parallel_state(model)
    assert state is not None and state.schedule is not None, "eval_step is for pipelined models"
    return _mean_over(_run_schedule(state, input_ids, input_ids, forward_only=True), state.mesh, "dp")
