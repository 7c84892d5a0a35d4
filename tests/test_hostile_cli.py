"""The `megaspec` command under bad input: one paragraph on stderr, exit 1 (bad input) or 2 (usage), no traceback.

Also runs the README's "Security model" commands and snippet, exactly as written there.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from megaspec.cli import main

REPO = Path(__file__).resolve().parent.parent


def megaspec(*args: str, cwd: Path | str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megaspec", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def one_paragraph(done: subprocess.CompletedProcess) -> str:
    """stderr, checked to be a single line without a traceback or Hydra's footer."""
    err = done.stderr.strip()
    assert "\n" not in err and "Traceback" not in err and "HYDRA_FULL_ERROR" not in err, err
    return err


# ---------------------------------------------------------------- in-process commands

def test_schema_into_a_missing_directory(tmp_path, capsys) -> None:
    assert main(["schema", "-o", str(tmp_path / "missing" / "dir" / "x.json")]) == 1
    assert capsys.readouterr().err.strip() == (
        f"error: cannot write '{tmp_path / 'missing' / 'dir' / 'x.json'}': No such file or directory")


def test_validate_a_fifo_and_a_directory(tmp_path, capsys) -> None:
    os.mkfifo(tmp_path / "fifo.yaml")
    (tmp_path / "dir.yaml").mkdir()
    assert main(["validate", str(tmp_path / "fifo.yaml"), str(tmp_path / "dir.yaml")]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"{tmp_path / 'fifo.yaml'}: cannot read file: not a regular file",
        f"{tmp_path / 'dir.yaml'}: cannot read file: not a regular file"]


def test_validate_an_unreadable_file() -> None:
    # Outside pytest's private directory, read by a process without root's privileges.
    with tempfile.TemporaryDirectory() as root:
        os.chmod(root, 0o755)
        spec = Path(root) / "secret.yaml"
        spec.write_text("module: gpt_model\n")
        spec.chmod(0)
        readable = Path(root) / "readable.yaml"
        readable.write_text("module: gpt_model\n")
        # A first validation imports every module validate needs while the checkout is still readable
        # (a fresh clone may be private to its owner); then the process gives up root's privileges.
        code = ("import contextlib, io, os, sys, megaspec.cli\n"
                "with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
                "    megaspec.cli.main(['validate', sys.argv[2]])\n"
                "if os.geteuid() == 0:\n    os.setgid(65534)\n    os.setuid(65534)\n"
                "sys.exit(megaspec.cli.main(['validate', sys.argv[1]]))")
        done = subprocess.run([sys.executable, "-c", code, str(spec), str(readable)], capture_output=True, text=True,
                              timeout=300, cwd=root)
        assert done.returncode == 1
        assert done.stderr.strip() == f"{spec}: cannot read file: Permission denied"


def test_convert_to_hf_writes_only_a_new_directory(tmp_path, capsys) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert main(["convert", "--to", "hf", str(tmp_path / "ckpt"), str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err.strip() == (
        f"error: '{tmp_path / 'out'}' exists and is not an empty directory; convert --to hf writes a new one")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("argv", [[], ["nope"], ["validate"], ["list", "--bogus"], ["convert", "only-one"],
                                  ["build", "--allow-imports"]])
def test_usage_errors_exit_2(argv, capsys) -> None:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse exits by itself
        code = exc.code
    assert code == 2
    assert "Traceback" not in capsys.readouterr().err


MODELS = sorted(p.stem for p in (REPO / "conf" / "model").glob("*.yaml"))


# ---------------------------------------------------------------- Hydra commands, in a subprocess

@pytest.mark.parametrize("args, status, message", [
    (["build", "model=nope"], 1, "error: command line: model=nope: In 'config': Could not find 'model/nope'. "
                                 "Available options in 'model': " + ", ".join(MODELS)),
    (["build", "model.config.x=["], 2, "error: command line: model.config.x=[: no viable alternative at input '['"),
    (["build", "model.config.num_layers=${nope}"], 1,
     "error: command line: model.config.num_layers=${nope}: Interpolation key 'nope' not found "
     "(at model.config.num_layers)"),
    (["build", "~model.config.nope"], 1,
     "error: command line: ~model.config.nope: Could not delete from config. 'model.config.nope' does not exist."),
    (["build", "build.seq_len=abc"], 1, "error: build.seq_len: expected int, got 'abc'"),
    (["train", "trainer.max_steps=abc"], 1, "error: trainer.max_steps: expected int, got 'abc'"),
    (["train", "trainer.nope=1"], 1, "error: command line: trainer.nope=1: Could not override 'trainer.nope'. "
                                     "To append to your config use +trainer.nope=1; Key 'nope' is not in struct "
                                     "(at trainer.nope)"),
])
def test_hydra_failures_are_one_paragraph(tmp_path, args, status, message) -> None:
    done = megaspec(*args, cwd=tmp_path)
    assert done.returncode == status
    assert one_paragraph(done) == message


@pytest.mark.parametrize("args", [["build", "build.device=cuda:99"], ["train", "trainer.device=cuda"]])
def test_a_device_the_machine_lacks(tmp_path, args) -> None:
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if args[0] == "train" and count:
        pytest.skip("this machine has a CUDA device")
    done = megaspec(*args, "model.config.num_layers=1", "trainer.max_steps=1", cwd=tmp_path)
    device = "cuda:99" if args[0] == "build" else "cuda:0"
    have = f"{count} CUDA device(s)" if count else "no CUDA device"
    assert done.returncode == 1
    assert one_paragraph(done) == f"error: device '{device}' was asked for, but this machine has {have}; use cpu (or auto)"


def test_slots_whose_shapes_do_not_fit_name_the_module(tmp_path) -> None:
    norm = "model.spec.submodules.decoder.submodules.final_layernorm={module: layer_norm, params: {hidden_size: 7}}"
    done = megaspec("build", "model.config.num_layers=1", norm, cwd=tmp_path)
    assert done.returncode == 1
    assert one_paragraph(done) == (
        "error: decoder.final_layernorm: meta forward failed: RuntimeError: Given normalized_shape=[7], expected "
        "input with shape [7], but got input of size torch.Size([1, 128, 768])")
    done = megaspec("build", "model.spec=layer_norm", cwd=tmp_path)  # a root that reads almost none of gpt2's sizes
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith("error: conf/model/gpt2.yaml:") and "set, but no module of this model reads it" \
        in done.stderr


def test_a_bad_checkpoint_path(tmp_path) -> None:
    done = megaspec("build", f"+checkpoint={tmp_path / 'nope'}", cwd=tmp_path)
    assert done.returncode == 1
    assert one_paragraph(done) == f"error: '{tmp_path / 'nope'}' is not a megaspec checkpoint: no such directory"


# ---------------------------------------------------------------- the README's Security model, as written

MY_LAYERS = """\
import torch
from torch import nn


class ScaledMlp(nn.Module):
    def __init__(self, config, scale: float = 1.0) -> None:
        super().__init__()
        self.up = nn.Linear(config.hidden_size, config.ffn_size)
        self.down = nn.Linear(config.ffn_size, config.hidden_size)
        self.scale = scale

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(hidden_states))) * self.scale
"""


def readme_section(title: str) -> str:
    text = (REPO / "README.md").read_text()
    return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


@pytest.fixture
def plugin_dir(tmp_path):
    """my_layers.py and the Security model section's my_spec.yaml; its Python block run (it saves my_ckpt)."""
    section = readme_section("Security model")
    (tmp_path / "my_layers.py").write_text(MY_LAYERS)
    (tmp_path / "my_spec.yaml").write_text(re.search(r"```yaml\n# my_spec.yaml\n(.*?)```", section, re.S).group(1))
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    check = "\nassert type(model.decoder.layers[0].mlp).__name__ == 'ScaledMlp'\n"
    done = subprocess.run([sys.executable, "-c", "import megaspec\n" + snippet + check], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    return tmp_path


def test_readme_security_model_commands_need_the_allow_list(plugin_dir) -> None:
    """Each command of the section runs as written, and is refused, naming the module, without --allow-imports."""
    section = readme_section("Security model")
    lines = [line for block in re.findall(r"```bash\n(.*?)```", section, re.S) for line in block.splitlines()]
    assert len(lines) == 2
    for line in lines:
        args = line.split("#")[0].split()
        assert args[0] == "megaspec"
        done = megaspec(*args[1:], cwd=plugin_dir)
        assert done.returncode == 0, done.stderr
        without = [a for i, a in enumerate(args[1:]) if a != "--allow-imports" and args[i] != "--allow-imports"]
        refused = megaspec(*without, cwd=plugin_dir)
        assert refused.returncode == 1 and "my_layers.ScaledMlp" in refused.stderr, refused.stderr
    assert "my_spec.yaml: ok (" in megaspec("validate", "my_spec.yaml", "--allow-imports", "my_layers",
                                            cwd=plugin_dir).stdout
