"""What `megaspec build` does: build, summarise, and time a forward pass."""

from __future__ import annotations

import time
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from megaspec.build import build_module, materialize
from megaspec.checkpoint import checkpoint_inputs
from megaspec.configs import root_config
from megaspec.inputs import model_inputs
from megaspec.memory import available_memory, human_bytes, parameter_bytes, training_memory
from megaspec.options import BuildOptions, validated
from megaspec.summary import count_parameters, format_tree, forward_flops, slot_rows

# Real weights only when they take at most this share of the available memory,
# leaving room for activations: a too-large model stays on the meta device.
MEMORY_SHARE = 0.5


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def build_and_report(cfg: Any, out: Any = print) -> dict[str, Any]:
    """Build the configured model, print its summary, run one forward; return the figures."""
    opts = validated(BuildOptions, _plain(cfg.get("build")), "build")
    # `+checkpoint=DIR`: a saved megaspec checkpoint's spec, config and weights replace the composed model;
    # import paths it may name are the user's own allow_imports, never the checkpoint's.
    checkpoint = cfg.get("checkpoint")
    if checkpoint is not None:
        spec, configs, allow = checkpoint_inputs(str(checkpoint), tuple(_plain(cfg.get("allow_imports")) or ()))
    else:
        spec, configs, allow = model_inputs(cfg)
    config = root_config(spec, configs)
    torch.manual_seed(opts.seed)
    model = build_module(spec, configs, device="meta", allow_imports=allow)
    total = count_parameters(model)
    weights = parameter_bytes(model)
    seq = min(opts.seq_len, config.max_position_embeddings)
    batch = opts.batch_size
    flops = forward_flops(model, seq)

    sources = cfg.get("sources") or {}
    if checkpoint:
        sources = {"model": f"checkpoint {checkpoint}", "spec": f"{checkpoint}/megaspec.yaml"}
    out(f"model: {sources.get('model', 'inline config')}   spec: {sources.get('spec', spec.file or 'inline')}")
    out(format_tree(slot_rows(model)))
    out(f"total parameters: {total:,}")
    if flops is not None:
        per_token = flops / seq
        out(f"FLOPs per token: {per_token / 1e9:.3f} GFLOP forward, {3 * per_token / 1e9:.3f} GFLOP training "
            f"(at {seq} tokens of context)")
    training = training_memory(model, config.num_layers, config.hidden_size, config.num_attention_heads,
                               config.vocab_size, batch, seq)
    out(f"memory: weights {human_bytes(weights)}; training with AdamW about "
        f"{human_bytes(training.weights + training.gradients + training.optimizer)} (weights, gradients, AdamW "
        f"moments) plus activations (about {human_bytes(training.activations)} at [{batch}, {seq}])")

    device = opts.device
    free = available_memory()
    # Loading a checkpoint holds its tensors and the model's at once; the forward needs its activations.
    need = weights * (2 if checkpoint else 1) + training.activations
    result: dict[str, Any] = {"parameters": total, "flops_per_token": flops and flops / seq, "device": "meta"}
    if getattr(model, "example_inputs", None) is None:
        out(f"built on the meta device: {type(model).__name__} has no example_inputs(), so no forward pass was run")
        return result
    if device == "meta" or need > MEMORY_SHARE * free:
        if device != "meta":
            out(f"built on the meta device: the weights need {human_bytes(weights)} and "
                f"{human_bytes(free)} is available; no forward pass was run")
        else:
            out("built on the meta device (build.device=meta); no forward pass was run")
        return result
    target = "cpu" if device == "auto" else device
    start = time.perf_counter()
    if checkpoint:
        from megaspec.checkpoint import load_weights

        load_weights(model, str(checkpoint), target)
    else:
        materialize(model, target)
    build_s = time.perf_counter() - start
    model.eval()
    inputs = model.example_inputs(batch=batch, seq=seq, device=target)
    with torch.no_grad():
        model(**inputs)  # warm-up: first-call allocations are not the model's speed
        start = time.perf_counter()
        output = model(**inputs)
        forward_s = time.perf_counter() - start
    logits = getattr(output, "logits", None)
    shape = f" -> logits {tuple(logits.shape)}" if logits is not None else ""
    out(f"weights materialised on {target} in {build_s * 1e3:.0f} ms")
    out(f"forward pass on random tokens [{batch}, {seq}]{shape}: {forward_s * 1e3:.1f} ms")
    result.update(device=target, forward_s=forward_s)
    return result
