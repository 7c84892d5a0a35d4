"""Hostile checkpoints: a checkpoint from a stranger can run no code, reach no file outside its directory,
delete nothing megaspec did not write, exhaust no memory, and fail only as a SpecError naming the file.

Marker files and directory listings before and after prove what was (not) imported, opened or deleted.
"""

from __future__ import annotations

import os
import pickle
import struct
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

import megaspec
from megaspec import SpecError
from megaspec.checkpoint import MANIFEST, checkpoint_inputs, read_manifest
from megaspec.inputs import model_inputs
from megaspec.memory import human_bytes, parameter_bytes

REPO = Path(__file__).resolve().parent.parent
SMALL = {"num_layers": 1, "hidden_size": 16, "num_attention_heads": 2, "vocab_size": 32, "max_position_embeddings": 8}


def tiny(seed: int = 0) -> torch.nn.Module:
    spec, configs, _ = model_inputs(REPO / "specs" / "gpt2.yaml")
    torch.manual_seed(seed)
    return megaspec.build_module(spec, configs[""].updated(**SMALL))


def outputs(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(torch.arange(8)[None] % 32).logits


def error_of(call) -> str:
    with pytest.raises(SpecError) as info:
        call()
    return str(info.value)


def listing(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` with its bytes: what a test compares before and after."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def edit_manifest(ckpt: Path, change) -> Path:
    """Rewrite a checkpoint's manifest through `change(data)`; returns the manifest's path."""
    file = ckpt / MANIFEST
    data = yaml.safe_load(file.read_text())
    change(data)
    file.write_text(yaml.safe_dump(data, sort_keys=False))
    return file


def line_of(file: Path, text: str) -> int:
    return next(i for i, line in enumerate(file.read_text().splitlines(), 1) if text in line)


# ---------------------------------------------------------------- code

EVIL_MODULE = """\
import pathlib
pathlib.Path(__file__).with_name("IMPORTED").write_text("the checkpoint's code ran")
from megaspec.modules.norm import LayerNorm


class Norm(LayerNorm):
    pass
"""


@pytest.fixture
def evil_checkpoint(tmp_path, monkeypatch):
    """A checkpoint that ships a module and names it, with its own allow_imports: importable from its directory."""
    ckpt = tmp_path / "ckpt"
    megaspec.save(tiny(), ckpt)
    (ckpt / "evil_ckpt_mod.py").write_text(EVIL_MODULE)

    def change(data):
        data["spec"]["submodules"]["decoder"]["submodules"]["final_layernorm"] = "evil_ckpt_mod.Norm"
        data["allow_imports"] = ["evil_ckpt_mod", "subprocess"]
        data["modules"]["evil_ckpt_mod.Norm"] = {"kind": "*", "class": "evil_ckpt_mod.Norm", "origin": "import"}

    edit_manifest(ckpt, change)
    monkeypatch.syspath_prepend(str(ckpt))  # as when the current directory is the checkpoint's
    yield ckpt
    sys.modules.pop("evil_ckpt_mod", None)


@pytest.mark.parametrize("entry", ["load", "build_model", "model_inputs", "checkpoint_inputs"])
def test_a_checkpoint_cannot_allow_its_own_imports(evil_checkpoint, entry) -> None:
    call = {"load": megaspec.load, "build_model": megaspec.build_model, "model_inputs": model_inputs,
            "checkpoint_inputs": checkpoint_inputs}[entry]
    file = evil_checkpoint / MANIFEST
    assert error_of(lambda: call(evil_checkpoint)) == (
        f"{file}:{line_of(file, 'final_layernorm: evil_ckpt_mod.Norm')}: decoder.final_layernorm: module "
        "'evil_ckpt_mod.Norm' is an import path, and a checkpoint cannot allow imports for itself; if you trust this "
        "checkpoint's code, allow it: megaspec.load(path, allow_imports=['evil_ckpt_mod']), or --allow-imports "
        "evil_ckpt_mod on the command line")
    assert not (evil_checkpoint / "IMPORTED").exists() and "evil_ckpt_mod" not in sys.modules


def test_the_command_line_cannot_be_talked_into_it_either(evil_checkpoint) -> None:
    # Run from inside the checkpoint directory, where `python -m` puts it on sys.path.
    done = subprocess.run([sys.executable, "-m", "megaspec", "build", f"+checkpoint={evil_checkpoint}"],
                          cwd=evil_checkpoint, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert "module 'evil_ckpt_mod.Norm' is an import path, and a checkpoint cannot allow imports" in done.stderr
    assert "Traceback" not in done.stderr and not (evil_checkpoint / "IMPORTED").exists()


def test_the_caller_can_allow_a_module_it_trusts(evil_checkpoint) -> None:
    model = megaspec.load(evil_checkpoint, allow_imports=["evil_ckpt_mod"])
    assert (evil_checkpoint / "IMPORTED").exists()  # imported because the caller said so
    assert type(model.decoder.final_layernorm).__module__ == "evil_ckpt_mod"
    assert megaspec.build_record(model).allow_imports == ("evil_ckpt_mod",)


def test_a_pickle_posing_as_weights_is_never_unpickled(tmp_path) -> None:
    marker = tmp_path / "UNPICKLED"

    class Payload:
        def __reduce__(self):
            return (Path.write_text, (marker, "code ran"))

    ckpt = tmp_path / "ckpt"
    megaspec.save(tiny(), ckpt)
    weights = ckpt / read_manifest(ckpt)["weights"]
    weights.write_bytes(pickle.dumps({"embedding.weight": Payload()}))
    message = error_of(lambda: megaspec.load(ckpt))
    assert message.startswith(f"{weights}: not a readable safetensors file: ")
    assert not marker.exists()


# ---------------------------------------------------------------- paths

@pytest.fixture
def outside_weights(tmp_path):
    """A checkpoint, and a valid copy of its weights outside its directory (opening it would succeed)."""
    ckpt = tmp_path / "ckpt"
    megaspec.save(tiny(), ckpt)
    (tmp_path / "elsewhere").mkdir()
    outside = tmp_path / "elsewhere" / "model-00000000.safetensors"
    outside.write_bytes((ckpt / read_manifest(ckpt)["weights"]).read_bytes())
    return ckpt, outside


@pytest.fixture
def opened(monkeypatch):
    """The files safetensors opens."""
    import safetensors

    seen: list[str] = []
    real = safetensors.safe_open

    def recording(path, *args, **kwargs):
        seen.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(safetensors, "safe_open", recording)
    return seen


@pytest.mark.parametrize("how", ["dotdot", "absolute", "subdirectory"])
def test_weights_outside_the_directory_are_refused_before_opening(outside_weights, opened, how) -> None:
    ckpt, outside = outside_weights
    name = {"dotdot": "../elsewhere/model-00000000.safetensors", "absolute": str(outside),
            "subdirectory": "sub/model.safetensors"}[how]
    file = edit_manifest(ckpt, lambda data: data.update(weights=name))
    assert error_of(lambda: megaspec.load(ckpt)) == (
        f"{file}: not a valid megaspec checkpoint manifest\n"
        f"{file}:{line_of(file, 'weights:')}: weights: {name!r} is not a plain file name inside the checkpoint "
        "directory")
    assert opened == []


def test_a_link_out_of_the_directory_is_refused_before_opening(outside_weights, opened) -> None:
    ckpt, outside = outside_weights
    (ckpt / "link.safetensors").symlink_to(outside)
    edit_manifest(ckpt, lambda data: data.update(weights="link.safetensors"))
    assert error_of(lambda: megaspec.load(ckpt)) == (
        f"{ckpt}: the weights file 'link.safetensors' is a link to a file outside the checkpoint directory")
    assert opened == []
    # A link that stays inside is fine.
    (ckpt / "inner.safetensors").symlink_to(next(ckpt.glob("model-*.safetensors")))
    edit_manifest(ckpt, lambda data: data.update(weights="inner.safetensors"))
    assert torch.equal(outputs(megaspec.load(ckpt)), outputs(tiny()))


def test_a_manifest_linked_from_outside_is_refused(outside_weights) -> None:
    ckpt, _ = outside_weights
    (ckpt.parent / "elsewhere" / MANIFEST).write_bytes((ckpt / MANIFEST).read_bytes())
    (ckpt / MANIFEST).unlink()
    (ckpt / MANIFEST).symlink_to(ckpt.parent / "elsewhere" / MANIFEST)
    assert error_of(lambda: megaspec.load(ckpt)) == (
        f"{ckpt}: the manifest '{MANIFEST}' is a link to a file outside the checkpoint directory")


# ---------------------------------------------------------------- saving deletes only what megaspec wrote

def hf_style(directory: Path) -> None:
    directory.mkdir()
    for name in ("config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                 "model.safetensors.index.json", "README.md"):
        (directory / name).write_text(f"not megaspec's: {name}")


def test_saving_into_an_hf_directory_keeps_its_files(tmp_path) -> None:
    hf_style(tmp_path / "hf")
    before = listing(tmp_path / "hf")
    megaspec.save(tiny(0), tmp_path / "hf")
    first = read_manifest(tmp_path / "hf")["weights"]
    megaspec.save(tiny(1), tmp_path / "hf")  # replaces megaspec's own checkpoint, and nothing else
    after = listing(tmp_path / "hf")
    second = read_manifest(tmp_path / "hf")["weights"]
    assert {k: after[k] for k in before} == before
    assert sorted(set(after) - set(before)) == sorted([MANIFEST, second]) and first != second
    assert torch.equal(outputs(megaspec.load(tmp_path / "hf")), outputs(tiny(1)))


def test_a_foreign_manifest_is_refused_untouched(tmp_path) -> None:
    hf_style(tmp_path / "d")
    (tmp_path / "d" / MANIFEST).write_text("somebody: else's file\n")
    before = listing(tmp_path / "d")
    message = error_of(lambda: megaspec.save(tiny(), tmp_path / "d"))
    assert message.startswith(f"{tmp_path / 'd'}: refusing to save: the directory holds a {MANIFEST} that is not "
                              "a valid megaspec checkpoint")
    assert listing(tmp_path / "d") == before


def test_a_manifest_cannot_list_others_files_for_deletion(tmp_path) -> None:
    """Only names of the forms a save writes are ever removed, whatever a (hostile) manifest lists."""
    ckpt = tmp_path / "ckpt"
    hf_style(ckpt)
    megaspec.save(tiny(), ckpt)
    own = read_manifest(ckpt)["weights"]
    (ckpt / own).rename(ckpt / "model-00001-of-00002.safetensors")
    edit_manifest(ckpt, lambda data: data.update(weights="model-00001-of-00002.safetensors",
                                                 pending=["README.md", "config.json"]))
    before = listing(ckpt)
    megaspec.save(tiny(1), ckpt)
    after = listing(ckpt)
    assert all(after[name] == data for name, data in before.items() if name != MANIFEST)


def test_save_into_a_missing_parent_or_onto_a_file(tmp_path) -> None:
    target = tmp_path / "missing" / "ckpt"
    assert error_of(lambda: megaspec.save(tiny(), target)) == (
        f"{target}: cannot save a checkpoint here: the parent directory '{target.parent}' does not exist")
    assert not target.parent.exists()
    (tmp_path / "a-file").write_text("mine")
    assert error_of(lambda: megaspec.save(tiny(), tmp_path / "a-file")) == (
        f"{tmp_path / 'a-file'}: cannot save a checkpoint here: the path exists and is not a directory")
    assert (tmp_path / "a-file").read_text() == "mine"


SAVE_AGAIN = textwrap.dedent("""
    import os, resource, signal, sys
    import safetensors.torch, torch, megaspec
    model = megaspec.load(sys.argv[1])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    if sys.argv[2] == "full":  # the disk is full after a few kilobytes
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
    elif os.geteuid() == 0:  # a read-only directory means nothing to root: drop its privileges
        os.setgid(65534)
        os.setuid(65534)
    try:
        megaspec.save(model, sys.argv[1])
    except megaspec.SpecError as exc:
        print(exc)
        sys.exit(3)
""")


@pytest.mark.parametrize("how", ["read-only", "full"])
def test_failed_saves_are_spec_errors_and_keep_the_previous_checkpoint(how) -> None:
    # Outside pytest's private temporary directory, so an unprivileged process can reach it.
    with tempfile.TemporaryDirectory() as root:
        ckpt = Path(root) / "ckpt"
        old = tiny()
        megaspec.save(old, ckpt)
        os.chmod(root, 0o755)
        os.chmod(ckpt, 0o555 if how == "read-only" else 0o777)
        before = listing(ckpt)
        done = subprocess.run([sys.executable, "-c", SAVE_AGAIN, str(ckpt), how], capture_output=True, text=True,
                              timeout=300, cwd=root)
        os.chmod(ckpt, 0o755)
        reason = "Permission denied" if how == "read-only" else "File too large"
        assert done.returncode == 3, done.stderr
        assert done.stdout.startswith(f"{ckpt}: cannot save the checkpoint: {reason}"), done.stdout
        assert done.stdout.strip().endswith("the previous checkpoint there, if any, is unchanged")
        after = listing(ckpt)
        assert {k: v for k, v in after.items() if k != MANIFEST} == {k: v for k, v in before.items() if k != MANIFEST}
        assert torch.equal(outputs(megaspec.load(ckpt)), outputs(old))


# ---------------------------------------------------------------- manifests

def _spec(data: dict) -> None:
    data["spec"]["submodules"]["output_layer"] = {"module": "lm_head", "params": {"tied": "yes"}}


MANIFEST_CASES = {
    "missing weights": (lambda d: d.pop("weights"), "{file}: not a valid megaspec checkpoint manifest\n"
                                                    "{file}:1: weights: expected a file name, got None"),
    "tensors as a list": (lambda d: d.update(tensors=["a"]), "{file}: not a valid megaspec checkpoint manifest\n"
                                                            "{file}:{tensors:}: tensors: expected a mapping, got a list"),
    "bad tensor entry": (lambda d: d["tensors"].update({"embedding.weight": "float32 &x [*x]"}),
                         "{file}: not a valid megaspec checkpoint manifest\n{file}:{embedding.weight:}: "
                         "tensors.embedding.weight: expected 'dtype [dim, ...]', got 'float32 &x [*x]'"),
    "unknown field": (lambda d: d.update(hooks="import os"), "{file}: not a valid megaspec checkpoint manifest\n"
                                                            "{file}:{hooks:}: hooks: unknown manifest field 'hooks'"),
    "format": (lambda d: d.update(format="pickle/1"),
               "{file}:1: format: unknown checkpoint format 'pickle/1'; this megaspec reads megaspec-checkpoint/2 and "
               "megaspec-checkpoint/1"),
    "unread field": (lambda d: d["config"].update(rotary_base=500000.0),
                     "{file}:{rotary_base:}: config.rotary_base: set, but no module of this model reads it: this model "
                     "has no rotary position embedding (rotary_embedding); remove it"),
    "config type": (lambda d: d["config"].update(num_layers=True),
                    "{file}:{num_layers:}: config.num_layers: expected int, got True"),
    "config size": (lambda d: d["config"].update(num_layers=10**9),
                    "{file}:{config:}: config: num_layers (1,000,000,000) must be at most 1024"),
    "spec param": (_spec, "{file}:{tied:}: output_layer.params.tied: unknown param 'tied'; accepted: bias"),
}


@pytest.mark.parametrize("case", list(MANIFEST_CASES))
def test_manifest_problems_name_the_file_line_and_field(tmp_path, case) -> None:
    change, expected = MANIFEST_CASES[case]
    ckpt = tmp_path / "ckpt"
    megaspec.save(tiny(), ckpt)
    file = edit_manifest(ckpt, change)
    lines = {m: line_of(file, m.strip("{}")) for m in ("{tensors:}", "{embedding.weight:}", "{hooks:}",
                                                        "{num_layers:}", "{config:}", "{tied:}", "{rotary_base:}")
             if m.strip("{}") in file.read_text()}
    for marker, line in lines.items():
        expected = expected.replace(marker, str(line))
    assert error_of(lambda: megaspec.load(ckpt)) == expected.format(file=file)


@pytest.mark.parametrize("text, message", [
    ("", "1: the file is empty; a checkpoint manifest is a YAML mapping"),
    ("format: !!python/object/apply:os.system [ls]\n",
     "1: YAML tag '!!python/object/apply:os.system' is not allowed: only plain data (strings, numbers, booleans, "
     "null, lists and mappings)"),
    ("- a list\n", "1: a checkpoint manifest is a YAML mapping, but the file holds a list"),
])
def test_manifest_files_that_are_not_manifests(tmp_path, text, message) -> None:
    ckpt = tmp_path / "ckpt"
    megaspec.save(tiny(), ckpt)
    (ckpt / MANIFEST).write_text(text)
    assert error_of(lambda: megaspec.load(ckpt)) == f"{ckpt / MANIFEST}:{message}"


def test_a_manifest_of_billion_laughs_stops_early(tmp_path) -> None:
    ckpt = tmp_path / "ckpt"
    megaspec.save(tiny(), ckpt)
    rows = ["l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    rows += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 9)]
    (ckpt / MANIFEST).write_text("\n".join(rows) + "\n")
    assert error_of(lambda: megaspec.load(ckpt)) == (
        f"{ckpt / MANIFEST}:6: the document expands to more than 100,000 values (aliases included); refusing to "
        "expand it")


def test_not_a_checkpoint(tmp_path) -> None:
    assert error_of(lambda: megaspec.load(tmp_path / "nope")) == (
        f"'{tmp_path / 'nope'}' is not a megaspec checkpoint: no such directory")
    assert error_of(lambda: megaspec.load(tmp_path)) == f"'{tmp_path}' is not a megaspec checkpoint (no {MANIFEST})"


# ---------------------------------------------------------------- weight files

def _truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _huge_header(data: bytes) -> bytes:
    return struct.pack("<Q", 2**60) + data[8:]


def _huge_tensor(data: bytes) -> bytes:
    header = b'{"embedding.weight":{"dtype":"F32","shape":[1000000000000],"data_offsets":[0,4000000000000]}}'
    return struct.pack("<Q", len(header)) + header + b"\0" * 16


def _garbage(data: bytes) -> bytes:
    return b"\x89PNG" + data[4:]


@pytest.mark.parametrize("damage", [_truncated, _huge_header, _huge_tensor, _garbage])
def test_damaged_weight_files_are_spec_errors_naming_the_file(tmp_path, damage) -> None:
    ckpt = tmp_path / "ckpt"
    megaspec.save(tiny(), ckpt)
    weights = ckpt / read_manifest(ckpt)["weights"]
    weights.write_bytes(damage(weights.read_bytes()))
    assert error_of(lambda: megaspec.load(ckpt)).startswith(f"{weights}: not a readable safetensors file: ")


# ---------------------------------------------------------------- memory

@pytest.fixture
def little_memory(monkeypatch):
    """A machine with 1 KiB available."""
    import megaspec.memory

    monkeypatch.setattr(megaspec.memory, "available_memory", lambda device="cpu": 1024)


@pytest.fixture
def saved(tmp_path):
    megaspec.save(tiny(), tmp_path / "ckpt")
    return tmp_path / "ckpt"


def test_real_builds_and_loads_refuse_what_does_not_fit(saved, little_memory) -> None:
    ckpt = saved
    ways_out = ("use smaller sizes (model.config.*), build on the meta device to inspect the model without memory "
                "(device=\"meta\"; megaspec build build.device=meta), or spread it over more processes or devices "
                "(torchrun --nproc-per-node N -m megaspec train parallel=fsdp)")
    assert error_of(lambda: megaspec.build_model("llama")) == (
        f"the model (its weights and buffers) needs about 29.9 GiB on cpu, but 1.0 KiB is available; {ways_out}")
    need = human_bytes(2 * parameter_bytes(megaspec.build_model(ckpt, device="meta")))
    assert error_of(lambda: megaspec.load(ckpt)) == (
        f"loading the checkpoint (the model and the file's tensors) needs about {need} on cpu, but 1.0 KiB is "
        f"available; {ways_out}")
    assert megaspec.build_model("llama", device="meta") is not None  # the meta device needs nothing


def test_training_refuses_what_does_not_fit(little_memory) -> None:
    from megaspec.train import train

    cfg = megaspec.compose(["model=llama", "trainer.max_steps=1"])
    message = error_of(lambda: train(cfg, run_dir=None, log=lambda m: None))
    assert message.startswith("training this model (weights 26.0 GiB + gradients 26.0 GiB + AdamW state 52.0 GiB, "
                              "+ activations 9.8 GiB per process (Korthikanti et al. 2022: s*b*h*(34 + 5*a*s/h) "
                              "bytes per layer at 16 bits, scaled to the dtype, plus the logits and their gradient); "
                              "1 process(es) on this cpu) needs about 113.8 GiB on cpu, but 1.0 KiB is available; "
                              "a smaller trainer.micro_batch_size or trainer.seq_len, or use smaller sizes"), message


# ---------------------------------------------------------------- HF directories

def test_convert_refuses_a_pickle_only_directory(tmp_path, capsys) -> None:
    transformers = pytest.importorskip("transformers")
    from megaspec.cli import main

    marker = tmp_path / "UNPICKLED"

    class Payload:
        def __reduce__(self):
            return (Path.write_text, (marker, "code ran"))

    hf = tmp_path / "hf"
    transformers.LlamaConfig(num_hidden_layers=1, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                             vocab_size=32).save_pretrained(hf)
    (hf / "pytorch_model.bin").write_bytes(pickle.dumps({"model.embed_tokens.weight": Payload()}))
    assert main(["convert", str(hf), str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err.strip() == (
        f"error: {hf}: no .safetensors weights (it holds pytorch_model.bin, which are pickles); megaspec never "
        "unpickles a file, since a pickle can run code: convert the weights to safetensors with a tool you trust")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_convert_refuses_weights_that_do_not_cover_the_model(tmp_path, capsys) -> None:
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file, save_file

    from megaspec.cli import main

    config = transformers.LlamaConfig(num_hidden_layers=1, hidden_size=16, intermediate_size=32,
                                      num_attention_heads=2, vocab_size=32)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "hf")
    weights = tmp_path / "hf" / "model.safetensors"
    tensors = load_file(str(weights))
    del tensors["model.norm.weight"]
    save_file(tensors, str(weights), metadata={"format": "pt"})
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'hf'}: the weights lack or mis-shape 1 tensor(s) the model needs (HF would initialise "
        "them at random): model.norm.weight")


# ---------------------------------------------------------------- training checkpoints (DCP)

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A one-step training run's DCP checkpoint, and a TrainState of the same model to load it into."""
    from megaspec.train import train

    run = tmp_path_factory.mktemp("run")
    overrides = ["model.config.num_layers=1", "model.config.hidden_size=16", "model.config.num_attention_heads=2",
                 "model.config.max_position_embeddings=16", "trainer.max_steps=1", "trainer.seq_len=8",
                 "trainer.global_batch_size=2", "trainer.export=false", "trainer.progress=false"]
    train(megaspec.compose(overrides), run_dir=run, log=lambda m: None)
    return next((run / "checkpoints").glob("step_*"))


def train_state():
    from megaspec.train.checkpoint import TrainState

    cfg = megaspec.compose(["model.config.num_layers=1", "model.config.hidden_size=16",
                            "model.config.num_attention_heads=2", "model.config.max_position_embeddings=16",
                            "model.config.vocab_size=256"])
    model = megaspec.build_model(cfg)
    return TrainState(model, torch.optim.AdamW(model.parameters()))


def test_a_training_checkpoint_index_is_never_unpickled_as_code(trained, tmp_path, capfd) -> None:
    from megaspec.train.checkpoint import load

    marker = tmp_path / "UNPICKLED"

    class Payload:
        def __reduce__(self):
            return (Path.write_text, (marker, "code ran"))

    index = trained / ".metadata"
    original = index.read_bytes()
    try:
        index.write_bytes(pickle.dumps(Payload()))
        assert error_of(lambda: load(train_state(), trained)) == (
            f"trainer.resume: {index}: not a readable checkpoint index: the checkpoint's index names "
            "pathlib.Path.write_text, which a DCP index never holds")
        index.write_bytes(original[: len(original) // 2])
        assert error_of(lambda: load(train_state(), trained)).startswith(
            f"trainer.resume: {index}: not a readable checkpoint index: ")
    finally:
        index.write_bytes(original)
    assert not marker.exists() and "Traceback" not in capfd.readouterr().err
    state = train_state()
    load(state, trained)  # the real index still loads
    assert state.step == 1


def test_a_training_checkpoint_cannot_name_files_outside(trained) -> None:
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    from megaspec.train.checkpoint import load
    from megaspec.train.safe_dcp import _MetadataUnpickler

    index = trained / ".metadata"
    original = index.read_bytes()
    with open(index, "rb") as f:
        metadata = _MetadataUnpickler(f).load()
    key = next(iter(metadata.storage_data))
    info = metadata.storage_data[key]
    metadata.storage_data[key] = _StorageInfo("../../elsewhere.distcp", info.offset, info.length)
    try:
        index.write_bytes(pickle.dumps(metadata))
        assert error_of(lambda: load(train_state(), trained)) == (
            f"trainer.resume: {index}: names the file '../../elsewhere.distcp', which is not a plain file name "
            "inside the checkpoint directory")
    finally:
        index.write_bytes(original)


def test_non_tensor_training_state_is_loaded_without_code(tmp_path) -> None:
    import io

    from megaspec.train.safe_dcp import SafePlanner

    marker = tmp_path / "UNPICKLED"

    class Payload:
        def __reduce__(self):
            return (Path.write_text, (marker, "code ran"))

    buffer = io.BytesIO()
    torch.save({"lr": Payload()}, buffer)
    buffer.seek(0)
    with pytest.raises(pickle.UnpicklingError):
        SafePlanner().load_bytes(None, buffer)
    assert not marker.exists()
