"""`megaspec diff A B`: specs, model configs, checkpoints and run directories, slot by slot."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import megaspec
from megaspec.diff import diff, load_side, main

SPEC = """\
module: gpt_model
config: {{num_layers: 2, hidden_size: 32, num_attention_heads: 4, ffn_hidden_size: 64, vocab_size: 50,
          max_position_embeddings: 16, position_embedding_type: {position}}}
submodules:
  embedding: vocab_embedding
  position_embedding: {position_module}
  decoder:
    module: transformer_block
    submodules:
      layers:
        module: transformer_layer
        submodules:
          input_layernorm: layer_norm
          self_attention:
            module: self_attention
            params: {{attn_mask_type: {mask}}}
            submodules:
              core_attention: {core}
          pre_mlp_layernorm: layer_norm
          mlp: mlp
      final_layernorm: layer_norm
  output_layer: lm_head
"""


def spec_file(tmp_path: Path, name: str, core: str = "sdpa", mask: str = "causal", position: str = "learned_absolute",
              position_module: str = "learned_position_embedding") -> Path:
    path = tmp_path / name
    path.write_text(SPEC.format(core=core, mask=mask, position=position, position_module=position_module))
    return path


def test_two_shipped_models_differ_slot_by_slot_with_lines_on_each_side(capsys):
    assert main(["gpt2", "llama"]) == 1
    out = capsys.readouterr().out
    assert out.startswith("A: gpt2 (conf/model/gpt2.yaml)\nB: llama (conf/model/llama.yaml)\n\n"
                          "slots that differ (module or params):\n"
                          "  position_embedding: learned_position_embedding (specs/gpt2.yaml:11) -> "
                          "rotary_embedding (specs/llama.yaml:12)\n"
                          "  decoder.layers[*].input_layernorm: layer_norm (specs/gpt2.yaml:19) -> "
                          "rms_norm (specs/llama.yaml:20)\n"
                          "  decoder.layers[*].pre_mlp_layernorm: layer_norm (specs/gpt2.yaml:27) -> "
                          "rms_norm (specs/llama.yaml:29)\n"
                          "  decoder.layers[*].mlp.activation: gelu_tanh (specs/gpt2.yaml:32) -> "
                          "silu (specs/llama.yaml:34)\n"
                          "  decoder.final_layernorm: layer_norm (specs/gpt2.yaml:34) -> "
                          "rms_norm (specs/llama.yaml:36)\n\nconfig fields that differ:\n"
                          "  activation: gelu_tanh -> silu\n")
    rows = {line.split()[0]: line.split()[1:] for line in out.split("where they change:\n")[1].splitlines()[1:]}
    # Published counts: GPT-2 small and Llama-3-8B; a tied GPT-2 head owns no weight, Llama's does.
    assert rows["<model>"][:3] == ["124,439,808", "8,030,261,248", "+7,905,821,440"]
    assert rows["output_layer"][:3] == ["0", "525,336,576", "+525,336,576"]
    assert rows["decoder.layers[*]"][:6] == ["(x12", "->", "x32)", "85,054,464", "6,979,584,000", "+6,894,529,536"]
    assert "embedding" in rows and "decoder.final_layernorm" in rows


def test_identical_trees_say_so_and_exit_0(capsys):
    assert main(["specs/gpt2.yaml", "gpt2"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == ("identical: the same 17 slots, modules, params and config")


def test_module_params_and_config_changes_in_spec_files(tmp_path):
    a = spec_file(tmp_path, "a.yaml")
    b = spec_file(tmp_path, "b.yaml", core="eager", mask="no_mask", position="rope", position_module="rotary_embedding")
    same, lines = diff(load_side(str(a)), load_side(str(b)), seq=8)
    assert not same
    assert lines[:9] == [
        f"A: {a}", f"B: {b}", "", "slots that differ (module or params):",
        f"  position_embedding: learned_position_embedding ({a}:6) -> rotary_embedding ({b}:6)",
        f"  decoder.layers[*].self_attention.params.attn_mask_type: causal ({a}:16) -> no_mask ({b}:16)",
        f"  decoder.layers[*].self_attention.core_attention: sdpa ({a}:18) -> eager ({b}:18)",
        "", "config fields that differ:"]
    assert lines[9:11] == ["  position_embedding_type: learned_absolute -> rope", ""]
    rows = {line.split()[0]: line.split()[1:] for line in lines[12:]}
    assert rows["position_embedding"][:3] == ["512", "0", "-512"]  # 16 positions x 32 channels, then none
    assert list(rows) == ["slot", "<model>", "position_embedding"]  # same FLOPs elsewhere: not listed


def test_checkpoints_point_at_their_manifest_lines(tmp_path):
    a, b = spec_file(tmp_path, "a.yaml"), spec_file(tmp_path, "b.yaml", core="eager")
    for name, path in (("ckpt_a", a), ("ckpt_b", b)):
        megaspec.save(megaspec.build_model(path), tmp_path / name)
    same, lines = diff(load_side(str(tmp_path / "ckpt_a")), load_side(str(tmp_path / "ckpt_b")))
    manifest_a, manifest_b = tmp_path / "ckpt_a" / "megaspec.yaml", tmp_path / "ckpt_b" / "megaspec.yaml"
    text = manifest_a.read_text().splitlines()
    line = next(i for i, t in enumerate(text, 1) if t.strip() == "module: sdpa")
    assert lines[4] == (f"  decoder.layers[*].self_attention.core_attention: sdpa ({manifest_a}:{line}) -> "
                        f"eager ({manifest_b}:{line})")
    # The config is the same, and so are the costs of sdpa and eager.
    assert not same and lines[5:] == ["", "config fields that differ:", "  none", "",
                                      "parameters and forward FLOPs per token (at 16 tokens), where they change:",
                                      "  none"]
    cli = subprocess.run([sys.executable, "-m", "megaspec", "diff", str(tmp_path / "ckpt_a"), str(tmp_path / "ckpt_a")],
                         capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0
    assert cli.stdout.strip().endswith("identical: the same 16 slots, modules, params and config")


def test_trouble_exits_2(tmp_path, capsys):
    assert main(["nowhere", "gpt2"]) == 2
    assert capsys.readouterr().err.strip() == ("error: nowhere: not a spec file, a model name of conf/model, "
                                               "a checkpoint or a run directory")
    assert main([str(tmp_path), "gpt2"]) == 2
    assert capsys.readouterr().err.strip() == (f"error: {tmp_path}: neither a megaspec checkpoint (megaspec.yaml) "
                                               "nor a run directory (run.json)")
    with pytest.raises(SystemExit):
        main(["only-one"])


def test_a_checkpoint_cannot_allow_list_imports_for_itself(tmp_path):
    megaspec.save(megaspec.build_model(spec_file(tmp_path, "a.yaml")), tmp_path / "ckpt")
    (tmp_path / "sneaky.py").write_text("import pathlib\npathlib.Path(__file__).with_name('imported').touch()\n"
                                        "class Attention:\n    pass\n")
    manifest = tmp_path / "ckpt" / "megaspec.yaml"
    text = manifest.read_text().replace("allow_imports: []", "allow_imports: [sneaky]")
    manifest.write_text(text.replace("module: sdpa", "module: sneaky.Attention"))
    line = next(i for i, t in enumerate(manifest.read_text().splitlines(), 1) if "sneaky.Attention" in t)
    done = subprocess.run([sys.executable, "-m", "megaspec", "diff", str(tmp_path / "ckpt"), "gpt2"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert done.returncode == 2
    assert done.stderr.strip() == (f"error: {manifest}:{line}: decoder.layers[*].self_attention.core_attention: "
                                   "'sneaky.Attention' is an import path, and import paths are refused unless their "
                                   "prefix is allow-listed (allow_imports in the config); register the class instead")
    assert not (tmp_path / "imported").exists()
