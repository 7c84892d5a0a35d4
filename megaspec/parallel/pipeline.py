"""Pipeline parallelism: a decoder-only model cut at layer boundaries, run by torch.distributed.pipelining.

Each rank keeps one stage: the first embeds, every stage runs its run of layers,
the last one applies the final norm and the output layer; the schedule (GPipe or
1F1B) computes the loss on the last stage. Parameter names stay those of the
whole model (`decoder.layers.5.mlp...`), so checkpoints and initialisation do
not depend on the split.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from megaspec.errors import SpecError

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}


def stage_layers(num_layers: int, stages: int, stage: int) -> range:
    """The layers stage `stage` of `stages` holds: contiguous, the first stages one longer when uneven."""
    base, extra = divmod(num_layers, stages)
    start = stage * base + min(stage, extra)
    return range(start, start + base + (stage < extra))


class StageDecoder(nn.Module):
    """This stage's layers (keyed by their index in the whole model) and, on the last stage, the final norm."""

    tp_plan: ClassVar[dict[str, str]] = {"": "scatter_sequence", "final_layernorm": "sequence_parallel"}

    def __init__(self, layers: dict[str, nn.Module], final_layernorm: nn.Module | None) -> None:
        super().__init__()
        self.layers = nn.ModuleDict(layers)
        self.final_layernorm = final_layernorm if final_layernorm is not None else nn.Identity()

    def forward(self, hidden_states: Tensor, rotary: Any = None) -> Tensor:  # [b, s, h] -> [b, s, h]
        for layer in self.layers.values():
            hidden_states = layer(hidden_states, rotary=rotary)
        return self.final_layernorm(hidden_states)


class PipelineStageModel(nn.Module):
    """One pipeline stage of a decoder-only model (GPTModel's slots): token ids or hidden states in."""

    def __init__(self, model: nn.Module, stage: int, stages: int) -> None:
        super().__init__()
        for slot in ("embedding", "position_embedding", "decoder", "output_layer"):
            if not hasattr(model, slot):
                raise SpecError(f"pipeline parallelism splits decoder-only models (gpt_model's slots); "
                                f"{type(model).__name__} has no '{slot}'")
        self.first, self.last = stage == 0, stage == stages - 1
        self.tied = bool(getattr(model, "share_embeddings_and_output_weights", False))
        self.embedding_dropout = float(getattr(model, "embedding_dropout", 0.0))
        layers = model.decoder.layers
        ids = stage_layers(len(layers), stages, stage)
        # The last stage keeps the embedding too when the output layer is tied to it;
        # the two copies' gradients are summed after each backward (Megatron's embedding group).
        self.embedding = model.embedding if self.first or (self.last and self.tied) else None
        position = model.position_embedding
        # A position embedding without weights (RoPE) is a function of positions: every stage
        # computes its own; a learned table lives on the first stage only.
        stateless = position is not None and not any(True for _ in position.parameters())
        self.position_embedding = position if self.first or stateless else None
        self.decoder = StageDecoder({str(i): layers[i] for i in ids},
                                    model.decoder.final_layernorm if self.last else None)
        self.output_layer = model.output_layer if self.last else None

    def forward(self, inputs: Tensor) -> Tensor:
        """First stage: token ids [b, s]; others: hidden states [b, s, h]. Last stage returns logits."""
        if self.first:
            assert self.embedding is not None
            hidden_states = self.embedding(inputs)  # [b, s, h]
        else:
            hidden_states = inputs
        rotary = None
        if self.position_embedding is not None:
            positions = torch.arange(hidden_states.size(1), device=hidden_states.device).unsqueeze(0)  # [1, s]
            added, rotary = self.position_embedding(hidden_states, positions)
            if self.first:
                hidden_states = F.dropout(added, self.embedding_dropout, self.training)
        elif self.first:
            hidden_states = F.dropout(hidden_states, self.embedding_dropout, self.training)
        hidden_states = self.decoder(hidden_states, rotary)
        if not self.last:
            return hidden_states
        assert self.output_layer is not None
        weight = self.embedding.weight if self.tied and self.embedding is not None else None
        return self.output_layer(hidden_states, weight)  # [b, s, vocab]


def tied_embedding_groups(mesh: DeviceMesh) -> dist.ProcessGroup | None:
    """The group of the first and last stage with this rank's other coordinates (every rank creates all)."""
    ranks = mesh.mesh  # [pp, edp, ep, tp]
    mine = None
    for other in ranks[[0, -1]].reshape(2, -1).t().tolist():
        group = dist.new_group(other)
        if dist.get_rank() in other:
            mine = group
    return mine


def build_schedule(stage_model: nn.Module, mesh: DeviceMesh, schedule: str, microbatches: int,
                   loss_fn: Any, device: torch.device) -> Any:
    """The pipeline schedule (GPipe or 1F1B) over the mesh's `pp` dimension for this rank's stage."""
    pp = mesh["pp"]
    stage = PipelineStage(stage_model, pp.get_local_rank(), pp.size(), device, group=pp.get_group())
    # Gradients are averaged over micro-batches, so a step equals one on the whole batch.
    return SCHEDULES[schedule](stage, n_microbatches=microbatches, loss_fn=loss_fn, scale_grads=True)
