"""Multi-process checks of megaspec.parallel: run as `python tests/parallel_worker.py --world N --out DIR SCENARIO...`.

Each process runs every named scenario (3 AdamW steps on a tiny model) and rank 0
writes the losses to DIR/results.json; tests compare them with `run_scenario`
in a single process. Also importable: `run_scenario` is the single-process reference.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import megaspec
from megaspec.parallel import ParallelConfig, local_batch, parallelize, train_step

STEPS = 3
BATCH, SEQ = 4, 16
TINY = ["model.config.num_layers=2", "model.config.hidden_size=32", "model.config.num_attention_heads=4",
        "model.config.ffn_hidden_size=64", "model.config.vocab_size=64",
        "model.config.hidden_dropout=0.0", "model.config.attention_dropout=0.0"]
POSITIONS = "model.config.max_position_embeddings=32"  # learned positions, or RoPE's table
MODELS = {
    "llama": ["model=llama", *TINY, POSITIONS, "model.config.num_query_groups=2"],
    "gpt": ["model=gpt2", *TINY, POSITIONS],  # tied output layer
    "mixtral": ["model=mixtral", *TINY, POSITIONS, "model.config.num_query_groups=2", "model.config.num_moe_experts=4",
                "model.config.ffn_hidden_size=32", "model.config.moe_aux_loss_coeff=0.0"],
    "t5": ["model=t5", *TINY, "model.config.kv_channels=8", "model.config.relative_attention_num_buckets=8",
           "model.config.relative_attention_max_distance=16"],
}
# name: (model, ParallelConfig fields, world size)
SCENARIOS: dict[str, tuple[str, dict, int]] = {
    "fsdp": ("llama", {"data_parallel_size": 2, "recompute_granularity": "full"}, 2),
    "tp": ("llama", {"tensor_model_parallel_size": 2}, 2),
    "tp_sp": ("llama", {"tensor_model_parallel_size": 2, "sequence_parallel": True}, 2),
    "pp_gpipe": ("gpt", {"pipeline_model_parallel_size": 2, "pipeline_schedule": "gpipe"}, 2),
    "pp_1f1b": ("gpt", {"pipeline_model_parallel_size": 2, "pipeline_schedule": "1f1b", "num_microbatches": 4}, 2),
    "ep": ("mixtral", {"expert_model_parallel_size": 2}, 2),
    "t5_tp": ("t5", {"tensor_model_parallel_size": 2}, 2),
    "fsdp_tp": ("llama", {"data_parallel_size": 2, "tensor_model_parallel_size": 2, "sequence_parallel": True}, 4),
}


def build(model: str) -> torch.nn.Module:
    """A tiny model of the named family, on the meta device."""
    return megaspec.build_model(megaspec.compose(MODELS[model]), device="meta")


def batches(model: str, steps: int = STEPS + 1) -> list[torch.Tensor]:
    """The global batches, the same in every process."""
    g = torch.Generator().manual_seed(1234)
    return [torch.randint(0, 64, (BATCH, SEQ), generator=g) for _ in range(steps)]


def step(model: torch.nn.Module, family: str, tokens: torch.Tensor) -> torch.Tensor:
    """One training step's forward and backward on this rank's slice; the global mean loss."""
    mine = local_batch(model, tokens)
    if family == "t5":  # encoder reads the tokens, decoder predicts them reversed
        return train_step(model, mine, mine.flip(1), decoder_input_ids=mine)
    return train_step(model, mine)


def param_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters this process holds (its shards)."""
    return sum((p.to_local() if hasattr(p, "to_local") else p).numel() * p.element_size() for p in model.parameters())


def run_scenario(name: str, out: Path | None = None) -> dict:
    """Train 3 steps under the scenario's layout (one process: no parallelism); losses and extras."""
    family, fields, _ = SCENARIOS[name]
    cfg = ParallelConfig(**fields) if dist.is_initialized() else ParallelConfig()
    model = parallelize(build(family), cfg, seed=7)
    result: dict = {"param_bytes": param_bytes(model)}
    if name == "fsdp_tp" and out is not None:  # the initial weights, gathered whole
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if dist.get_rank() == 0:
            torch.save(full, out / "fsdp_tp_init.pt")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = batches(family)
    losses = []
    for i in range(STEPS):
        if name in CHECKPOINTS and out is not None and i == STEPS - 1:
            save_checkpoint(model, optimizer, out / checkpoint_name(name))
        losses.append(float(step(model, family, data[i])))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    result["losses"] = losses
    one = out / "ep_ckpt_world1" if out is not None else None
    if name == "ep" and dist.is_initialized() and one is not None and one.exists():
        result["resumed_from_world1"] = resume(name, one)
    return result


CHECKPOINTS = ("fsdp", "ep")  # scenarios that save a checkpoint before their last step


def checkpoint_name(name: str) -> str:
    """Where the scenario saves its checkpoint (expert parallelism: per world size, to resume across them)."""
    if name == "fsdp":
        return "ckpt"
    return f"{name}_ckpt_world{dist.get_world_size() if dist.is_initialized() else 1}"


def resume(name: str, path: Path) -> float:
    """Load a checkpoint saved before the last step into a fresh model of the layout; the last step's loss."""
    from megaspec.train.checkpoint import TrainState, load

    family, fields, _ = SCENARIOS[name]
    cfg = ParallelConfig(**fields) if dist.is_initialized() else ParallelConfig()
    model = parallelize(build(family), cfg, seed=0)  # other weights: all come from the file
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    state = TrainState(model, optimizer)
    load(state, path)
    assert state.step == STEPS - 1
    return float(step(model, family, batches(family)[STEPS - 1]))


def save_checkpoint(model: torch.nn.Module, optimizer: torch.optim.Optimizer, path: Path) -> None:
    """A sharded DCP checkpoint of model and optimizer (megaspec.train's format)."""
    from megaspec.train.checkpoint import TrainState, save

    save(TrainState(model, optimizer, step=STEPS - 1), path)


def _worker(rank: int, world: int, port: int, out: str, names: list[str]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    torch.set_num_threads(1)
    results = {}
    for name in names:
        results[name] = run_scenario(name, Path(out))
        results[name]["param_bytes_per_rank"] = [0] * world
        counts = [None] * world
        dist.all_gather_object(counts, results[name]["param_bytes"])
        results[name]["param_bytes_per_rank"] = counts
    if rank == 0:
        (Path(out) / "results.json").write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("scenarios", nargs="+")
    args = parser.parse_args()
    mp.spawn(_worker, args=(args.world, free_port(), args.out, args.scenarios), nprocs=args.world, join=True)


if __name__ == "__main__":
    sys.exit(main())
