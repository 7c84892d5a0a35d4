"""Training-step speed of a tiny Mixtral-shaped model: megaspec (grouped experts) vs HF transformers.

    python tools/bench_moe.py                 # defaults below; --help for sizes
    python tools/bench_moe.py --repeats 15

One step = zero_grad, forward with labels (LM loss + load-balancing loss), backward.
The same weights go into all three models; runs alternate A B C A B C so that
a busy machine slows each model alike. Prints medians of wall and process CPU time, and
ratios to megaspec (above 1: slower than megaspec), as a Markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from megaspec import build_model, compose
from megaspec.interop.hf import from_hf


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--ffn", type=int, default=256, help="each expert's hidden width")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--repeats", type=int, default=15, help="timed steps per model")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args()


def build_models(a: argparse.Namespace) -> dict[str, nn.Module]:
    """megaspec grouped, HF grouped_mm and HF eager, all with one set of weights, in train mode."""
    import transformers

    aux_coef = 0.001  # HF's default; Megatron's loss is HF's / top-k, so ours is top-k times larger
    hf_models = {}
    for impl in ("grouped_mm", "eager"):
        torch.manual_seed(0)
        hf_config = transformers.MixtralConfig(
            num_hidden_layers=a.layers, hidden_size=a.hidden, intermediate_size=a.ffn,
            num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, num_local_experts=a.experts,
            num_experts_per_tok=a.topk, vocab_size=a.vocab, max_position_embeddings=max(a.seq, 64),
            tie_word_embeddings=False, router_aux_loss_coef=aux_coef, output_router_logits=True,
            attn_implementation="sdpa", experts_implementation=impl,
        )  # fmt: skip
        hf_models[impl] = transformers.MixtralForCausalLM(hf_config)
    hf_models["eager"].load_state_dict(hf_models["grouped_mm"].state_dict())
    c = "model.config."
    ours = build_model(compose([
        "model=mixtral", f"{c}num_layers={a.layers}", f"{c}hidden_size={a.hidden}",
        f"{c}num_attention_heads={a.heads}", f"{c}num_query_groups={a.kv_heads}", f"{c}ffn_hidden_size={a.ffn}",
        f"{c}num_moe_experts={a.experts}", f"{c}moe_router_topk={a.topk}",
        f"{c}vocab_size={a.vocab}", f"{c}max_position_embeddings={max(a.seq, 64)}",
        f"{c}moe_aux_loss_coeff={aux_coef * a.topk}",
    ]))  # fmt: skip
    ours.load_state_dict(from_hf(hf_models["grouped_mm"]).state_dict())  # strict: every tensor placed
    models = {"megaspec grouped": ours, "HF grouped_mm": hf_models["grouped_mm"], "HF eager": hf_models["eager"]}
    for m in models.values():
        m.train()
    return models


@torch.no_grad()
def lm_loss(model: nn.Module, input_ids: torch.Tensor) -> float:
    """The language-model part of the loss: equal across the three models when the weights are."""
    out = model(input_ids=input_ids, labels=input_ids)
    aux = out.aux_loss * getattr(model, "router_aux_loss_coef", 1.0)  # HF's aux_loss is unweighted
    return (out.loss - aux).item()


def step(model: nn.Module, input_ids: torch.Tensor) -> tuple[float, float]:
    """One training step: (wall seconds, CPU seconds of this process, all threads)."""
    wall, cpu = time.perf_counter(), time.process_time()
    model.zero_grad(set_to_none=True)
    out = model(input_ids=input_ids, labels=input_ids)
    out.loss.backward()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    a = parse_args()
    torch.set_num_threads(a.threads)
    models = build_models(a)
    input_ids = torch.randint(0, a.vocab, (a.batch, a.seq), generator=torch.Generator().manual_seed(0))
    losses = {name: lm_loss(m, input_ids) for name, m in models.items()}
    wall: dict[str, list[float]] = {name: [] for name in models}
    cpu: dict[str, list[float]] = {name: [] for name in models}
    for i in range(a.warmup + a.repeats):
        for name, m in models.items():
            w, c = step(m, input_ids)
            if i >= a.warmup:
                wall[name].append(w)
                cpu[name].append(c)
    med = {name: statistics.median(ts) for name, ts in wall.items()}
    med_cpu = {name: statistics.median(ts) for name, ts in cpu.items()}
    ours = "megaspec grouped"
    print(f"torch {torch.__version__}, {a.threads} threads; {a.layers} layers, hidden {a.hidden}, "
          f"{a.experts} experts top-{a.topk}, expert ffn {a.ffn}, batch {a.batch} x seq {a.seq}; "
          f"{a.repeats} alternating steps each")  # fmt: skip
    # CPU time counts only while this process runs, so it is steadier than wall time on a busy machine.
    print("\n| model | median step, wall (ms) | vs megaspec | median step, CPU (ms) | vs megaspec | LM loss |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in models:
        print(f"| {name} | {med[name] * 1e3:.1f} | {med[name] / med[ours]:.2f}x | {med_cpu[name] * 1e3:.1f} | "
              f"{med_cpu[name] / med_cpu[ours]:.2f}x | {losses[name]:.5f} |")  # fmt: skip

if __name__ == "__main__":
    main()
