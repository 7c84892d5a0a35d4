"""Held-out evaluation during training and `megaspec eval`; the tokenizer travels with the run and the model."""

from __future__ import annotations

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
from megaspec.train.evaluate import lm_loss
from megaspec.train.metrics import read_metrics
from megaspec.train.record import read_run
from megaspec.train.tokenizer import HFTokenizer, load_tokenizer

pytest.importorskip("tokenizers")

TINY = ["model.config.num_layers=2", "model.config.hidden_size=64", "model.config.num_attention_heads=4",
        "model.config.ffn_hidden_size=128", "model.config.max_position_embeddings=64", "trainer.seq_len=32",
        "trainer.global_batch_size=4", "trainer.max_steps=4", "trainer.warmup_steps=1", "trainer.lr=3e-3",
        "trainer.progress=false", "trainer.peak_flops=1e9", "trainer.save_final=false", "trainer.export=false",
        "model.config.hidden_dropout=0", "model.config.attention_dropout=0", "trainer.eval_every=2"]


def text_file(tmp_path: Path) -> Path:
    words = "one two three four five six seven eight nine ten eleven twelve".split()
    lines = [" ".join(words[(i * 7 + j) % 12] for j in range(10)) for i in range(400)]
    path = tmp_path / "mine.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def megaspec(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megaspec", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_held_out_loss_is_logged_every_eval_every_steps_and_at_the_end(tmp_path):
    lines: list[str] = []
    records = train(compose([*TINY, "trainer.max_steps=5", f"data.cache_dir={tmp_path / 'cache'}"]),
                    run_dir=tmp_path / "run", log=lines.append)
    assert [r["step"] for r in records if "val_loss" in r] == [2, 4, 5]
    assert [r["tokens"] for r in records] == [128, 256, 384, 512, 640]  # 4 x 32 tokens a step
    for r in records:
        if "val_loss" in r:
            assert r["val_perplexity"] == pytest.approx(math.exp(r["val_loss"]), rel=1e-12)
    held = [r["val_loss"] for r in records if "val_loss" in r]
    assert math.log(256) > held[0] > held[1] > held[2]  # below chance among 256 bytes, and falling
    assert read_metrics(tmp_path / "run" / "metrics.jsonl") == records
    run = read_run(tmp_path / "run")
    assert run["status"] == "completed" and run["parameters"] == 87_552
    assert run["flops_per_token"] > 0 and run["config"]["model"]["config"]["vocab_size"] == 256
    assert any(line.startswith("data: corpus.txt: 29,654 training tokens, 2,476 held out (byte, vocabulary 256; ")
               for line in lines)


def test_progress_bar_shows_the_held_out_loss(tmp_path):
    import io

    from megaspec.train.metrics import ProgressBar

    stream = io.StringIO()
    bar = ProgressBar(total=10, stream=stream)
    bar.update(4, loss=2.5, lr=3e-4, tokens_per_s=1000.0, mfu=None, val_loss=2.75)
    bar.update(5, loss=2.25, lr=3e-4, tokens_per_s=1000.0, mfu=None)  # the latest held-out loss stays
    first, second = stream.getvalue().splitlines()
    assert "loss 2.5000 val 2.7500 lr" in first and "loss 2.2500 val 2.7500 lr" in second


def test_evaluation_needs_held_out_data_and_sane_settings(tmp_path):
    cache = f"data.cache_dir={tmp_path}"
    cases = [
        ([cache, "data.val_fraction=0"], "trainer.eval_every=2 needs held-out data: set data.val_fraction (> 0) or "
                                  "data.val_path=FILE, or trainer.eval_every=0"),
        ([cache, "trainer.eval_batches=0"], "trainer.eval_batches must be a positive number of batches, or null for "
                                     "every held-out window; got 0"),
        (["data=synthetic", "trainer.eval_batches=null"], "trainer.eval_batches=null evaluates every held-out "
                                                           "window, and synthetic data has no end; set "
                                                           "trainer.eval_batches"),
    ]
    for extra, message in cases:
        with pytest.raises(SpecError) as info:
            train(compose([*TINY, *extra]), run_dir=tmp_path / "run", log=lambda _: None)
        assert str(info.value) == message
    run = read_run(tmp_path / "run")
    assert run["status"] == "failed" and run["error"] == cases[-1][1]


def test_held_out_loss_leaves_out_auxiliary_losses():
    class Output:
        loss, aux_loss = torch.tensor(3.5), torch.tensor(0.25)

    assert lm_loss(Output()).item() == 3.25


def test_bpe_run_saves_its_tokenizer_and_megaspec_eval_reproduces_the_held_out_loss(tmp_path):
    path = text_file(tmp_path)
    data = [f"data.path={path}", "data.tokenizer=bpe", "data.vocab_size=300"]
    done = megaspec("train", *TINY, *data, "trainer.export=true", "trainer.eval_batches=null",
                    f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    final = read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]
    # The tokenizer is in the run directory and beside the exported model; the vocabulary followed it.
    run_tok, model_tok = load_tokenizer(tmp_path / "run"), load_tokenizer(tmp_path / "run" / "model")
    assert isinstance(run_tok, HFTokenizer) and run_tok.to_json() == model_tok.to_json()
    vocab = run_tok.vocab_size
    assert load_checkpoint(tmp_path / "run" / "model").embedding.weight.shape == (vocab, 64)
    assert f"model.config.vocab_size: 50257 -> {vocab} (the tokenizer's" in done.stderr

    # Scored again from the saved model and tokenizer: the same windows give the same loss.
    scored = megaspec("eval", f"+checkpoint={tmp_path / 'run' / 'model'}", *data[:1], "trainer.seq_len=32",
                      "trainer.global_batch_size=4", "trainer.eval_batches=null", cwd=tmp_path)
    assert scored.returncode == 0, scored.stderr
    line = scored.stdout.strip().splitlines()[-1]
    loss = float(line.split("held-out loss ")[1].split(",")[0])
    assert loss == pytest.approx(final["val_loss"], abs=1e-4)
    ppl = float(line.split("perplexity ")[1].split(":")[0])
    assert ppl == pytest.approx(final["val_perplexity"], rel=1e-3)
    assert ": 12 windows of 32 tokens (384 tokens) from mine.txt: 454 held out (" in line  # 14 windows: 3 batches

    # The run directory works as well; a tokenizer given on the command line is refused for such a model.
    again = megaspec("eval", f"+checkpoint={tmp_path / 'run'}", *data[:1], "trainer.seq_len=32",
                     "trainer.global_batch_size=4", "trainer.eval_batches=null", cwd=tmp_path)
    assert again.returncode == 0 and again.stdout.strip().splitlines()[-1] == line
    refused = megaspec("eval", f"+checkpoint={tmp_path / 'run'}", *data, cwd=tmp_path)
    assert refused.returncode == 1
    assert refused.stderr.strip() == (f"error: {tmp_path / 'run' / 'model'} carries the tokenizer it was trained "
                                      "with (tokenizer.json); drop data.tokenizer=bpe data.vocab_size=300")
    missing = megaspec("eval", *data[:1], cwd=tmp_path)
    assert missing.returncode == 1
    assert "error: megaspec eval needs +checkpoint=DIR" in missing.stderr


def test_run_json_records_a_failure(tmp_path):
    with pytest.raises(SpecError):
        train(compose([*TINY, "trainer.seq_len=128"]), run_dir=tmp_path / "run", log=lambda _: None)
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["status"] == "failed"
    assert run["error"] == "trainer.seq_len (128) exceeds model.config.max_position_embeddings (64)"
