"""megaspec.save / megaspec.load: self-describing, bit-identical, checked, atomic."""

import copy
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

import megaspec
from megaspec import SpecError, build_module, parse_spec
from megaspec.checkpoint import MANIFEST, read_manifest
from megaspec.inputs import model_inputs
from megaspec.record import has_record

REPO = Path(__file__).resolve().parent.parent
SMALL = {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "num_query_groups": 2, "ffn_hidden_size": 64,
         "vocab_size": 50, "max_position_embeddings": 16}


def tiny(name: str = "gpt2", seed: int = 0, **fields) -> torch.nn.Module:
    """A small model from a shipped spec, built by the ordinary builder."""
    spec, configs, _ = model_inputs(REPO / "specs" / f"{name}.yaml")
    config = configs[""].updated(**SMALL, **fields)
    torch.manual_seed(seed)
    return build_module(spec, config)


def outputs(model: torch.nn.Module) -> torch.Tensor:
    input_ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model.eval()(input_ids).logits


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_a_format_1_checkpoint_recording_every_field_still_loads(tmp_path, name) -> None:
    """Format 1 wrote every config field, read or not (Llama's normalization: RMSNorm, GPT-2's rotary_base): those
    no module reads are dropped on load, as they did nothing then; format 2 keeps only what the model was given."""
    model = tiny(name)
    megaspec.save(model, tmp_path / "ckpt")
    file = tmp_path / "ckpt" / MANIFEST
    manifest = yaml.safe_load(file.read_text())
    assert manifest["format"] == "megaspec-checkpoint/2" and "normalization" not in manifest["config"]
    everything = megaspec.build_record(model).configs[""].model_dump(mode="json")
    file.write_text(yaml.safe_dump({**manifest, "format": "megaspec-checkpoint/1", "config": everything},
                                   sort_keys=False))
    loaded = megaspec.load(tmp_path / "ckpt")
    assert torch.equal(outputs(loaded), outputs(model))
    kept = megaspec.build_record(loaded).configs[""].model_fields_set
    assert "normalization" not in kept and "position_embedding_type" not in kept
    assert ("rotary_base" in kept) == (name == "llama")  # read by Llama's RoPE, by nothing of GPT-2's
    megaspec.save(loaded, tmp_path / "again")  # saved again: format 2, the read fields only
    again = yaml.safe_load((tmp_path / "again" / MANIFEST).read_text())
    assert again["format"] == "megaspec-checkpoint/2" and set(again["config"]) == kept


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_load_rebuilds_bit_identical_outputs(tmp_path, name) -> None:
    model = tiny(name)
    megaspec.save(model, tmp_path / "ckpt")
    loaded = megaspec.load(tmp_path / "ckpt")
    assert torch.equal(outputs(loaded), outputs(model))
    assert megaspec.build_record(loaded).spec == megaspec.build_record(model).spec
    for key, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key


def test_manifest_describes_the_model(tmp_path) -> None:
    model = tiny("llama")
    megaspec.save(model, tmp_path)
    manifest = read_manifest(tmp_path)
    assert manifest["spec"] == megaspec.build_record(model).spec.to_dict()
    assert manifest["config"]["num_query_groups"] == 2 and manifest["config"]["rotary_base"] == 500000.0
    assert manifest["modules"]["rms_norm"] == {"kind": "norm", "class": "megaspec.modules.norm.RMSNorm",
                                               "origin": "built-in"}
    assert manifest["tensors"]["embedding.weight"] == "float32 [50, 32]"
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == [MANIFEST, manifest["weights"]]


def copy_without_record(model: torch.nn.Module) -> torch.nn.Module:
    """The same model and weights, as if no builder had recorded what built it."""
    plain = copy.deepcopy(model)
    del plain.__dict__["_megaspec_record"]
    assert not has_record(plain)
    return plain


def test_explicit_spec_and_config(tmp_path) -> None:
    """A model that records nothing is saved with spec= and config=; without them, a clear error."""
    model = tiny()
    spec, configs = megaspec.build_record(model).spec, megaspec.build_record(model).configs
    model = copy_without_record(model)
    with pytest.raises(SpecError, match="does not record the spec and config"):
        megaspec.save(model, tmp_path)
    megaspec.save(model, tmp_path, spec=spec, config=configs[""])
    assert torch.equal(outputs(megaspec.load(tmp_path)), outputs(model))


def test_tied_weights_are_stored_once(tmp_path) -> None:
    from safetensors import safe_open

    model = tiny()
    model.decoder.layers[1].input_layernorm.weight = model.decoder.layers[0].input_layernorm.weight  # a tie
    megaspec.save(model, tmp_path)
    manifest = read_manifest(tmp_path)
    assert manifest["tied"] == {"decoder.layers.1.input_layernorm.weight": "decoder.layers.0.input_layernorm.weight"}
    with safe_open(str(tmp_path / manifest["weights"]), framework="pt") as f:
        keys = set(f.keys())
    assert "decoder.layers.1.input_layernorm.weight" not in keys
    # The GPT-2 head reads the embedding: one vocab matrix in the file.
    assert "output_layer.weight" not in keys and "embedding.weight" in keys
    loaded = megaspec.load(tmp_path)
    assert torch.equal(loaded.decoder.layers[1].input_layernorm.weight, model.decoder.layers[0].input_layernorm.weight)


def test_every_mismatch_is_reported_at_once(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    megaspec.save(tiny(), tmp_path)
    manifest = read_manifest(tmp_path)
    weights = tmp_path / manifest["weights"]
    tensors = load_file(str(weights))
    del tensors["decoder.final_layernorm.bias"]
    tensors["embedding.weight"] = tensors["embedding.weight"][:, :16].contiguous()
    tensors["position_embedding.weight"] = tensors["position_embedding.weight"].double()
    tensors["decoder.extra"] = torch.zeros(2)
    save_file(tensors, str(weights))
    with pytest.raises(SpecError) as info:
        megaspec.load(tmp_path)
    message = str(info.value)
    assert "decoder.final_layernorm.bias: missing from checkpoint" in message
    assert "embedding.weight: shape (50, 16) in checkpoint" in message and "the model has (50, 32)" in message
    assert "position_embedding.weight: dtype float64 in checkpoint" in message
    assert "decoder.extra: in checkpoint" in message
    assert "does not hold the tensors megaspec.yaml lists" in message


def test_missing_plugin_is_named(tmp_path) -> None:
    megaspec.save(tiny(), tmp_path)
    manifest_file = tmp_path / MANIFEST
    manifest = yaml.safe_load(manifest_file.read_text())
    manifest["spec"]["submodules"]["output_layer"] = "fancy_head"
    manifest["modules"]["fancy_head"] = {"kind": "head", "class": "fancy.Head", "origin": "plugin fancy-heads:heads"}
    manifest_file.write_text(yaml.safe_dump(manifest))
    with pytest.raises(SpecError, match=r"module 'fancy_head' \(head, fancy.Head\) is not registered; the checkpoint "
                                        r"was saved with it from plugin fancy-heads:heads"):
        megaspec.load(tmp_path)


def test_build_and_model_inputs_read_checkpoints(tmp_path) -> None:
    from megaspec.build_report import build_and_report
    from megaspec.compose import compose

    model = tiny("llama")
    megaspec.save(model, tmp_path)
    spec, configs, _ = model_inputs(tmp_path)
    assert spec == megaspec.build_record(model).spec and configs == megaspec.build_record(model).configs
    cfg = compose([f"+checkpoint={tmp_path}", "build.seq_len=8"])
    lines: list[str] = []
    result = build_and_report(cfg, out=lines.append)
    assert result["parameters"] == sum(p.numel() for p in model.parameters())
    assert lines[0].startswith(f"model: checkpoint {tmp_path}")


# ---------------------------------------------------------------- crashes


def test_failed_save_leaves_previous_checkpoint(tmp_path, monkeypatch) -> None:
    """The weights writer dies after writing part of the file: the old checkpoint still loads, bit for bit."""
    import safetensors.torch

    old = tiny(seed=0)
    megaspec.save(old, tmp_path)
    before = sorted(os.listdir(tmp_path))

    def dies_midway(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\0" * 1000)  # part of a file
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", dies_midway)
    with pytest.raises(SpecError, match="cannot save the checkpoint: disk full"):
        megaspec.save(tiny(seed=1), tmp_path)
    assert sorted(os.listdir(tmp_path)) == before  # the partial file was removed
    assert torch.equal(outputs(megaspec.load(tmp_path)), outputs(old))


KILLED_SAVE = textwrap.dedent("""
    import sys, time
    import safetensors.torch
    import torch
    import megaspec

    real = safetensors.torch.save_file

    def slow(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\\0" * (1 << 20))  # a megabyte of the new weights...
            f.flush()
        print("writing", flush=True)
        time.sleep(60)  # ...and the process is killed here
        real(tensors, filename, metadata)

    safetensors.torch.save_file = slow
    model = megaspec.load(sys.argv[1])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    megaspec.save(model, sys.argv[1])
""")


def test_save_killed_midway_leaves_previous_checkpoint(tmp_path) -> None:
    old = tiny(seed=0)
    megaspec.save(old, tmp_path / "ckpt")
    proc = subprocess.Popen([sys.executable, "-c", KILLED_SAVE, str(tmp_path / "ckpt")], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    leftovers = [p.name for p in (tmp_path / "ckpt").iterdir() if p.name.endswith(".tmp")]
    assert leftovers, "the save was killed while writing its temporary file"
    assert torch.equal(outputs(megaspec.load(tmp_path / "ckpt")), outputs(old))
    # The next save cleans up after the killed one.
    megaspec.save(old, tmp_path / "ckpt")
    assert not [p for p in (tmp_path / "ckpt").iterdir() if p.name.endswith(".tmp")]


def test_parse_spec_round_trip_of_manifest(tmp_path) -> None:
    model = tiny("llama")
    megaspec.save(model, tmp_path)
    assert parse_spec(read_manifest(tmp_path)["spec"]) == megaspec.build_record(model).spec
