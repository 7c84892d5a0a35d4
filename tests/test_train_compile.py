"""trainer.compile=true: each transformer layer compiled in place; the same losses, the same checkpoint names."""

from __future__ import annotations

import pytest
from torch import nn

from megaspec import SpecError, compose
from megaspec.checkpoint import load as load_checkpoint
from megaspec.train import train
from megaspec.train.compile import compile_layers

TINY = ["model.config.num_layers=2", "model.config.hidden_size=64", "model.config.num_attention_heads=4",
        "model.config.ffn_hidden_size=128", "model.config.max_position_embeddings=64", "trainer.seq_len=32",
        "trainer.global_batch_size=4", "trainer.max_steps=3", "trainer.warmup_steps=1", "trainer.lr=3e-3",
        "trainer.progress=false", "trainer.peak_flops=1e9", "trainer.save_final=false", "trainer.eval_every=3",
        "model.config.hidden_dropout=0", "model.config.attention_dropout=0"]


def test_compiled_training_matches_eager_and_exports_the_same_weights(tmp_path):
    eager = train(compose([*TINY, "trainer.export=false"]), run_dir=tmp_path / "eager", log=lambda _: None)
    lines: list[str] = []
    compiled = train(compose([*TINY, "trainer.compile=true"]), run_dir=tmp_path / "compiled", log=lines.append)
    assert "compiling 2 transformer layers (torch.compile, each in place)" in lines
    assert [r["loss"] for r in compiled] == pytest.approx([r["loss"] for r in eager], abs=1e-5)
    assert compiled[-1]["val_loss"] == pytest.approx(eager[-1]["val_loss"], abs=1e-5)
    # Compiled in place: parameter names are unchanged, so the export loads as a plain model.
    model = load_checkpoint(tmp_path / "compiled" / "model")
    assert "decoder.layers.0.mlp.linear_fc1.weight" in model.state_dict()


def test_a_model_without_layers_is_refused():
    with pytest.raises(SpecError, match="^trainer.compile=true compiles each transformer layer, and this model has"):
        compile_layers(nn.Linear(2, 2))


def test_the_benchmark_runs_at_toy_size():
    import importlib.util
    import math
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tools" / "bench_compile.py"
    spec = importlib.util.spec_from_file_location("bench_compile", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.bench("gpt2", layers=1, hidden=32, heads=2, vocab=64, seq=16, batch=2, repeats=2)
    assert result["parameters"] == 16_864  # one GPT-2 layer of 32 channels, 64 tokens, 64 positions
    assert all(result[k] > 0 for k in ("compiled_s", "eager_s", "compiled_cpu_s", "eager_cpu_s", "compile_s"))
    assert math.isfinite(result["speedup"]) and math.isfinite(result["cpu_speedup"])
