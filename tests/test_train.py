"""megaspec train in one process: metrics, accumulation, resume, determinism, data and schedule."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megaspec import SpecError, compose
from megaspec.checkpoint import load as load_checkpoint
from megaspec.train import train
from megaspec.train.data import ByteTokenizer, TokenData, micro_batches
from megaspec.train.metrics import ProgressBar, read_metrics
from megaspec.train.optim import lr_at

# A 2-layer GPT-2 with 64 channels: a few ms per step. Dropout off where numbers are compared.
TINY = ["model.config.num_layers=2", "model.config.hidden_size=64", "model.config.num_attention_heads=4",
        "model.config.ffn_hidden_size=128", "model.config.max_position_embeddings=64", "trainer.seq_len=32",
        "trainer.global_batch_size=4", "trainer.max_steps=3", "trainer.warmup_steps=1", "trainer.lr=3e-3",
        "trainer.progress=false", "trainer.peak_flops=1e9", "trainer.save_final=false",
        "trainer.export=false"]
NO_DROPOUT = ["model.config.hidden_dropout=0", "model.config.attention_dropout=0"]


def losses(records: list[dict]) -> list[float]:
    return [r["loss"] for r in records]


def run(tmp_path: Path, *overrides: str, name: str = "run") -> list[dict]:
    return train(compose([*TINY, *overrides]), run_dir=tmp_path / name, log=lambda _: None)


def test_cli_run_writes_metrics_and_loss_curve_in_a_hydra_run_directory(tmp_path):
    cmd = [sys.executable, "-m", "megaspec", "train", *TINY, *NO_DROPOUT, "trainer.progress=true", "trainer.export=true"]
    done = subprocess.run(cmd, check=False, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    (run_dir,) = list(tmp_path.glob("outputs/*/*"))  # outputs/<date>/<time>
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    assert set(records[0]) >= {"step", "loss", "lr", "tokens_per_s", "mfu"}
    first, *_, last = losses(records)
    assert all(math.isfinite(x) for x in losses(records))
    assert abs(first - math.log(256)) < 0.3  # an untrained model guesses among 256 bytes
    assert last < first
    assert records[0]["mfu"] > 0 and records[0]["tokens_per_s"] > 0
    assert (run_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert "train 100%|" in done.stderr and "loss curve:" in done.stderr
    # The trained weights, exported as one self-describing checkpoint, load back as a plain model.
    model = load_checkpoint(run_dir / "model")
    assert model.embedding.weight.shape == (256, 64)  # the vocabulary was fitted to the byte tokenizer


def test_same_seed_same_losses_with_dropout(tmp_path):
    a = run(tmp_path, name="a")
    b = run(tmp_path, name="b")
    assert losses(a) == losses(b)
    assert losses(run(tmp_path, "trainer.seed=1", name="c")) != losses(a)


def test_gradient_accumulation_matches_the_full_batch(tmp_path):
    full = run(tmp_path, *NO_DROPOUT, "trainer.micro_batch_size=4", name="full")
    halves = run(tmp_path, *NO_DROPOUT, "trainer.micro_batch_size=2", name="halves")
    assert losses(halves) == pytest.approx(losses(full), abs=1e-5)
    assert [r["grad_norm"] for r in halves] == pytest.approx([r["grad_norm"] for r in full], abs=1e-5)


def test_resume_after_step_two_repeats_step_three(tmp_path):
    whole = run(tmp_path, "trainer.save_every=2", name="whole")  # dropout on: resume must restore it too
    step2 = tmp_path / "whole" / "checkpoints" / "step_0000002"
    assert (step2 / ".metadata").is_file()
    assert json.loads((step2 / "megaspec_train.json").read_text())["step"] == 2
    resumed = run(tmp_path, f"trainer.resume={tmp_path / 'whole' / 'checkpoints'}", name="resumed")
    assert [r["step"] for r in resumed] == [3]  # the latest checkpoint in the directory: step 2
    assert resumed[0]["loss"] == pytest.approx(whole[2]["loss"], abs=1e-6)
    with pytest.raises(SpecError, match=r"holds a different model; model.config differs in config.num_layers: 2 -> 1$"):
        run(tmp_path, f"trainer.resume={step2}", "model.config.num_layers=1", name="smaller")


def test_synthetic_tokens_use_the_models_vocabulary(tmp_path):
    records = run(tmp_path, "data=synthetic", "model.config.vocab_size=100")
    assert abs(records[0]["loss"] - math.log(100)) < 0.3


def test_bf16_autocast_trains(tmp_path):
    records = run(tmp_path, "trainer.precision=bf16")
    assert all(math.isfinite(x) for x in losses(records))


def test_clear_errors(tmp_path):
    with pytest.raises(SpecError, match=r"^model.config.vocab_size \(100\) is smaller than the tokenizer's 256 tokens "
                                        r"\(byte\); set model.config.vocab_size=256 or data.fit_vocab_size=true$"):
        run(tmp_path, "model.config.vocab_size=100", "data.fit_vocab_size=false")
    with pytest.raises(SpecError, match=r"trainer.global_batch_size \(4\) must be a multiple of "
                                        r"trainer.micro_batch_size \(3\)"):
        run(tmp_path, "trainer.micro_batch_size=3")
    with pytest.raises(SpecError, match="trainer.resume: no DCP checkpoint at"):
        run(tmp_path, f"trainer.resume={tmp_path}")
    with pytest.raises(SpecError, match=r"trainer.seq_len \(128\) exceeds model.config.max_position_embeddings"):
        run(tmp_path, "trainer.seq_len=128")


def test_batches_depend_only_on_seed_and_step():
    data = TokenData(ByteTokenizer().encode("the quick brown fox jumps over the lazy dog " * 10), 8, seed=0)
    whole = data.global_batch(5, 4)  # [4, 8]
    # Two processes with micro-batches of one see the global batch's rows, in order.
    rows = [b for rank in (0, 1) for b in micro_batches(data, 5, 4, 1, rank, 2)]
    assert [r.tolist() for r in rows] == [[row] for row in whole.tolist()]
    assert ByteTokenizer().decode(whole[0]) in "the quick brown fox jumps over the lazy dog " * 10
    assert not data.global_batch(6, 4).equal(whole)


def test_warmup_then_cosine_schedule():
    lrs = [lr_at(s, 1.0, 0.1, warmup_steps=2, max_steps=6) for s in range(7)]
    assert lrs[:3] == [0.5, 1.0, 1.0]
    assert lrs[4] == pytest.approx(0.55)  # half way through the decay: the mean of lr and min_lr
    assert lrs[6] == pytest.approx(0.1)


def test_progress_bar_line():
    stream = io.StringIO()
    bar = ProgressBar(total=10, stream=stream)
    bar.update(5, loss=2.5, lr=3e-4, tokens_per_s=12345.0, mfu=0.0123)
    line = stream.getvalue()
    assert line.startswith("train  50%|##########          | 5/10 [")
    assert line.rstrip().endswith("loss 2.5000 lr 3.00e-04 tok/s 12.3k mfu 1.23%")


def test_train_help_template_is_one_valid_override():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from megaspec.cli import TRAIN_HELP

    (override,) = OverridesParser.create().parse_overrides([f"hydra.help.template='{TRAIN_HELP}'"])
    assert override.value() == TRAIN_HELP


def test_unsupported_expert_checkpoint_layouts_are_refused_before_training():
    from torch import nn

    from megaspec.train.checkpoint import check_saveable

    model = nn.Linear(2, 2)
    check_saveable(model)  # no experts: nothing to refuse
    model._megaspec_expert_rows = (4, 0, 2)  # experts 0:2 of 4, but not sharded by FSDP
    with pytest.raises(SpecError, match=r"checkpoints of this expert-parallel layout are not supported: expert "
                       r"weights that are not sharded by FSDP on dim 0; train with trainer.save_every=0"):
        check_saveable(model)


def test_expert_bias_balancing_runs_in_the_training_loop(tmp_path):
    moe = ["model=mixtral", "model.config.num_query_groups=2", "model.config.moe_ffn_hidden_size=32",
           "model.config.num_moe_experts=4", "+model.config.moe_router_score_function=sigmoid",
           "+model.config.moe_router_enable_expert_bias=true", "trainer.export=true"]
    records = run(tmp_path, *moe, name="moe")
    assert len(records) == 3 and all(math.isfinite(r["loss"]) for r in records)
    model = load_checkpoint(tmp_path / "moe" / "model")
    bias = model.decoder.layers[0].mlp.router.expert_bias
    # Three steps of +-rate nudges: the biases moved, and by whole multiples of the rate.
    assert bias.abs().sum() > 0
    assert torch.allclose(bias / 1e-3, (bias / 1e-3).round(), atol=1e-3)
