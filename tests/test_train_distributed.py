"""megaspec train under torchrun: two gloo processes on 127.0.0.1 match one process, and resume across sizes."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from megaspec import compose
from megaspec import load as load_checkpoint
from megaspec.train import train
from megaspec.train.metrics import read_metrics

TINY = ["model.config.num_layers=2", "model.config.hidden_size=64", "model.config.num_attention_heads=4",
        "model.config.ffn_hidden_size=128", "model.config.max_position_embeddings=64", "trainer.seq_len=32",
        "trainer.global_batch_size=4", "trainer.max_steps=3", "trainer.warmup_steps=1", "trainer.lr=3e-3",
        "trainer.progress=false", "trainer.peak_flops=1e9", "trainer.export=false",
        "model.config.hidden_dropout=0", "model.config.attention_dropout=0", "trainer.precision=fp32"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_and_resume_at_another_world_size(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "megaspec", "train", *TINY, "trainer.save_every=2",
           f"hydra.run.dir={tmp_path / 'two'}"]
    done = subprocess.run(cmd, check=False, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    two = read_metrics(tmp_path / "two" / "metrics.jsonl")
    assert [r["step"] for r in two] == [1, 2, 3]
    assert "global batch 4 x 32 tokens = 2 x 1 accumulation x 2 data-parallel" in done.stderr
    # Only rank 0 made a run directory: nothing else appeared in the working directory.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["two"]

    one = train(compose(TINY), run_dir=tmp_path / "one", log=lambda _: None)
    assert [r["loss"] for r in one] == pytest.approx([r["loss"] for r in two], abs=1e-5)

    # The 2-process checkpoint after step 2 resumes in one process and repeats step 3.
    step2 = tmp_path / "two" / "checkpoints" / "step_0000002"
    assert sorted(p.name for p in step2.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    resumed = train(compose([*TINY, f"trainer.resume={step2}"]), run_dir=tmp_path / "resumed", log=lambda _: None)
    assert [r["step"] for r in resumed] == [3]
    assert resumed[0]["loss"] == pytest.approx(two[2]["loss"], abs=1e-5)


def test_tensor_parallel_llama_checkpoints_and_resumes_in_one_process(tmp_path):
    """TP splits the gated MLP's [gate | up] by halves; its checkpoint (and AdamW state) saves and resumes at 1."""
    llama = ["model=llama", *TINY, "model.config.num_query_groups=2", "trainer.export=true"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "megaspec", "train", "parallel=tp", *llama,
           "trainer.save_every=2", f"hydra.run.dir={tmp_path / 'tp'}"]
    done = subprocess.run(cmd, check=False, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    tp = read_metrics(tmp_path / "tp" / "metrics.jsonl")
    one = train(compose(llama), run_dir=tmp_path / "one", log=lambda _: None)
    assert [r["loss"] for r in one] == pytest.approx([r["loss"] for r in tp], abs=1e-5)
    step2 = tmp_path / "tp" / "checkpoints" / "step_0000002"
    resumed = train(compose([*llama, f"trainer.resume={step2}"]), run_dir=tmp_path / "resumed", log=lambda _: None)
    assert [r["step"] for r in resumed] == [3]
    assert resumed[0]["loss"] == pytest.approx(tp[2]["loss"], abs=1e-5)
    # The exported model (read back from the final TP checkpoint) is the 1-process model's.
    exported = load_checkpoint(tmp_path / "tp" / "model")
    final = load_checkpoint(tmp_path / "one" / "model")
    for (name, a), (_, b) in zip(exported.state_dict().items(), final.state_dict().items(), strict=True):
        assert (a - b).abs().max() < 1e-4, name  # reduction order only (a swapped half would differ by ~0.02)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_pipeline_stages_train_and_evaluate_as_one_process(tmp_path, schedule):
    """Two stages: each step's loss and the held-out loss (forward-only through the schedule) match one process."""
    evaluated = [*TINY, "trainer.eval_every=2", "trainer.eval_batches=2"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "megaspec", "train", "parallel=pp",
           f"parallel.pipeline_schedule={schedule}", *evaluated, f"hydra.run.dir={tmp_path / 'pp'}"]
    done = subprocess.run(cmd, check=False, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    pp = read_metrics(tmp_path / "pp" / "metrics.jsonl")
    one = train(compose(evaluated), run_dir=tmp_path / "one", log=lambda _: None)
    assert [r["loss"] for r in one] == pytest.approx([r["loss"] for r in pp], abs=1e-5)
    assert [r.get("val_loss") for r in pp][1:] == [pytest.approx(one[1]["val_loss"], abs=1e-5),
                                                    pytest.approx(one[2]["val_loss"], abs=1e-5)]
    assert "val_loss" not in pp[0]
