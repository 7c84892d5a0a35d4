"""Every command and Python snippet in README.md runs, in order, at tiny sizes: the README is tested behaviour.

The blocks are read from the README itself, so a block added there is run here with no
change to this file:
- ```bash: each command runs in one working directory shared by the whole README (with
  `specs/` beside it, as in a checkout); `megaspec build|train` (also under torchrun) get
  the tiny sizes of tests/tiny.py for their model, and training steps divided by 100.
- ```python: run in one Python session, in README order. A block whose first line is
  `# NAME.py` is a file the README asks for: it is written (and run by a later command).
- ```yaml whose first line is `# PATH`: a file, written. Other YAML is illustration.
- `path/to/hf-dir` is a tiny random HF GPT-2 with its tokenizer.json, written before the first block.
- ```text with `$ COMMAND` lines: each command runs as written, and every line shown after
  it (but `...`, lines left out) must appear in its output.
- A command that ends in `# exits N` must exit N; every other command must exit 0.
Blocks that cannot run are listed in NOT_RUN with the reason.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from generate_cases import write_hf_gpt2
from tiny import TINY

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BIN = Path(sys.executable).parent
HF_DIR = "path/to/hf-dir"

# The first command of each block that cannot run here, and why.
NOT_RUN = {
    "python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 -e . && .venv/bin/megaspec build":
        "creates a virtual environment and installs packages from an index (tests/test_install.py installs the "
        "wheel and builds from it)",
    'python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 -e ".[test]" && .venv/bin/python -m pytest -q':
        "runs this very test suite",
}


@dataclass
class Block:
    """One fenced block of the README."""

    lang: str
    text: str
    line: int  # of the opening fence

    @property
    def file(self) -> str | None:
        """The file a block stands for (its first line is `# NAME.py` or `# PATH.yaml`), if any."""
        match = re.fullmatch(r"#\s*([\w./-]+\.(?:py|ya?ml))", self.text.splitlines()[0].strip())
        return match.group(1) if match and self.lang in ("python", "yaml") else None

    @property
    def runs(self) -> bool:
        """Whether the block is code this harness runs (or a file it writes)."""
        if self.lang in ("bash", "python") or self.file:
            return True
        return self.lang == "text" and self.text.lstrip().startswith("$ ")


def readme_blocks() -> list[Block]:
    """The README's fenced blocks, in order."""
    blocks, lines = [], README.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        fence = re.match(r"^```(\w*)", lines[i])
        if fence is None:
            i += 1
            continue
        start, body = i, []
        i += 1
        while not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        blocks.append(Block(fence.group(1), "\n".join(body), start + 1))
        i += 1
    return blocks


def commands(script: str) -> list[str]:
    """The commands of a shell block: comment lines dropped, continuations joined."""
    joined = re.sub(r"\\\n\s*", " ", script)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny(command: str) -> str:
    """The command at tiny sizes: model sizes from tests/tiny.py, training steps / 100, evaluation at their length."""
    words = shlex.split(command, comments=True)
    at = next((i for i, w in enumerate(words[:-1]) if w == "megaspec" and words[i + 1] in ("build", "train")), None)
    if at is None and words[:2] == ["megaspec", "eval"]:  # scores the windows the tiny runs trained on
        return shlex.join([*words, "trainer.seq_len=16"])
    if words[:2] == ["megaspec", "generate"]:  # within the tiny models' 32 positions
        return shlex.join([f"max_new_tokens={min(int(w.split('=')[1]), 16)}" if w.startswith("max_new_tokens=")
                           else w for w in words])
    if at is None or any(w.startswith("+checkpoint=") for w in words):
        return command
    model = next((w.split("=", 1)[1] for w in words if w.startswith("model=")), "gpt2")
    train = words[at + 1] == "train"
    scaled = []
    for w in words:
        key, _, value = w.partition("=")
        if train and key in ("trainer.max_steps", "trainer.save_every"):
            w = f"{key}={max(int(value) // 100, 2 if key == 'trainer.max_steps' else 0)}"
        scaled.append(w)
    extra = TINY[model][1:]
    if train:
        extra = [*extra, "trainer.seq_len=16", "trainer.progress=false", "trainer.peak_flops=1e9"]
        if not any(w.startswith("trainer.max_steps=") for w in words):
            extra.append("trainer.max_steps=2")
    return shlex.join([*scaled[: at + 2], *extra, *scaled[at + 2:]])


class Session:
    """The README's working directory and its one Python session."""

    DRIVER = textwrap.dedent("""
        import json, sys, traceback
        namespace = {"__name__": "__main__"}
        for line in sys.stdin:
            request = json.loads(line)
            try:
                exec(compile(request["code"], request["name"], "exec"), namespace)
                result = "ok"
            except BaseException:
                result = traceback.format_exc()
            with open(request["result"], "w") as f:
                f.write(result)
    """)

    def __init__(self, work: Path) -> None:
        self.work = work
        (work / "specs").symlink_to(ROOT / "specs")
        write_hf_gpt2(work / HF_DIR)  # the HF directory the README's generation commands name
        self.env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "MPLBACKEND": "Agg"}
        self.log = open(work / "python-session.log", "w")  # noqa: SIM115 (open for the session's life)
        self.python = subprocess.Popen([sys.executable, "-c", self.DRIVER], cwd=work, env=self.env, text=True,
                                       stdin=subprocess.PIPE, stdout=self.log, stderr=subprocess.STDOUT)
        self.count = 0

    def run_python(self, code: str, name: str, timeout: float = 600) -> str:
        """Run code in the session; 'ok' or the traceback."""
        self.count += 1
        result = self.work / f".result-{self.count}"
        assert self.python.stdin is not None
        self.python.stdin.write(json.dumps({"code": code, "name": name, "result": str(result)}) + "\n")
        self.python.stdin.flush()
        deadline = time.monotonic() + timeout
        while not result.exists():
            if self.python.poll() is not None or time.monotonic() > deadline:
                return f"the Python session ended or timed out; see {self.work / 'python-session.log'}"
            time.sleep(0.05)
        time.sleep(0.05)  # the driver closes the file right after writing
        return result.read_text()

    def run_shell(self, command: str, timeout: float = 600) -> subprocess.CompletedProcess:
        env = {**self.env, "PET_MASTER_PORT": str(free_port()), "PET_MASTER_ADDR": "127.0.0.1"}
        return subprocess.run(["bash", "-c", command], cwd=self.work, env=env, capture_output=True, text=True,
                              timeout=timeout)

    def close(self) -> None:
        if self.python.stdin is not None:
            self.python.stdin.close()
        self.python.wait(timeout=60)
        self.log.close()


BLOCKS = [b for b in readme_blocks() if b.runs]


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory):
    s = Session(tmp_path_factory.mktemp("readme"))
    yield s
    s.close()


@pytest.mark.parametrize("block", BLOCKS, ids=[f"line{b.line}-{b.lang}" for b in BLOCKS])
def test_readme_block_runs(block: Block, session: Session) -> None:
    if block.file:
        path = session.work / block.file
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(block.text + "\n")
    elif block.lang == "python":
        result = session.run_python(block.text, f"README.md:{block.line}")
        assert result == "ok", f"README.md:{block.line}: the Python block failed:\n{result}"
    elif block.lang == "bash":
        for command in commands(block.text):
            if command in NOT_RUN:
                continue
            done = session.run_shell(tiny(command))
            status = re.search(r"#\s*exits (\d+)", command)  # `megaspec diff` exits 1 when its inputs differ
            assert done.returncode == (int(status.group(1)) if status else 0), (
                f"README.md:{block.line}: `{command}` exited {done.returncode}\n"
                                          f"{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
    else:  # a shown session: `$ command`, then the lines it prints
        shown = re.split(r"^\$ ", block.text, flags=re.M)[1:]
        for part in shown:
            command, *expected = part.splitlines()
            done = session.run_shell(command)
            output = (done.stdout + done.stderr).splitlines()
            # `...` stands for lines left out of the README.
            missing = [line for line in expected if line.strip() not in ("", "...") and line not in output]
            assert not missing, (f"README.md:{block.line}: `{command}` did not print:\n" + "\n".join(missing)
                                 + "\n--- it printed:\n" + "\n".join(output[-40:]))


def test_blocks_not_run_are_still_in_the_readme() -> None:
    """Each entry of NOT_RUN names a command the README really has (so the list cannot go stale)."""
    shown = {c for b in readme_blocks() if b.lang == "bash" for c in commands(b.text)}
    assert set(NOT_RUN) <= shown


def test_layout_lists_every_package_directory() -> None:
    text = README.read_text(encoding="utf-8")
    layout = text[text.index("## Layout"):]
    package = ROOT / "megaspec"
    directories = sorted(p.parent for p in package.rglob("*.py") if p.parent != package)
    missing = [str(d.relative_to(package)) for d in directories if f"{d.name}/" not in layout]
    assert not missing, f"README's Layout does not list {missing}"
    for top in ("specs", "conf", "tools", "tests"):
        assert f"\n{top}/" in layout
