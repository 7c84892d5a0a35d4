"""What `megaspec build` does: build, summarise, and time a forward pass."""

from __future__ import annotations

import time
from typing import Any

import torch

from megaspec.build import build_module, materialize
from megaspec.configs import root_config
from megaspec.inputs import model_inputs
from megaspec.memory import available_memory, human_bytes, parameter_bytes
from megaspec.summary import count_parameters, format_tree, forward_flops, slot_rows

# Real weights only when they take at most this share of the available memory,
# leaving room for activations: a too-large model stays on the meta device.
MEMORY_SHARE = 0.5


def build_and_report(cfg: Any, out: Any = print) -> dict[str, Any]:
    """Build the configured model, print its summary, run one forward; return the figures."""
    # `+checkpoint=DIR`: a saved megaspec checkpoint's spec, config and weights replace the composed model.
    checkpoint = cfg.get("checkpoint")
    spec, configs, allow = model_inputs(str(checkpoint) if checkpoint else cfg)
    config = root_config(spec, configs)
    opts = cfg.get("build", {}) or {}
    torch.manual_seed(int(opts.get("seed", 0)))
    model = build_module(spec, configs, device="meta", allow_imports=allow)
    total = count_parameters(model)
    weights = parameter_bytes(model)
    seq = min(int(opts.get("seq_len", 128)), config.max_position_embeddings)
    batch = int(opts.get("batch_size", 1))
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
    dtype_bytes = weights / max(total, 1)
    out(f"memory: weights {human_bytes(weights)}; training with AdamW about "
        f"{human_bytes(weights + total * (dtype_bytes + 8))} (weights, grads, fp32 moments) before activations")

    device = str(opts.get("device", "auto"))
    free = available_memory()
    result: dict[str, Any] = {"parameters": total, "flops_per_token": flops and flops / seq, "device": "meta"}
    if device == "meta" or weights > MEMORY_SHARE * free:
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
