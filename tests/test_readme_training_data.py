"""README commands for own data, held-out evaluation, sweeps, compare, diff and the worked ablation, at tiny sizes.

The commands are read from the README itself; only sizes are made tiny (overrides appended
after the README's, so they win) and placeholder files are made up.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from megaspec.train.metrics import read_metrics
from megaspec.train.record import read_run
from megaspec.train.tokenizer import save_tokenizer, train_bpe

pytest.importorskip("tokenizers")

ROOT = Path(__file__).resolve().parent.parent
TINY_MODEL = ["model.config.num_layers=1", "model.config.hidden_size=32", "model.config.num_attention_heads=2",
              "model.config.ffn_hidden_size=64"]
TINY_TRAIN = ["trainer.seq_len=32", "trainer.global_batch_size=4", "trainer.max_steps=4", "trainer.eval_every=2",
              "trainer.progress=false", "trainer.peak_flops=1e9"]
SHAPE = ["trainer.seq_len=32", "trainer.global_batch_size=4"]  # what eval must share with the run it scores


def section(title: str) -> str:
    """The README text under `### title`, up to the next heading."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index(f"### {title}\n")
    end = re.compile(r"^#{2,3} ", re.M).search(text, start + 4)
    return text[start:end.start() if end else len(text)]


def commands(title: str, lang: str = "bash") -> list[list[str]]:
    """Each command of the section's code blocks, split as the shell would, comments dropped."""
    out = []
    for block in re.findall(rf"```{lang}\n(.*?)```", section(title), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                out.append(words)
    return out


def run(words: list[str], cwd: Path, *extra: str) -> subprocess.CompletedProcess:
    """Run a README command: `megaspec` and `python` are this interpreter's; `> FILE` redirects."""
    program = {"megaspec": [sys.executable, "-m", "megaspec"], "python": [sys.executable]}[words[0]]
    args, target = words[1:], None
    if ">" in args:
        args, target = args[:args.index(">")], args[args.index(">") + 1]
    done = subprocess.run([*program, *args, *extra], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert done.returncode in (0, 1), done.stderr  # diff exits 1 for "different"
    if target:
        (cwd / target).write_text(done.stdout, encoding="utf-8")
    return done


def my_text(path: Path) -> Path:
    path.write_text("".join(f"my own line {i}: some words, then more words and other words\n" for i in range(300)))
    return path


def test_own_data_commands(tmp_path):
    my_text(tmp_path / "my_text.txt")
    docs = "".join(json.dumps({"text": f"doc {i} says hello"}) + "\n" for i in range(200))
    (tmp_path / "docs.jsonl").write_text(docs)
    (tmp_path / "path" / "to").mkdir(parents=True)
    save_tokenizer(train_bpe([(tmp_path / "my_text.txt").read_text()], 280), tmp_path / "path" / "to")
    cmds = commands("Your own data and tokenizers")
    assert [c[:2] for c in cmds] == [["megaspec", "train"]] * 4
    for i, words in enumerate(cmds):
        done = run(words, tmp_path, *TINY_MODEL, *TINY_TRAIN, f"hydra.run.dir=run{i}")
        assert done.returncode == 0, done.stderr
        assert read_run(tmp_path / f"run{i}")["status"] == "completed"
    vocab = [read_run(tmp_path / f"run{i}")["config"]["model"]["config"]["vocab_size"] for i in range(4)]
    assert vocab[:2] == [256, 256] and vocab[3] == 280 and 256 < vocab[2] <= 4096


def test_held_out_evaluation_commands(tmp_path):
    my_text(tmp_path / "my_text.txt")
    my_text(tmp_path / "other.txt")
    run_dir = "outputs/2026-01-31/12-00-00"
    trained = run(["megaspec", "train", "data.path=my_text.txt"], tmp_path, *TINY_MODEL, *TINY_TRAIN,
                  f"hydra.run.dir={run_dir}")
    assert trained.returncode == 0, trained.stderr
    final = read_metrics(tmp_path / run_dir / "metrics.jsonl")[-1]["val_loss"]
    first, second = commands("Held-out evaluation")
    scored = run(first, tmp_path, *SHAPE)
    assert scored.returncode == 0, scored.stderr
    # The run's last evaluation, scored again from the saved model: the same loss.
    assert float(scored.stdout.split("held-out loss ")[1].split(",")[0]) == pytest.approx(final, abs=1e-4)
    other = run(second, tmp_path, *SHAPE)
    assert other.returncode == 0, other.stderr
    assert " from other.txt: " in other.stdout and "tokenized other.txt [val]" in other.stdout


def test_diff_example_output():
    (words,) = [line[2:].split() for line in section("Sweeps, `megaspec compare` and `megaspec diff`").splitlines()
                if line.startswith("$ ")]
    done = run(words, ROOT)
    assert done.returncode == 1
    shown = re.search(r"```text\n\$ [^\n]*\n(.*?)```", section("Sweeps, `megaspec compare` and `megaspec diff`"),
                      re.S).group(1)
    lines = done.stdout.splitlines()
    for expected in (line for line in shown.splitlines() if line.strip() != "..."):
        assert expected in lines, expected  # each line shown is printed exactly


def test_worked_ablation(tmp_path):
    cmds = commands("Worked ablation: SwiGLU vs GELU MLP on your own text")
    assert [c[0] for c in cmds] == ["python", "megaspec", "megaspec", "megaspec", "megaspec"]
    make_text, sweep, compare, diff, evaluate = cmds
    run(make_text, tmp_path)
    assert (tmp_path / "reference.txt").stat().st_size > 100_000
    done = run(sweep, tmp_path, *TINY_MODEL[:3], "model.config.num_query_groups=2", *TINY_TRAIN,
               "data.vocab_size=300")
    assert done.returncode == 0, done.stderr
    jobs = [tmp_path / "multirun" / "swiglu_vs_gelu" / j for j in "01"]
    runs = [read_run(j) for j in jobs]
    assert [r["status"] for r in runs] == ["completed", "completed"]
    mlp = [{k: r["config"]["model"]["config"][k] for k in ("gated_linear_unit", "activation", "ffn_hidden_size")}
           for r in runs]
    assert mlp == [{"gated_linear_unit": True, "activation": "silu", "ffn_hidden_size": 344},
                   {"gated_linear_unit": False, "activation": "gelu", "ffn_hidden_size": 512}]
    assert "activation" not in runs[0]["config"]["model"]["spec"]["submodules"]["decoder"]["submodules"][
        "layers"]["submodules"]["mlp"].get("submodules", {})

    table = run(compare, tmp_path)
    assert table.stdout.splitlines()[0].split()[:5] == ["run", "status", "config.ffn_hidden_size",
                                                        "config.activation", "config.gated_linear_unit"]
    assert (tmp_path / "swiglu_vs_gelu.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "swiglu_vs_gelu.md").read_text().count("| completed |") == 2

    diffed = run(diff, tmp_path)
    assert diffed.returncode == 1
    assert ("config fields that differ:\n  activation: silu -> gelu\n  ffn_hidden_size: 344 -> 512\n"
            "  gated_linear_unit: true -> false\n") in diffed.stdout

    scored = run(evaluate, tmp_path, *SHAPE)
    final = read_metrics(jobs[0] / "metrics.jsonl")[-1]["val_loss"]
    assert float(scored.stdout.split("held-out loss ")[1].split(",")[0]) == pytest.approx(final, abs=1e-4)


def test_the_readme_shows_the_figure_it_names():
    text = section("Worked ablation: SwiGLU vs GELU MLP on your own text")
    (image,) = re.findall(r"!\[[^]]*\]\(([^)]+)\)", text)
    png = ROOT / image
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size < 100_000
