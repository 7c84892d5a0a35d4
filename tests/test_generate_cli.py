"""`megaspec generate`: train then generate (the README's example), HF directories and their tokenizers, errors."""

from __future__ import annotations

import io
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from generate_cases import write_hf_gpt2

import megaspec
from megaspec.cli import main
from megaspec.generation import Step, generate
from megaspec.generation.command import stream
from megaspec.generation.tokenizer import load_tokenizer
from megaspec.train.tokenizer import ByteTokenizer, load_tokenizer as load_training_tokenizer

ROOT = Path(__file__).resolve().parent.parent
# Appended to the README's training command: seconds instead of minutes.
FAST = ["trainer.max_steps=3", "trainer.progress=false", "trainer.peak_flops=1e9", "trainer.seq_len=32",
        "trainer.global_batch_size=2"]


def readme_commands() -> list[list[str]]:
    """The commands of the README's first shell block under 'Generating text' that train and generate."""
    section = (ROOT / "README.md").read_text(encoding="utf-8").split("## Generating text", 1)[1]
    block = section.split("```bash", 1)[1].split("```", 1)[0]
    lines = " ".join(line.split("#", 1)[0].rstrip().removesuffix("\\") for line in block.splitlines())
    commands = [shlex.split(part) for part in re.split(r"(?=\bmegaspec (?:train|generate) )", lines) if part.strip()]
    return [c for c in commands if c[:2] in (["megaspec", "train"], ["megaspec", "generate"])][:2]


def test_readme_trains_then_generates_from_the_run(tmp_path) -> None:
    train, gen = readme_commands()
    assert train[1] == "train" and gen[1] == "generate" and any(a.startswith("+checkpoint=") for a in gen)
    done = subprocess.run([sys.executable, "-m", *train, *FAST], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    done = subprocess.run([sys.executable, "-m", *gen], cwd=tmp_path, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr
    stdout = done.stdout.decode("utf-8")  # as written: an untrained model's bytes may hold '\r'
    prompt = next(a.split("=", 1)[1] for a in gen if a.startswith("prompt="))
    assert stdout.startswith(prompt) and len(stdout) > len(prompt) + 1
    # The same text as megaspec.generate with the byte tokenizer, from the run's exported model.
    run_dir = tmp_path / next(a.split("=", 1)[1] for a in gen if a.startswith("+checkpoint="))
    model = megaspec.load(run_dir / "model")
    options = dict(a.split("=", 1) for a in gen[2:] if not a.startswith(("+checkpoint=", "prompt=")))
    ids = torch.tensor([list(prompt.encode())])
    out = generate(model, ids, max_new_tokens=int(options["max_new_tokens"]), temperature=float(options["temperature"]),
                   top_k=int(options["top_k"]), seed=int(options["seed"]))
    assert stdout == prompt + ByteTokenizer().decode(out[0, ids.size(1):].tolist()) + "\n"


def test_a_model_trained_on_synthetic_tokens_has_no_tokenizer(tmp_path, capsys) -> None:
    from megaspec.train import train

    overrides = ["data=synthetic", "model.config.num_layers=1", "model.config.hidden_size=32",
                 "model.config.num_attention_heads=2", "model.config.vocab_size=50", *FAST]
    train(megaspec.compose(overrides), run_dir=tmp_path / "run", log=lambda _: None)
    assert main(["generate", f"+checkpoint={tmp_path / 'run'}", "prompt=hi"]) == 1
    assert capsys.readouterr().err.strip() == (
        f"error: no tokenizer in {tmp_path / 'run' / 'model'}: it has no tokenizer.json (megaspec train writes "
        "the one it trained with, megaspec convert copies an HF directory's)")


def test_a_model_trained_with_a_bpe_generates_with_it(tmp_path, capsys) -> None:
    from megaspec.train import train

    pytest.importorskip("tokenizers")
    overrides = ["model.config.num_layers=1", "model.config.hidden_size=32", "model.config.num_attention_heads=2",
                 "data.tokenizer=bpe", "data.vocab_size=300", *FAST]
    train(megaspec.compose(overrides), run_dir=tmp_path / "run", log=lambda _: None)
    assert main(["generate", f"+checkpoint={tmp_path / 'run'}", "prompt=The old", "max_new_tokens=8"]) == 0
    tokenizer = load_tokenizer(tmp_path / "run" / "model")
    trained = load_training_tokenizer(tmp_path / "run" / "model")  # what the run trained with: a 300-token BPE
    assert trained.vocab_size == 300 and tokenizer.encode("The old cat") == trained.encode("The old cat")
    ids = torch.tensor([tokenizer.encode("The old")])
    out = generate(megaspec.load(tmp_path / "run" / "model"), ids, max_new_tokens=8)
    assert capsys.readouterr().out == "The old" + tokenizer.decode(out[0, ids.size(1):].tolist()) + "\n"


@pytest.fixture
def hf_dir(tmp_path) -> Path:
    """A tiny HF GPT-2 directory with a tokenizer.json, weights perturbed, eos = <|endoftext|> (id 0)."""
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    return write_hf_gpt2(tmp_path / "hf")


def test_an_hf_directory_and_its_conversion_generate_the_same_text(hf_dir, tmp_path, capsys) -> None:
    args = ["prompt=the cat", "max_new_tokens=12"]
    assert main(["generate", f"+checkpoint={hf_dir}", *args]) == 0
    direct = capsys.readouterr().out
    assert main(["convert", str(hf_dir), str(tmp_path / "ckpt")]) == 0
    capsys.readouterr()
    assert {"tokenizer.json", "generation_config.json"} <= {p.name for p in (tmp_path / "ckpt").iterdir()}
    assert main(["generate", f"+checkpoint={tmp_path / 'ckpt'}", *args]) == 0
    assert capsys.readouterr().out == direct
    # What that text is: the tokenizer's decoding of megaspec.generate's tokens, stopped at eos.
    tokenizer = load_tokenizer(hf_dir)
    ids = torch.tensor([tokenizer.encode("the cat")])
    new = generate(megaspec.load(tmp_path / "ckpt"), ids, max_new_tokens=12, eos_token_id=0)[0, ids.size(1):]
    new = new.tolist()[: new.tolist().index(0)] if 0 in new.tolist() else new.tolist()
    assert direct == "the cat" + tokenizer.decode(new) + "\n" and len(new) > 2


def test_convert_never_replaces_a_tokenizer_file_of_the_users(hf_dir, tmp_path, capsys) -> None:
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "tokenizer.json").write_text("mine")
    assert main(["convert", str(hf_dir), str(tmp_path / "ckpt")]) == 1
    assert capsys.readouterr().err.strip() == (
        f"error: '{tmp_path / 'ckpt' / 'tokenizer.json'}' exists and differs from '{hf_dir / 'tokenizer.json'}'; "
        "convert copies the HF directory's tokenizer files: move it away or write to another directory")
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["tokenizer.json"]  # nothing written
    assert (tmp_path / "ckpt" / "tokenizer.json").read_text() == "mine"
    # Converting again into the same checkpoint (its tokenizer files equal the source's) is fine.
    (tmp_path / "ckpt" / "tokenizer.json").unlink()
    assert main(["convert", str(hf_dir), str(tmp_path / "ckpt")]) == 0
    assert main(["convert", str(hf_dir), str(tmp_path / "ckpt")]) == 0


def test_a_tokenizer_linked_out_of_its_directory_is_refused(hf_dir, tmp_path, capsys) -> None:
    """A stranger's checkpoint cannot make generate (or convert) read a file outside it through its tokenizer.json."""
    assert main(["convert", str(hf_dir), str(tmp_path / "ckpt")]) == 0
    capsys.readouterr()
    secret = tmp_path / "secret.json"
    secret.write_text((hf_dir / "tokenizer.json").read_text())
    for directory in (tmp_path / "ckpt", hf_dir):
        (directory / "tokenizer.json").unlink()
        (directory / "tokenizer.json").symlink_to(secret)
    assert main(["generate", f"+checkpoint={tmp_path / 'ckpt'}", "prompt=the", "max_new_tokens=4"]) == 1
    assert capsys.readouterr().err.strip() == (f"error: {tmp_path / 'ckpt'}: the tokenizer 'tokenizer.json' is a link "
                                               "to a file outside the checkpoint directory")
    assert main(["convert", str(hf_dir), str(tmp_path / "again")]) == 1
    assert capsys.readouterr().err.strip() == (f"error: {hf_dir}: a tokenizer file 'tokenizer.json' is a link to a "
                                               "file outside the checkpoint directory")
    assert not (tmp_path / "again").exists()  # refused before the conversion wrote anything


def test_an_oversized_tokenizer_is_refused_before_it_is_read(hf_dir, tmp_path, capsys, monkeypatch) -> None:
    """A tokenizer.json past the bound (lowered here to this one's size less a byte) is neither read nor copied."""
    import megaspec.generation.tokenizer as generation_tokenizer
    import megaspec.train.tokenizer as train_tokenizer

    limit = (hf_dir / "tokenizer.json").stat().st_size - 1
    monkeypatch.setattr(train_tokenizer, "MAX_TOKENIZER_BYTES", limit)
    monkeypatch.setattr(generation_tokenizer, "MAX_TOKENIZER_BYTES", limit)
    message = f"error: {hf_dir / 'tokenizer.json'}: file is larger than {limit:,} bytes; refusing to read it"
    assert main(["generate", f"+checkpoint={hf_dir}", "prompt=the", "max_new_tokens=4"]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == message
    assert main(["convert", str(hf_dir), str(tmp_path / "ckpt")]) == 1
    assert capsys.readouterr().err.strip() == message
    assert not (tmp_path / "ckpt").exists()


def test_streaming_holds_back_an_unfinished_character() -> None:
    text = "é!"  # two bytes, then one
    steps = [Step(torch.tensor([b]), torch.zeros(1, 256)) for b in text.encode()]
    writes: list[str] = []

    class Out(io.StringIO):
        def write(self, s: str) -> int:
            writes.append(s)
            return super().write(s)

    assert stream(steps, ByteTokenizer(), [], Out()) == text
    assert writes == ["é", "!", "\n"]


@pytest.mark.parametrize(("args", "message"), [
    (["prompt=x"], "command line: give +checkpoint=DIR; see megaspec generate --help"),
    (["+checkpoint=.", "promt=x"], "command line: unknown option 'promt=x' (did you mean 'prompt'?); "
                                   "see megaspec generate --help"),
    (["+checkpoint=.", "prompt=x", "top_k=many"], "command line: top_k takes int, got 'many'"),
    (["+checkpoint=DIR", "prompt=x"], "+checkpoint=DIR: not a megaspec checkpoint (megaspec.yaml), a training run "
                                      "(model/megaspec.yaml) or an HF directory (config.json)"),
])
def test_bad_command_lines_exit_1_with_one_message(args, message, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["generate", *args]) == 1
    assert capsys.readouterr().err.strip() == f"error: {message}"


def test_help_lists_the_options(capsys) -> None:
    assert main(["generate", "--help"]) == 0
    out = capsys.readouterr().out
    assert "+checkpoint=DIR" in out and "temperature=0" in out and "top_p" in out
