#!/usr/bin/env python
"""Generation speed: megaspec.generate against HF transformers' generate (sdpa, its default cache).

    python tools/bench_generate.py [--repeats N] [--threads N] [--new N] [--prompt N]

Greedy generation of `--new` tokens after a `--prompt`-token prompt, for GPT-2 small
at batch 1 and a small Llama at batch 8, both sides holding the same weights (HF's,
through megaspec's converter). Rounds alternate A B A B ... (tools/bench.py's
`alternate`); the prefill (the prompt's forward, up to the first token) is timed in
the same rounds on its own. At batch 1 it also reports the fraction of the machine's
memory bandwidth decode uses: (bytes of weights and cache read per token) x tokens/s
over the bandwidth of a large tensor copy, measured here on every core.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from bench import GPT2Sizes, LlamaSizes, Row, alternate, check_same_size, fresh_pages, machine, n_params
from torch import Tensor, nn

import megaspec
from megaspec.interop.hf import from_hf

GPT2_SMALL = GPT2Sizes(dropout=0.0)  # 124,439,808 parameters
LLAMA_SMALL = LlamaSizes(layers=4, hidden=512, heads=8, kv_heads=2, ffn=1376, vocab=32000, positions=2048)


@dataclass
class Case:
    """One comparison: the two models, the prompt, and how many tokens to add."""

    name: str
    ours: nn.Module
    hf: nn.Module
    input_ids: Tensor
    new: int


def make_case(name: str, sizes: GPT2Sizes | LlamaSizes, batch: int, prompt: int, new: int) -> Case:
    """HF's model with random weights, the same weights in megaspec's, and a random prompt."""
    import transformers

    torch.manual_seed(0)
    hf_cls = transformers.GPT2LMHeadModel if isinstance(sizes, GPT2Sizes) else transformers.LlamaForCausalLM
    hf = hf_cls(sizes.hf_config()).eval()
    hf.generation_config.eos_token_id = None  # both sides generate every token
    hf.generation_config.pad_token_id = 0
    ours = from_hf(hf).eval()
    check_same_size(ours, hf, name)
    input_ids = torch.randint(0, sizes.vocab, (batch, prompt), generator=torch.Generator().manual_seed(1))
    return Case(name, ours, hf, input_ids, new)


def run_ours(case: Case, new: int, compile: bool = False) -> Tensor:
    return megaspec.generate(case.ours, case.input_ids, max_new_tokens=new, compile=compile)


def run_hf(case: Case, new: int) -> Tensor:
    with torch.no_grad():
        return case.hf.generate(case.input_ids, max_new_tokens=new, do_sample=False)


def check_same_work(case: Case) -> float:
    """Both sides add `new` tokens and start from the same first-step logits; returns the share of equal tokens.

    Random weights give nearly flat logits, so later greedy choices may part at a near-tie
    without either side being wrong; the work per token is the same either way.
    """
    with torch.no_grad():
        a, b = case.ours(case.input_ids).logits[:, -1], case.hf(case.input_ids).logits[:, -1]
    if (a - b).abs().max().item() > 1e-3:
        raise SystemExit(f"{case.name}: megaspec and HF logits differ by {(a - b).abs().max().item():.2e}")
    ours, theirs = run_ours(case, case.new), run_hf(case, case.new)
    want = (case.input_ids.size(0), case.input_ids.size(1) + case.new)
    if ours.shape != want or theirs.shape != want:
        raise SystemExit(f"{case.name}: outputs {tuple(ours.shape)} and {tuple(theirs.shape)}, expected {want}")
    return (ours == theirs).float().mean().item()


def copy_bandwidth(megabytes: int = 512, repeats: int = 10) -> float:
    """Bytes per second a large tensor copy moves (read + write) on every core: the best of `repeats` copies,
    as STREAM reports, since on a shared machine slower copies measure the neighbours, not the memory."""
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or threads)  # the machine's bandwidth, whatever the benchmark's threads
    try:
        src = torch.ones(megabytes * 2**20 // 4)
        dst = torch.empty_like(src)
        dst.copy_(src)  # fault the pages in first
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return 2 * src.numel() * 4 / min(times)


def decode_bytes_per_token(case: Case) -> int:
    """Bytes one decode step of megaspec reads at batch 1: every weight once, and its whole static cache."""
    weights = sum(p.numel() * p.element_size() for p in case.ours.parameters())
    config = megaspec.build_record(case.ours).config
    length = case.input_ids.size(1) + case.new  # slots per layer: the cache is allocated for the whole run
    kv = 2 * config.num_layers * config.query_groups * config.head_dim * length * 4
    return weights + kv


def bench_case(case: Case, repeats: int, compile: bool = False) -> tuple[list[Row], dict[str, Any]]:
    """Full generation and prefill alone, both sides, alternated; rows and derived rates.

    With `compile`, megaspec's compiled decode steps (torch.compile, inductor) join the rounds
    as a third side; the warm-up round compiles them.
    """
    same = check_same_work(case)
    fns: dict[str, Callable[[], Any]] = {
        "ours": lambda: run_ours(case, case.new),
        "hf": lambda: run_hf(case, case.new),
        "ours_prefill": lambda: run_ours(case, 1),
        "hf_prefill": lambda: run_hf(case, 1),
    }
    if compile:
        fns["compiled"] = lambda: run_ours(case, case.new, compile=True)
    times = alternate(fns, repeats, warmup=1)
    batch, prompt = case.input_ids.shape
    label = f"{case.name} ({n_params(case.ours):,} params), batch {batch}, {prompt} + {case.new} tokens"
    rows = [
        Row(f"{label}: greedy generation", "megaspec.generate", times["ours"], "HF generate (sdpa)", times["hf"],
            "speedup", 1.0),
        Row(f"{label}: prefill to the first token", "megaspec.generate", times["ours_prefill"],
            "HF generate (sdpa)", times["hf_prefill"], "speedup"),
    ]  # fmt: skip
    if compile:
        rows.append(Row(f"{label}: greedy generation, decode steps compiled", "megaspec.generate(compile=True)",
                        times["compiled"], "HF generate (sdpa)", times["hf"], "speedup"))
    med = {k: statistics.median(v.wall) for k, v in times.items()}
    rates = {
        "equal tokens": same,
        "megaspec tokens/s": batch * case.new / med["ours"],
        "HF tokens/s": batch * case.new / med["hf"],
        "megaspec decode tokens/s": batch * (case.new - 1) / (med["ours"] - med["ours_prefill"]),
        "HF decode tokens/s": batch * (case.new - 1) / (med["hf"] - med["hf_prefill"]),
    }
    if compile:
        rates["compiled decode tokens/s"] = batch * (case.new - 1) / (med["compiled"] - med["ours_prefill"])
    return rows, rates


def fmt_s(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def report(rows: Sequence[Row]) -> str:
    """A markdown table: medians, ratio HF / megaspec (wall and CPU time), the target."""
    lines = ["| benchmark | megaspec | HF (sdpa) | ratio HF / megaspec | target | met | CPU-time ratio |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        assert r.b is not None
        met = {None: "", True: "yes", False: "**no**"}[r.met]
        target = "" if r.target is None else f">= {r.target:.2f}"
        lines.append(f"| {r.what} | {fmt_s(statistics.median(r.a.wall))} | {fmt_s(statistics.median(r.b.wall))} "
                     f"| {r.ratio:.2f}x | {target} | {met} | {r.cpu_ratio:.2f}x |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run both comparisons and print the tables and rates."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per side")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    parser.add_argument("--new", type=int, default=128, help="new tokens")
    parser.add_argument("--compile", action="store_true", help="also time megaspec with compiled decode steps")
    args = parser.parse_args(argv)
    import transformers

    transformers.logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    fresh_pages()
    print(f"# {machine()}\n")
    rows: list[Row] = []
    for name, sizes, batch in (("GPT-2 small", GPT2_SMALL, 1), ("Llama small", LLAMA_SMALL, 8)):
        case = make_case(name, sizes, batch, args.prompt, args.new)
        case_rows, rates = bench_case(case, args.repeats, args.compile)
        rows += case_rows
        print(f"{name}, batch {batch}: " + ", ".join(f"{k} {v:.3g}" for k, v in rates.items()), flush=True)
        if batch == 1:
            bandwidth, per_token = copy_bandwidth(), decode_bytes_per_token(case)
            for side in [k for k in rates if k.endswith("decode tokens/s") and not k.startswith("HF")]:
                used = per_token * rates[side]
                print(f"  {side.removesuffix(' decode tokens/s')}: decode reads {per_token / 2**20:.1f} MiB per token, "
                      f"{used / 1e9:.2f} GB/s of a copy's {bandwidth / 1e9:.2f} GB/s on {os.cpu_count()} cores = "
                      f"{used / bandwidth:.0%}", flush=True)
        del case
    print()
    print(report(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
