#!/usr/bin/env python
"""Training step speed with and without `trainer.compile=true` (see BENCHMARKS.md).

    python tools/bench_compile.py [--model llama] [--layers 4] [--hidden 256] [--seq 256] [--batch 8]
                                  [--repeats 15] [--threads N]

A is the model megaspec train compiles (each transformer layer compiled in place,
`megaspec.train.compile.compile_layers`), B the same model with the same weights in
eager mode. One training step is forward, backward and an AdamW step on the same
batch. After compiling and one warm-up step each, the steps alternate A B A B ...;
the medians (wall clock, and process CPU time) and their ratios are reported (B / A:
the speed-up of compiling), with the losses of both checked to agree first.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
from torch import nn

import megaspec
from megaspec.train.compile import compile_layers


def overrides(model: str, layers: int, hidden: int, heads: int, vocab: int, seq: int) -> list[str]:
    """A small model of the family `model`, sized by the arguments, dropout off."""
    c = "model.config"
    ffn = hidden * 8 // 3 // 8 * 8 if model == "llama" else 4 * hidden  # SwiGLU's 8/3 h, GPT-2's 4 h
    out = [f"model={model}", f"{c}.num_layers={layers}", f"{c}.hidden_size={hidden}",
           f"{c}.num_attention_heads={heads}", f"{c}.ffn_hidden_size={ffn}",
           f"{c}.vocab_size={vocab}", f"{c}.max_position_embeddings={max(seq, 64)}",
           f"{c}.hidden_dropout=0", f"{c}.attention_dropout=0"]
    if model == "llama":
        out.append(f"{c}.num_query_groups={heads}")
    return out


def step(model: nn.Module, optimizer: torch.optim.Optimizer, tokens: torch.Tensor) -> float:
    """One training step; returns its loss."""
    loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def timed(model: nn.Module, optimizer: torch.optim.Optimizer, tokens: torch.Tensor) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one training step."""
    wall, cpu = time.perf_counter(), time.process_time()
    step(model, optimizer, tokens)
    return time.perf_counter() - wall, time.process_time() - cpu


def bench(model_name: str = "llama", layers: int = 4, hidden: int = 256, heads: int = 8, vocab: int = 2048,
          seq: int = 256, batch: int = 8, repeats: int = 15) -> dict[str, float]:
    """Median step times of compiled (A) and eager (B), and B / A."""
    cfg = megaspec.compose(overrides(model_name, layers, hidden, heads, vocab, seq))
    eager, compiled = megaspec.build_model(cfg), megaspec.build_model(cfg)
    compiled.load_state_dict(eager.state_dict())  # the same weights on both sides
    compile_layers(compiled)
    tokens = torch.randint(0, vocab, (batch, seq))  # [b, s]
    opt_a = torch.optim.AdamW(compiled.parameters(), lr=1e-4)
    opt_b = torch.optim.AdamW(eager.parameters(), lr=1e-4)
    start = time.perf_counter()
    loss_a = step(compiled, opt_a, tokens)  # compiles forward and backward
    compile_s = time.perf_counter() - start
    loss_b = step(eager, opt_b, tokens)
    if abs(loss_a - loss_b) > 1e-4:
        raise SystemExit(f"compiled and eager losses differ: {loss_a} vs {loss_b}")
    a, b = [], []
    for _ in range(repeats):
        a.append(timed(compiled, opt_a, tokens))
        b.append(timed(eager, opt_b, tokens))
    med_a, med_b = statistics.median(t for t, _ in a), statistics.median(t for t, _ in b)
    cpu_a, cpu_b = statistics.median(c for _, c in a), statistics.median(c for _, c in b)
    return {"compiled_s": med_a, "eager_s": med_b, "speedup": med_b / med_a, "compile_s": compile_s,
            "compiled_cpu_s": cpu_a, "eager_cpu_s": cpu_b, "cpu_speedup": cpu_b / cpu_a,
            "tokens_per_s_compiled": batch * seq / med_a, "tokens_per_s_eager": batch * seq / med_b,
            "parameters": sum(p.numel() for p in eager.parameters())}


def main() -> None:
    """Run the comparison and print one line of results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama", choices=("llama", "gpt2"))
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    r = bench(args.model, args.layers, args.hidden, args.heads, args.vocab, args.seq, args.batch, args.repeats)
    print(f"{platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}, load average {os.getloadavg()[0]:.2f}")
    print(f"{args.model}: {args.layers} layers, hidden {args.hidden}, {r['parameters']:,} parameters; "
          f"batch {args.batch} x {args.seq} tokens; {args.repeats} steps each, alternated")
    print(f"training step, median wall: compiled {r['compiled_s'] * 1e3:.1f} ms "
          f"({r['tokens_per_s_compiled']:,.0f} tok/s), eager {r['eager_s'] * 1e3:.1f} ms "
          f"({r['tokens_per_s_eager']:,.0f} tok/s); speed-up {r['speedup']:.2f}x")
    print(f"median CPU time: compiled {r['compiled_cpu_s'] * 1e3:.1f} ms, eager {r['eager_cpu_s'] * 1e3:.1f} ms; "
          f"speed-up {r['cpu_speedup']:.2f}x; first compiled step (compiling) {r['compile_s']:.1f} s")


if __name__ == "__main__":
    main()
