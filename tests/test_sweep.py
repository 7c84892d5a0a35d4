"""Hydra multirun sweeps of `megaspec train` and `megaspec build`, end to end at tiny sizes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from megaspec.train.compare import compare
from megaspec.train.metrics import read_metrics
from megaspec.train.record import read_run

pytest.importorskip("tokenizers")

TINY = ["model.config.num_layers=1", "model.config.hidden_size=64", "model.config.num_attention_heads=4",
        "model.config.ffn_hidden_size=128", "model.config.max_position_embeddings=64", "trainer.seq_len=32",
        "trainer.global_batch_size=4", "trainer.max_steps=4", "trainer.warmup_steps=1", "trainer.eval_every=2",
        "trainer.progress=false", "trainer.peak_flops=1e9", "trainer.save_final=false", "trainer.export=false"]


def megaspec(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megaspec", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def test_a_two_variant_sweep_trains_both_on_the_same_tokens_then_compares(tmp_path):
    text = tmp_path / "mine.txt"
    text.write_text("".join(f"line {i} of my own text, with words that repeat and repeat\n" for i in range(300)))
    # The options come before, between and after the overrides: Hydra's flags and the overrides mix freely.
    done = megaspec("train", *TINY[:2], "-m", *TINY[2:], f"data.path={text}", "data.tokenizer=bpe",
                    "data.vocab_size=300", "model.config.ffn_hidden_size=128,256", "hydra.sweep.dir=sweep",
                    cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    jobs = [tmp_path / "sweep" / "0", tmp_path / "sweep" / "1"]
    assert [line for line in done.stdout.splitlines() if line.startswith("==")] == [
        f"== job 0 (model.config.ffn_hidden_size=128): {jobs[0]}",
        f"== job 1 (model.config.ffn_hidden_size=256): {jobs[1]}"]
    # Tokenized once, by the first job; the second reused the BPE and the token files.
    assert done.stderr.count("data: trained a byte-level BPE of 300 tokens") == 1
    assert done.stderr.count("[train] into") == 1 and done.stderr.count("[val] into") == 1
    runs = [read_run(j) for j in jobs]
    assert [r["status"] for r in runs] == ["completed", "completed"]
    assert runs[0]["data"] == runs[1]["data"]  # the same token counts, tokenizer and cache
    assert (jobs[0] / "tokenizer.json").read_text() == (jobs[1] / "tokenizer.json").read_text()
    assert [r["config"]["trainer"]["seed"] for r in runs] == [0, 0]
    assert [r["config"]["model"]["config"]["ffn_hidden_size"] for r in runs] == [128, 256]
    assert all((j / ".hydra" / "overrides.yaml").is_file() for j in jobs)
    held = [[m["val_loss"] for m in read_metrics(j / "metrics.jsonl") if "val_loss" in m] for j in jobs]
    assert [len(h) for h in held] == [2, 2]

    compared = megaspec("compare", "sweep", "-o", "cmp.png", cwd=tmp_path)
    assert compared.returncode == 0, compared.stderr
    header, first, second = compared.stdout.splitlines()[:3]
    assert header.split()[:3] == ["run", "status", "config.ffn_hidden_size"]
    assert first.split()[:3] == ["0", "completed", "128"] and second.split()[:3] == ["1", "completed", "256"]
    assert first.split()[-2:] == [f"{held[0][-1]:.4f}", f"{min(held[0]):.4f}"]
    assert (tmp_path / "cmp.png").is_file() and (tmp_path / "cmp.md").is_file()

    diffed = megaspec("diff", "sweep/0", "sweep/1", cwd=tmp_path)
    assert diffed.returncode == 1, diffed.stderr
    assert "config fields that differ:\n  ffn_hidden_size: 128 -> 256\n" in diffed.stdout
    assert "  decoder.layers[*].mlp.linear_fc1 " in diffed.stdout


def test_a_failing_job_is_reported_and_the_others_still_run(tmp_path):
    done = megaspec("train", "-m", *TINY, "trainer.max_steps=2", "model.config.hidden_size=66,64",
                    "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert done.returncode == 1
    assert ("error: job 0 (model.config.hidden_size=66): conf/model/gpt2.yaml:6: config: hidden_size (66) must be "
            "divisible by num_attention_heads (4), or set kv_channels") in done.stderr
    assert "error: 1 job(s) failed: job 0 (model.config.hidden_size=66)" in done.stderr
    runs, keys = compare([str(tmp_path / "sweep")])
    assert [(r.name, r.status) for r in runs] == [("0", "failed"), ("1", "completed")]
    assert keys == ["model.config.hidden_size"]
    assert json.loads((tmp_path / "sweep" / "0" / "run.json").read_text())["error"].endswith("or set kv_channels")


def test_build_sweeps_too_each_job_in_its_own_directory(tmp_path):
    done = megaspec("build", "--multirun", "model.config.num_layers=1,2", "model.config.hidden_size=64",
                    "model.config.num_attention_heads=4", "model.config.vocab_size=100", "build.device=meta",
                    "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    totals = [line for line in done.stdout.splitlines() if line.startswith("total parameters")]
    # One layer of 64 channels with GPT-2's 3072-wide MLP is 413,248 parameters; the rest is 72,064.
    assert totals == ["total parameters: 485,312", "total parameters: 898,560"]
    for job, layers in (("0", "1"), ("1", "2")):
        assert (tmp_path / "sweep" / job / ".hydra" / "overrides.yaml").read_text().count(
            f"model.config.num_layers={layers}") == 1


def test_a_sweep_under_torchrun_reuses_one_process_group_and_matches_one_process(tmp_path):
    import socket

    from megaspec import compose
    from megaspec.train import train

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    same = [*TINY, "trainer.max_steps=3", "trainer.eval_every=3", "model.config.hidden_dropout=0",
            "model.config.attention_dropout=0"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(port), "-m", "megaspec", "train", "-m", *same, "model.config.num_layers=1,2",
           "hydra.sweep.dir=sweep"]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    # Rank 0 speaks for both; the other process leaves no directory behind.
    assert [line for line in done.stdout.splitlines() if line.startswith("==")] == [
        f"== job 0 (model.config.num_layers=1): {tmp_path / 'sweep' / '0'}",
        f"== job 1 (model.config.num_layers=2): {tmp_path / 'sweep' / '1'}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep"]
    two = read_metrics(tmp_path / "sweep" / "1" / "metrics.jsonl")
    one = train(compose([*same, "model.config.num_layers=2", "trainer.export=false"]), run_dir=tmp_path / "one",
                log=lambda _: None)
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], abs=1e-5)
    assert two[-1]["val_loss"] == pytest.approx(one[-1]["val_loss"], abs=1e-5)
