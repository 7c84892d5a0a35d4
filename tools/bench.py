#!/usr/bin/env python
"""Speed of megaspec's core, side by side with HF transformers (see BENCHMARKS.md).

    python tools/bench.py [--suite build|meta|train|yaml|all] [--repeats N] [--threads N]

Every comparison runs both sides in one process, alternating A B A B ..., after
a warm-up round, and reports the medians and their ratio: a single absolute
time means little on a shared machine, a ratio of interleaved medians does.
Both sides always do the same work (same sizes, same weights, same inputs);
the script checks parameter counts and outputs before it times anything.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import gc
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

import megaspec
from megaspec.build import materialize
from megaspec.compose import given_config
from megaspec.config import TransformerConfig
from megaspec.interop.hf import from_hf
from megaspec.models.gpt import GPTModel
from megaspec.modules.activation import GELUTanh, SiLU
from megaspec.modules.attention.core import SDPAttention
from megaspec.modules.attention.self_attention import SelfAttention
from megaspec.modules.embedding.vocab import VocabEmbedding
from megaspec.modules.head.lm_head import LMHead
from megaspec.modules.layer.transformer_block import TransformerBlock
from megaspec.modules.layer.transformer_layer import TransformerLayer
from megaspec.modules.linear import Linear
from megaspec.modules.mlp.mlp import MLP
from megaspec.modules.norm import LayerNorm, RMSNorm
from megaspec.modules.position.learned import LearnedPositionEmbedding
from megaspec.modules.position.rotary import RotaryEmbedding
from megaspec.paths import specs_dir

SUITES = ("build", "meta", "train", "yaml")


# ---- sizes, as megaspec overrides and as HF configs ---------------------------------------------


@dataclass(frozen=True)
class GPT2Sizes:
    """A GPT-2 shape: Hydra overrides of conf/model/gpt2.yaml and the matching GPT2Config."""

    layers: int = 12
    hidden: int = 768
    heads: int = 12
    vocab: int = 50257
    positions: int = 1024
    dropout: float = 0.1

    def overrides(self) -> list[str]:
        """Hydra overrides that give this shape."""
        c = "model.config"
        return [
            "model=gpt2", f"{c}.num_layers={self.layers}", f"{c}.hidden_size={self.hidden}",
            f"{c}.num_attention_heads={self.heads}", f"{c}.ffn_hidden_size={4 * self.hidden}",
            f"{c}.vocab_size={self.vocab}", f"{c}.max_position_embeddings={self.positions}",
            f"{c}.hidden_dropout={self.dropout}", f"{c}.attention_dropout={self.dropout}",
        ]  # fmt: skip

    def hf_config(self) -> Any:
        """The same shape as a transformers GPT2Config."""
        import transformers

        return transformers.GPT2Config(
            n_layer=self.layers, n_embd=self.hidden, n_head=self.heads, vocab_size=self.vocab,
            n_positions=self.positions, resid_pdrop=self.dropout, embd_pdrop=self.dropout,
            attn_pdrop=self.dropout, bos_token_id=self.vocab - 1, eos_token_id=self.vocab - 1,
            attn_implementation="sdpa",
        )  # fmt: skip


@dataclass(frozen=True)
class LlamaSizes:
    """A Llama shape: Hydra overrides of conf/model/llama.yaml and the matching LlamaConfig."""

    layers: int = 32
    hidden: int = 4096
    heads: int = 32
    kv_heads: int = 8
    ffn: int = 14336
    vocab: int = 128256
    positions: int = 8192

    def overrides(self) -> list[str]:
        """Hydra overrides that give this shape (dropout is 0 in conf/model/llama.yaml)."""
        c = "model.config"
        return [
            "model=llama", f"{c}.num_layers={self.layers}", f"{c}.hidden_size={self.hidden}",
            f"{c}.num_attention_heads={self.heads}", f"{c}.num_query_groups={self.kv_heads}",
            f"{c}.ffn_hidden_size={self.ffn}", f"{c}.vocab_size={self.vocab}",
            f"{c}.max_position_embeddings={self.positions}",
        ]  # fmt: skip

    def hf_config(self) -> Any:
        """The same shape as a transformers LlamaConfig (RoPE base and eps as conf/model/llama.yaml)."""
        import transformers

        return transformers.LlamaConfig(
            num_hidden_layers=self.layers, hidden_size=self.hidden, num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads, intermediate_size=self.ffn, vocab_size=self.vocab,
            max_position_embeddings=self.positions, rms_norm_eps=1e-5, tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, attention_dropout=0.0,
            attn_implementation="sdpa",
        )  # fmt: skip


GPT2_SMALL = GPT2Sizes()  # 124,439,808 parameters
GPT2_TRAIN = GPT2Sizes(layers=4, dropout=0.0)  # GPT-2 small, 4 of its 12 layers: a short step
LLAMA3_8B = LlamaSizes()  # 8,030,261,248 parameters
LLAMA_SMALL = LlamaSizes(layers=4, hidden=512, heads=8, kv_heads=2, ffn=1376, vocab=32000, positions=2048)


# ---- timing ------------------------------------------------------------------------------------


@dataclass
class Times:
    """Seconds per timed round: wall clock, and CPU time of the whole process (all threads)."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    def __add__(self, other: Times) -> Times:
        return Times([a + b for a, b in zip(self.wall, other.wall)], [a + b for a, b in zip(self.cpu, other.cpu)])


@dataclass
class Row:
    """One comparison: times of A (megaspec) and B (the reference), and the target on their ratio.

    `goal` is "speedup" (B / A must be >= target) or "overhead" (A / B must be <= target),
    judged on the medians of wall-clock time; a row without a goal is informative only.
    """

    what: str
    a_name: str
    a: Times
    b_name: str = ""
    b: Times | None = None
    goal: str = ""
    target: float | None = None

    def _ratio(self, kind: str) -> float | None:
        if self.b is None or not self.goal:
            return None
        a, b = statistics.median(getattr(self.a, kind)), statistics.median(getattr(self.b, kind))
        return a / b if self.goal == "overhead" else b / a

    @property
    def ratio(self) -> float | None:
        """B / A for a speedup, A / B for an overhead, from the wall-clock medians."""
        return self._ratio("wall")

    @property
    def cpu_ratio(self) -> float | None:
        """The same ratio from CPU time: less sensitive to other processes on the machine."""
        return self._ratio("cpu")

    @property
    def met(self) -> bool | None:
        """Whether the ratio of medians meets the target (None: no target)."""
        if self.target is None or self.ratio is None:
            return None
        return self.ratio <= self.target if self.goal == "overhead" else self.ratio >= self.target


def fresh_pages() -> None:
    """Make every large allocation come from the OS, as in a fresh process.

    glibc raises its mmap threshold after a large free, so a benchmark loop would
    otherwise reuse the previous iteration's already-faulted heap pages: a saving
    a user building one model in a new process never sees. Fixing the threshold
    turns that adaptation off for both sides alike.
    """
    if platform.system() != "Linux":
        return
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD: glibc's default, now fixed
        libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD: give freed memory back, as by default
    except (OSError, AttributeError):
        pass


def alternate(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, Times]:
    """Run each fn in turn (A B A B ...), `warmup` rounds untimed, then `repeats` timed rounds.

    As timeit does, the garbage collector is off while a fn is timed, so a collection
    never lands inside one side's time; each result is dropped and collected between
    calls. Objects from before the run are frozen meanwhile: they are not garbage,
    and scanning the imported libraries' millions of them would dominate the run.
    """
    times = {name: Times() for name in fns}
    gc.collect()
    gc.freeze()
    try:
        for round_ in range(warmup + repeats):
            for name, fn in fns.items():
                gc.collect()
                gc.disable()
                cpu, start = time.process_time(), time.perf_counter()
                out = fn()
                elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
                gc.enable()
                del out
                if round_ >= warmup:
                    times[name].wall.append(elapsed)
                    times[name].cpu.append(cpu)
    finally:
        gc.enable()
        gc.unfreeze()
        gc.collect()
    return times


def n_params(model: nn.Module) -> int:
    """Distinct parameters (a tied weight counts once)."""
    return sum(p.numel() for p in model.parameters())


def check_same_size(a: nn.Module, b: nn.Module, what: str) -> int:
    """Both sides must build the same number of parameters, else the comparison means nothing."""
    na, nb = n_params(a), n_params(b)
    if na != nb:
        raise SystemExit(f"{what}: megaspec has {na:,} parameters, HF {nb:,}: not the same model")
    return na


# ---- 1. real-weight build and 2. meta-device build ---------------------------------------------


def build_rows(
    label: str, repeats: int, sizes: GPT2Sizes | LlamaSizes, ours: tuple[str, Callable[[Any], nn.Module]],
    theirs: tuple[str, Callable[[Any], nn.Module]], target: float,
) -> list[Row]:
    """Time megaspec's build from a composed config against HF's from its config, plus each config step.

    The target is on the builds alone (both start from a config object); composing
    the config (Hydra) and constructing HF's config object are timed in the same
    rounds and reported alongside, so the whole path from scratch is visible too.
    """
    overrides = sizes.overrides()
    cfg, hf_config = megaspec.compose(overrides), sizes.hf_config()
    (a_name, build_a), (b_name, build_b) = ours, theirs
    n = check_same_size(build_a(cfg), build_b(hf_config), label)
    times = alternate(
        {
            "megaspec": lambda: build_a(cfg),
            "hf": lambda: build_b(hf_config),
            "compose": lambda: megaspec.compose(overrides),
            "hf_config": sizes.hf_config,
        },
        repeats,
    )
    what = f"{label} ({n:,} params)"
    return [
        Row(f"{what}: build from a config", a_name, times["megaspec"], b_name, times["hf"], "speedup", target),
        Row("config alone: compose(overrides) / HF config object", "compose", times["compose"],
            "HF config object", times["hf_config"]),
        Row(f"{what}: config + build", f"compose + {a_name}", times["compose"] + times["megaspec"],
            f"config + {b_name}", times["hf_config"] + times["hf"], "speedup"),
    ]  # fmt: skip


def bench_build(repeats: int, sizes: GPT2Sizes = GPT2_SMALL) -> list[Row]:
    """GPT-2 with real weights: build_model(composed config) vs GPT2LMHeadModel(GPT2Config)."""
    import transformers

    return build_rows(
        "GPT-2, real weights", repeats, sizes, ("build_model(cfg)", megaspec.build_model),
        ("GPT2LMHeadModel(config)", transformers.GPT2LMHeadModel), target=3.0,
    )  # fmt: skip


def bench_meta(repeats: int, sizes: LlamaSizes = LLAMA3_8B) -> list[Row]:
    """Llama on the meta device: build_model(cfg, device="meta") vs LlamaForCausalLM under torch.device("meta")."""
    import transformers

    def hf_meta(config: Any) -> nn.Module:
        with torch.device("meta"):
            return transformers.LlamaForCausalLM(config)

    return build_rows(
        "Llama, meta device", repeats, sizes,
        ('build_model(cfg, device="meta")', lambda cfg: megaspec.build_model(cfg, device="meta")),
        ('LlamaForCausalLM(config) under torch.device("meta")', hf_meta), target=1.0,
    )  # fmt: skip


# ---- 3. training step --------------------------------------------------------------------------


def train_step(model: nn.Module, input_ids: Tensor) -> Tensor:
    """Forward with labels (next-token loss), then backward: one fp32 training step without the optimizer."""
    model.zero_grad(set_to_none=True)
    loss = model(input_ids, labels=input_ids).loss
    loss.backward()
    return loss.detach()


def train_pair(name: str, sizes: GPT2Sizes | LlamaSizes, batch: int, seq: int) -> tuple[nn.Module, nn.Module, Tensor]:
    """megaspec and HF models of the same shape with the same weights, and one batch of token ids."""
    import transformers

    torch.manual_seed(0)
    gpt2 = isinstance(sizes, GPT2Sizes)
    hf_cls = transformers.GPT2LMHeadModel if gpt2 else transformers.LlamaForCausalLM
    hf = hf_cls(sizes.hf_config()).train()
    ours = megaspec.build_model(megaspec.compose(sizes.overrides())).train()
    # HF's weights through megaspec's own converter (strict: every tensor must match by name and shape).
    ours.load_state_dict(from_hf(hf).state_dict())
    check_same_size(ours, hf, name)
    input_ids = torch.randint(0, sizes.vocab, (batch, seq), generator=torch.Generator().manual_seed(1))
    # Same weights and inputs must give the same loss, or the two sides do different work.
    with torch.no_grad():
        diff = (ours(input_ids).logits - hf(input_ids).logits).abs().max().item()
    if diff > 1e-3:
        raise SystemExit(f"{name}: megaspec and HF logits differ by {diff:.2e}: not the same model")
    return ours, hf, input_ids


def bench_train(
    repeats: int, batch: int = 2, seq: int = 128, gpt2: GPT2Sizes = GPT2_TRAIN, llama: LlamaSizes = LLAMA_SMALL
) -> list[Row]:
    """Forward + backward, fp32, dropout 0, identical weights and tokens, HF with sdpa attention."""
    return [train_row(name, sizes, repeats, batch, seq) for name, sizes in (("GPT-2", gpt2), ("Llama", llama))]


def train_row(name: str, sizes: GPT2Sizes | LlamaSizes, repeats: int, batch: int, seq: int) -> Row:
    """One training-step comparison; both models are freed when it returns."""
    ours, hf, input_ids = train_pair(name, sizes, batch, seq)
    times = alternate(
        {"megaspec": lambda: train_step(ours, input_ids), "hf": lambda: train_step(hf, input_ids)},
        repeats,
        warmup=2,
    )
    what = f"{name} {sizes.layers} layers, h={sizes.hidden} ({n_params(ours):,} params), b={batch} s={seq}"
    return Row(f"{what}: forward + backward", "megaspec", times["megaspec"],
               "HF (sdpa)", times["hf"], "speedup", 1.0)  # fmt: skip


# ---- 4. YAML spec vs hand-written Python -------------------------------------------------------


def direct_gpt(config: TransformerConfig, llama: bool) -> GPTModel:
    """The model specs/gpt2.yaml or specs/llama.yaml describes, assembled by hand from the same classes."""
    norm = RMSNorm if llama else LayerNorm
    activation = SiLU if llama else GELUTanh
    linear = functools.partial(Linear, config)  # what a `provides` slot receives: sizes come from the parent

    def layer() -> TransformerLayer:
        attention = SelfAttention(
            config, attn_mask_type="causal", linear_qkv=linear, core_attention=SDPAttention(config),
            linear_proj=linear,
        )  # fmt: skip
        mlp = MLP(config, linear_fc1=linear, linear_fc2=linear, activation=activation(config))
        return TransformerLayer(
            config, input_layernorm=norm(config), self_attention=attention, pre_mlp_layernorm=norm(config), mlp=mlp
        )

    decoder = TransformerBlock(config, layers=[layer() for _ in range(config.num_layers)], final_layernorm=norm(config))
    position = RotaryEmbedding(config) if llama else LearnedPositionEmbedding(config)
    return GPTModel(
        config, embedding=VocabEmbedding(config), position_embedding=position, decoder=decoder,
        output_layer=LMHead(config),
    )  # fmt: skip


def model_fields(sizes: GPT2Sizes | LlamaSizes) -> dict[str, Any]:
    """The TransformerConfig fields of a shape, as plain data (what a user's config file holds)."""
    fields = given_config(megaspec.compose(sizes.overrides()))  # the defaults only fill in the rest
    assert isinstance(fields, dict)
    return fields


def bench_yaml(repeats: int, cases: Sequence[tuple[str, GPT2Sizes | LlamaSizes]] | None = None) -> list[Row]:
    """build_module(load_spec(yaml), fields) vs TransformerConfig(**fields) + the classes by hand; both meta, then init."""
    if cases is None:
        cases = (("GPT-2 small", GPT2_SMALL), ("Llama small", LLAMA_SMALL))
    rows = []
    for name, sizes in cases:
        llama = isinstance(sizes, LlamaSizes)
        path = specs_dir() / ("llama.yaml" if llama else "gpt2.yaml")
        fields = model_fields(sizes)

        def from_yaml(device: str | None) -> nn.Module:
            return megaspec.build_module(megaspec.load_spec(path), fields, device=device)

        def by_hand(device: str | None) -> nn.Module:
            with torch.device("meta"):
                model = direct_gpt(TransformerConfig(**fields), llama)
            return model if device == "meta" else materialize(model, device or "cpu")

        # The same seed must give the very same weights: same modules, same init, same order.
        torch.manual_seed(0)
        a = from_yaml(None)
        torch.manual_seed(0)
        b = by_hand(None)
        n = check_same_size(a, b, "yaml")
        a_state, b_state = a.state_dict(), b.state_dict()
        if list(a_state) != list(b_state) or not all(torch.equal(a_state[k], b_state[k]) for k in a_state):
            raise SystemExit(f"yaml: {name} from the spec and by hand differ in their weights")
        del a, b, a_state, b_state
        for device, target in ((None, 1.10), ("meta", None)):
            times = alternate({"yaml": lambda: from_yaml(device), "python": lambda: by_hand(device)}, repeats)
            where = "real weights" if device is None else "meta device (construction only)"
            rows.append(Row(f"{name} ({n:,} params), {where}", "build_module(load_spec(yaml))", times["yaml"],
                            "Python by hand", times["python"], "overhead", target))  # fmt: skip
    return rows


# ---- report ------------------------------------------------------------------------------------


def fmt_s(seconds: float) -> str:
    """Seconds with a sensible unit."""
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def table(rows: Sequence[Row]) -> str:
    """A markdown table: wall-clock medians, their ratio, the target, and the CPU-time ratio."""
    lines = [
        "| benchmark | A | median A | B | median B | ratio | target | met | CPU-time ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        b = fmt_s(statistics.median(r.b.wall)) if r.b else ""
        side = "A/B" if r.goal == "overhead" else "B/A"
        ratio = "" if r.ratio is None else f"{r.ratio:.2f}x {side}"
        cpu = "" if r.cpu_ratio is None else f"{r.cpu_ratio:.2f}x"
        if r.target is None:
            target = ""
        else:
            target = f"{side} <= {r.target:.2f}" if r.goal == "overhead" else f"{side} >= {r.target:.2f}"
        met = {None: "", True: "yes", False: "**no**"}[r.met]
        lines.append(
            f"| {r.what} | {r.a_name} | {fmt_s(statistics.median(r.a.wall))} | {r.b_name} | {b} "
            f"| {ratio} | {target} | {met} | {cpu} |"
        )
    return "\n".join(lines)


def machine() -> str:
    """What the numbers were measured on."""
    import transformers

    return (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"Python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}"
    )


DEFAULT_REPEATS = {"build": 7, "meta": 15, "train": 7, "yaml": 9}
BENCHES: dict[str, Callable[[int], list[Row]]] = {
    "build": bench_build,
    "meta": bench_meta,
    "train": bench_train,
    "yaml": bench_yaml,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the chosen suites and print one markdown table per suite."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", choices=(*SUITES, "all"), default="all")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per side (default: per suite)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args(argv)
    import transformers

    transformers.logging.set_verbosity_error()  # keep the tables readable
    if args.threads:
        torch.set_num_threads(args.threads)
    fresh_pages()
    print(f"# {machine()}\n")
    for suite in SUITES if args.suite == "all" else (args.suite,):
        repeats = args.repeats or DEFAULT_REPEATS[suite]
        start = time.perf_counter()
        rows = BENCHES[suite](repeats)
        print(f"## {suite} ({repeats} rounds, {time.perf_counter() - start:.0f} s)\n")
        print(table(rows), end="\n\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
