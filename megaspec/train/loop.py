"""The training loop: build (meta, then materialise), parallelise, train, log, checkpoint.

One code path for one process and for many: under torchrun every process runs
this with the same config, reads its slice of each global batch, and
gradients are averaged across processes, so the loss trajectory does not
depend on the world size or on how the batch is split into micro-batches.
"""

from __future__ import annotations

import copy
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

import megaspec.train.checkpoint as checkpoint
from megaspec.build import build_module
from megaspec.configs import root_config
from megaspec.errors import SpecError
from megaspec.inputs import model_inputs
from megaspec.memory import WAYS_OUT, check_device, check_fits, training_memory
from megaspec.options import TrainerOptions, validated
from megaspec.record import build_record
from megaspec.summary import count_parameters, forward_flops
from megaspec.train.balance import ExpertBiasUpdater
from megaspec.train.data import Prepared, datasets, micro_batches, prepare_data
from megaspec.train.evaluate import held_out_loss, perplexity
from megaspec.train.metrics import MetricsFile, ProgressBar, peak_flops, plot_loss, read_metrics
from megaspec.train.optim import clip_grad_norm, lr_at, make_optimizer, set_lr
from megaspec.train.record import RunRecord
from megaspec.train.tokenizer import save_tokenizer

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}
# Root modules whose forward(input_ids, labels=input_ids) returns the next-token loss.
CAUSAL_LMS = ("gpt_model",)


@dataclass(frozen=True)
class Dist:
    """Where this process sits: rank, world size and device."""

    rank: int
    world_size: int
    device: torch.device
    owns_group: bool  # this module started the process group, so it also ends it


def init_distributed(device_opt: str) -> Dist:
    """Join the torchrun process group (when there is one) and pick this process's device."""
    if device_opt not in ("auto", "cuda", "cpu"):
        raise SpecError(f"trainer.device must be auto, cpu or cuda, got {device_opt!r}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_opt == "cuda" or (device_opt == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        check_device(device)
        torch.cuda.set_device(device)
    owns = False
    if world > 1 and not dist.is_initialized():
        # gloo carries the CPU-side collectives (checkpoint metadata, object broadcasts) on GPUs too.
        dist.init_process_group("cuda:nccl,cpu:gloo" if use_cuda else "gloo")
        owns = True
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    return Dist(rank, world, device, owns)


def _batch_sizes(opts: dict[str, Any], dp_size: int) -> tuple[int, int, int]:
    """(global, micro, accumulation steps) from trainer.global_batch_size / micro_batch_size."""
    global_bs = int(opts["global_batch_size"])
    micro = int(opts.get("micro_batch_size") or global_bs // dp_size)
    if micro < 1 or global_bs % (micro * dp_size):
        raise SpecError(
            f"trainer.global_batch_size ({global_bs}) must be a multiple of trainer.micro_batch_size "
            f"({micro}) x the data-parallel size ({dp_size})")
    return global_bs, micro, global_bs // (micro * dp_size)


def _fit_vocab(cfg: DictConfig, prepared: Prepared, out: Callable[[str], None]) -> None:
    """Size the model's vocabulary to the tokenizer's unless told not to."""
    data = cfg.get("data") or {}
    config = cfg.model.config
    if prepared.tokenizer is None or not data.get("fit_vocab_size", True) or "vocab_size" not in config:
        return
    wanted = prepared.tokenizer.vocab_size
    if config.vocab_size != wanted:
        out(f"model.config.vocab_size: {config.vocab_size} -> {wanted} (the tokenizer's; "
            "data.fit_vocab_size=false keeps the model's)")
        with open_dict(cfg):
            config.vocab_size = wanted


def check_causal_lm(model: nn.Module) -> None:
    """Refuse models whose forward(input_ids, labels=input_ids) is not a next-token loss."""
    root = build_record(model).modules[""].name
    if root not in CAUSAL_LMS:
        raise SpecError(f"megaspec train trains decoder-only language models ({', '.join(CAUSAL_LMS)} at the "
                        f"spec root, e.g. model=gpt2, llama or mixtral); this model is '{root}'")


def _parallelize(model: nn.Module, cfg: DictConfig, env: Dist, seed: int) -> tuple[nn.Module, Any]:
    """Apply the `parallel` plans (FSDP2 data parallel by default) and materialise; returns (model, its state)."""
    from megaspec.parallel import build_mesh, parallel_config, parallel_state, parallelize

    pc = parallel_config(cfg)
    mesh = build_mesh(pc, env.device.type, build_record(model).configs) if env.world_size > 1 else None
    # Initialisation is seeded per module from `seed`: the same weights at any world size and layout.
    model = parallelize(model, pc, mesh, device=env.device, seed=seed)
    return model, parallel_state(model)


def _grad_sync(model: nn.Module, sync: bool) -> None:
    """FSDP2: reduce-scatter gradients only after the last micro-batch of a step."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(sync)


def _mean_over_ranks(values: torch.Tensor, env: Dist) -> torch.Tensor:
    """The mean over every process (tensor- and pipeline-parallel peers hold equal values already)."""
    if env.world_size > 1:
        values = values.to(env.device)
        dist.all_reduce(values)  # gloo has no AVG: sum, then divide
        values = values / env.world_size
    return values.cpu()


def _agree_on_dir(run_dir: Path, env: Dist) -> Path:
    """Every process uses rank 0's run directory (its clock named it)."""
    if env.world_size == 1:
        return run_dir
    box = [str(run_dir)]
    dist.broadcast_object_list(box, src=0)
    return Path(box[0])


def _options(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    if cfg.get("trainer") is None:
        raise SpecError("the config has no 'trainer' group; compose it with the defaults of conf/config.yaml")
    trainer = validated(TrainerOptions, OmegaConf.to_container(cfg.trainer, resolve=True), "trainer").model_dump()
    data = OmegaConf.to_container(cfg.data, resolve=True) if cfg.get("data") is not None else {"name": "text"}
    return trainer, data


def _check_memory(model: nn.Module, config: Any, opts: dict[str, Any], env: Dist) -> None:
    """Refuse a run whose weights, gradients, AdamW state and activations cannot fit, before allocating them."""
    micro = int(opts.get("micro_batch_size") or max(int(opts["global_batch_size"]) // env.world_size, 1))
    estimate = training_memory(model, config.num_layers, config.hidden_size, config.num_attention_heads,
                               config.vocab_size, micro, int(opts["seq_len"]))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if env.device.type == "cpu" else 1
    # The processes on one host share its memory; each GPU has its own.
    need = estimate.per_process(env.world_size) * local
    check_fits(need, env.device, f"training this model ({estimate.describe(env.world_size)}; "
                                 f"{local} process(es) on this {env.device.type})",
               f"a smaller trainer.micro_batch_size or trainer.seq_len, or {WAYS_OUT}")


def train(cfg: DictConfig, run_dir: str | Path | None = None, log: Callable[[str], None] | None = None,
          keep_process_group: bool = False) -> list[dict[str, Any]]:
    """Train the configured model; returns the per-step records (rank 0 also writes them to run_dir).

    `keep_process_group`: leave the torchrun process group this call starts open, for the
    next run in the same processes (a sweep's next job); the caller ends it.
    """
    cfg = copy.deepcopy(cfg)  # fitting the vocabulary edits it: leave the caller's alone
    opts, data_opts = _options(cfg)
    env = init_distributed(str(opts.get("device", "auto")))
    try:
        run_dir = _agree_on_dir(Path(run_dir or Path("outputs") / time.strftime("%Y-%m-%d/%H-%M-%S")), env)
        record = RunRecord(run_dir, enabled=env.rank == 0)
        try:
            records = _train(cfg, opts, data_opts, env, run_dir, log, record)
        except BaseException as exc:
            record.fail(exc)
            raise
        record.finish()
        return records
    finally:
        if env.owns_group and not keep_process_group:
            dist.destroy_process_group()


def _forward_backward(model: nn.Module, parallel: Any, batches: list[torch.Tensor], env: Dist,
                      autocast_dtype: torch.dtype | None) -> torch.Tensor:
    """Accumulate the gradients of one step's micro-batches; returns [loss, aux_loss] (-1: none) means."""
    sums = torch.zeros(2)  # [loss, aux_loss] summed over micro-batches
    has_aux = False
    pipelined = parallel is not None and parallel.schedule is not None
    if pipelined:
        # Under pipeline parallelism the schedule splits the batch into its own micro-batches
        # (parallel.num_microbatches) and accumulates over them: hand it the whole local batch.
        batches = [torch.cat(batches)]
    for i, tokens in enumerate(batches):
        tokens = tokens.to(env.device, non_blocking=True)  # [micro, s]
        _grad_sync(model, i == len(batches) - 1)
        with torch.autocast(env.device.type, dtype=autocast_dtype or torch.float32,
                            enabled=autocast_dtype is not None):
            if pipelined:
                from megaspec.parallel import train_step

                # The schedule runs forward and backward over the stages; the loss comes back
                # averaged over the data-parallel ranks, the same on every process.
                loss = train_step(model, tokens)
            else:
                output = model(input_ids=tokens, labels=tokens)
                # The model's loss already includes auxiliary (e.g. MoE load-balancing) losses.
                (output.loss / len(batches)).backward()
                loss = output.loss.detach()
                aux = getattr(output, "aux_loss", None)
                if aux is not None:
                    sums[1] += aux.detach().float().cpu()
                    has_aux = True
        sums[0] += loss.float().cpu()
    means = _mean_over_ranks(sums / len(batches), env)
    return means if has_aux else means[:1]


def _train(cfg: DictConfig, opts: dict[str, Any], data_opts: dict[str, Any], env: Dist, run_dir: Path,
           log: Callable[[str], None] | None, record: RunRecord) -> list[dict[str, Any]]:
    lead = env.rank == 0

    def out(msg: str) -> None:
        if lead:
            (log or (lambda m: print(m, file=sys.stderr, flush=True)))(msg)

    seed, max_steps, seq_len = int(opts["seed"]), int(opts["max_steps"]), int(opts["seq_len"])
    precision = str(opts.get("precision", "fp32"))
    if precision not in PRECISIONS:
        raise SpecError(f"trainer.precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")

    # Tokenized once into memory-mapped files that every process (and every later run) reuses.
    prepared = prepare_data(data_opts, out)
    _fit_vocab(cfg, prepared, out)
    record.update(config=OmegaConf.to_container(cfg, resolve=True))
    spec, configs, allow = model_inputs(cfg)
    config = root_config(spec, configs)
    if seq_len > config.max_position_embeddings:
        raise SpecError(f"trainer.seq_len ({seq_len}) exceeds model.config.max_position_embeddings "
                        f"({config.max_position_embeddings})")
    eval_every, eval_batches = int(opts.get("eval_every") or 0), opts.get("eval_batches")

    # Meta build first: FLOPs are counted on it for free, then the plans are applied and
    # only this process's shards are materialised.
    model = build_module(spec, configs, device="meta", allow_imports=allow)
    check_causal_lm(model)
    n_params = count_parameters(model)
    _check_memory(model, config, opts, env)
    fwd = forward_flops(model, seq_len)
    train_flops_per_token = 3 * fwd / seq_len if fwd else 6 * n_params  # backward costs twice the forward
    model, parallel = _parallelize(model, cfg, env, seed)
    dp_rank, dp_size = (parallel.dp_rank, parallel.dp_size) if parallel is not None else (env.rank, env.world_size)
    global_bs, micro_bs, accum = _batch_sizes(opts, dp_size)
    data, held_out = datasets(prepared, seq_len, seed, config.vocab_size,
                              None if eval_batches is None else int(eval_batches) * global_bs)
    if eval_every and held_out is None:
        raise SpecError(f"trainer.eval_every={eval_every} needs held-out data: set data.val_fraction (> 0) or "
                        "data.val_path=FILE, or trainer.eval_every=0")
    if eval_every and eval_batches is None and prepared.kind == "synthetic":
        raise SpecError("trainer.eval_batches=null evaluates every held-out window, and synthetic data has no "
                        "end; set trainer.eval_batches")
    eval_count = held_out.batches(global_bs) if eval_every and held_out is not None else 0
    if eval_every and eval_count == 0:
        raise SpecError(f"the held-out split has fewer than one batch of trainer.global_batch_size={global_bs} "
                        f"windows of {seq_len} tokens; hold out more (data.val_fraction) or set "
                        "trainer.eval_batches")
    eval_count = min(eval_count, int(eval_batches)) if eval_batches is not None else eval_count
    if parallel is not None and parallel.schedule is not None and (global_bs // dp_size) % parallel.config.microbatches:
        raise SpecError(f"the batch of each data-parallel rank ({global_bs // dp_size} sequences) must be a "
                        f"multiple of the pipeline's micro-batches ({parallel.config.microbatches}); "
                        "change trainer.global_batch_size or parallel.num_microbatches")
    if opts.get("compile"):
        from megaspec.train.compile import compile_layers

        out(f"compiling {compile_layers(model)} transformer layers (torch.compile, each in place)")
    model.train()
    optimizer = make_optimizer(model, float(opts["lr"]), float(opts["weight_decay"]),
                               tuple(float(b) for b in opts["betas"]))  # type: ignore[arg-type]
    state = checkpoint.TrainState(model, optimizer)
    if opts.get("save_every") or opts.get("save_final", True) or opts.get("export", True) or opts.get("resume"):
        checkpoint.check_saveable(model)
    # Recorded in every checkpoint, so resuming a differently sized model fails with the difference.
    model_config = {name or "config": {k: v for k, v in c.model_dump(mode="json").items() if k in c.model_fields_set}
                    for name, c in configs.items()}
    if opts.get("resume"):
        found = checkpoint.load(state, opts["resume"], model_config)
        out(f"resumed from {found} at step {state.step}")

    autocast_dtype = PRECISIONS[precision]
    peak = opts.get("peak_flops")
    peak_source = "trainer.peak_flops"
    if lead and peak is None:
        peak, peak_source = peak_flops(env.device, autocast_dtype or torch.float32)
    if lead:
        out(f"training {n_params:,} parameters on {env.world_size} x {env.device.type}, {precision}; "
            f"global batch {global_bs} x {seq_len} tokens = {micro_bs} x {accum} accumulation x "
            f"{dp_size} data-parallel; {train_flops_per_token / 1e6:.2f} MFLOP/token; "
            f"peak {float(peak) / 1e9:.1f} GFLOP/s per device ({peak_source})")
        out(f"data: {prepared.description}")
        out(f"run directory: {run_dir}")
        if prepared.tokenizer is not None:
            save_tokenizer(prepared.tokenizer, run_dir)
    record.update(parameters=n_params, flops_per_token=train_flops_per_token, seq_len=seq_len,
                  global_batch_size=global_bs, world_size=env.world_size, data=prepared.description)

    metrics = MetricsFile(run_dir / "metrics.jsonl") if lead else None
    bar = ProgressBar(max_steps, state.step) if lead and opts.get("progress", True) else None
    save_every, log_every = int(opts.get("save_every") or 0), max(int(opts.get("log_every") or 1), 1)
    ckpt_dir = run_dir / str(opts.get("checkpoint_dir", "checkpoints"))
    clip = float(opts.get("grad_clip") or 0.0)
    pp_group = parallel.mesh["pp"].get_group() if parallel is not None and parallel.schedule is not None else None
    records: list[dict[str, Any]] = []
    # Expert-bias balancing sums its counts over the ranks that share this stage's layers.
    dp_group = parallel.mesh["dp"].get_group() if parallel is not None and parallel.mesh is not None else None
    balancer = ExpertBiasUpdater(model, dp_group)
    # A pipeline evaluates as it trains: the whole local batch goes to the schedule, which splits it.
    eval_micro_bs, eval_loss = micro_bs, None
    if pp_group is not None:
        from megaspec.parallel import eval_step

        eval_micro_bs, eval_loss = global_bs // dp_size, lambda tokens: eval_step(model, tokens)
    with_grads = [p for p in model.parameters() if p.requires_grad]
    # A pipeline's last stage holds a copy of a tied embedding; the first stage counts its gradient.
    tied_copy = (model.embedding.weight,) if pp_group is not None and getattr(model, "tied", False) \
        and getattr(model, "last", False) and not getattr(model, "first", True) else ()

    while state.step < max_steps:
        step = state.step  # 0-based index of the step being taken
        # Stateless per-step seeding: dropout draws depend only on (seed, step, rank), so a
        # resumed run repeats the uninterrupted one exactly.
        torch.manual_seed((seed * 1_000_003 + step) * 65_537 + env.rank + 1)
        lr = lr_at(step, float(opts["lr"]), float(opts["min_lr"]), int(opts["warmup_steps"]), max_steps)
        set_lr(optimizer, lr)
        start = time.perf_counter()
        batches = micro_batches(data, step, global_bs, micro_bs, dp_rank, dp_size)
        means = _forward_backward(model, parallel, batches, env, autocast_dtype)
        grad_norm = clip_grad_norm(with_grads, clip, pp_group, tied_copy)
        optimizer.step()
        balancer.step()
        optimizer.zero_grad(set_to_none=True)
        if env.device.type == "cuda":
            torch.cuda.synchronize(env.device)
        elapsed = time.perf_counter() - start
        state.step = step + 1

        loss = float(means[0])
        if not math.isfinite(loss):
            raise SpecError(f"the loss is {loss} at step {state.step}; lower trainer.lr or use precision=fp32")
        tokens_per_s = global_bs * seq_len / elapsed
        mfu = train_flops_per_token * tokens_per_s / (float(peak) * env.world_size) if lead else None
        row = {"step": state.step, "tokens": state.step * global_bs * seq_len, "loss": loss, "lr": lr,
               "grad_norm": grad_norm, "tokens_per_s": tokens_per_s, "mfu": mfu}
        if len(means) > 1:
            row["aux_loss"] = float(means[1])
        if eval_every and (state.step % eval_every == 0 or state.step == max_steps):
            row["val_loss"] = held_out_loss(model, held_out, eval_count, global_bs, eval_micro_bs, dp_rank,
                                            dp_size, env.device, autocast_dtype,
                                            lambda t: _mean_over_ranks(t, env), eval_loss)
            row["val_perplexity"] = perplexity(row["val_loss"])
        records.append(row)
        if metrics is not None:
            metrics.write(row)
        if bar is not None and (state.step % log_every == 0 or state.step == max_steps or "val_loss" in row):
            bar.update(state.step, loss, lr, tokens_per_s, mfu, row.get("val_loss"))
        if save_every and state.step % save_every == 0 and state.step < max_steps:
            checkpoint.save(state, ckpt_dir, {"model_config": model_config})

    if bar is not None:
        bar.close()
    export = bool(opts.get("export", True))
    if records and (opts.get("save_final", True) or export):
        path = checkpoint.save(state, ckpt_dir, {"model_config": model_config})
        out(f"checkpoint: {path}")
        if export:
            if env.world_size > 1:
                dist.barrier()  # every shard is written before rank 0 reads them back
            if lead:
                exported = checkpoint.export(path, spec, configs, allow, run_dir / "model")
                if prepared.tokenizer is not None:
                    save_tokenizer(prepared.tokenizer, exported)  # the model and its tokenizer travel together
                out(f"model: {exported} (megaspec.load(path), or megaspec build +checkpoint=PATH)")
    if lead:
        assert metrics is not None
        metrics.close()
        out(f"metrics: {metrics.path}")
        title = f"{(cfg.get('sources') or {}).get('model', 'model')}, data={data_opts.get('name')}"
        if plot_loss(read_metrics(metrics.path), run_dir / "loss.png", title=f"loss ({title})"):
            out(f"loss curve: {run_dir / 'loss.png'}")
        else:
            out("loss curve: skipped (pip install matplotlib, or megaspec[train])")
    return records
