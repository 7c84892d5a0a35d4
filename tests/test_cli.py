"""End-to-end runs of the `megaspec` command in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = ["model.config.num_layers=2", "model.config.hidden_size=64", "model.config.num_attention_heads=4",
        "model.config.ffn_hidden_size=128", "model.config.vocab_size=100", "build.seq_len=16"]


def megaspec(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run `python -m megaspec ARGS` and capture its output."""
    return subprocess.run([sys.executable, "-m", "megaspec", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_build_default_model_prints_exact_summary(tmp_path):
    result = megaspec("build", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "total parameters: 124,439,808" in out
    assert "  embedding: vocab_embedding" in out
    assert "layers[0..11]: transformer_layer x12" in out
    assert "7,087,872 each" in out
    assert "core_attention: sdpa" in out
    assert next(line for line in out.splitlines() if "output_layer: lm_head" in line).endswith("tied (shared weights)")
    assert "FLOPs per token:" in out and "memory: weights 474.7 MiB" in out
    assert "forward pass on random tokens [1, 128] -> logits (1, 128, 50257)" in out
    assert list(tmp_path.iterdir()) == []  # a build writes no files


def test_build_too_large_for_memory_stays_on_meta(tmp_path):
    result = megaspec("build", "model=llama", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "total parameters: 8,030,261,248" in result.stdout
    assert "built on the meta device: the weights need 29.9 GiB" in result.stdout


def test_build_with_size_and_slot_overrides(tmp_path):
    layer = "model.spec.submodules.decoder.submodules.layers.submodules"
    result = megaspec("build", "model=llama", *TINY, "model.config.num_query_groups=2", f"{layer}.self_attention.submodules.core_attention=eager",
                      cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "core_attention: eager" in result.stdout
    assert "layers[0..1]: transformer_layer x2" in result.stdout
    assert "logits (1, 16, 100)" in result.stdout


def test_help_lists_groups_and_cfg_job_prints_config(tmp_path):
    helped = megaspec("build", "--help", cwd=tmp_path)
    assert helped.returncode == 0
    assert "== Configuration groups ==" in helped.stdout
    groups = next(line for line in helped.stdout.splitlines() if line.startswith("model: "))
    assert {"gpt2", "llama"} <= set(groups.removeprefix("model: ").split(", "))
    cfg = megaspec("build", "model=llama", "--cfg", "job", cwd=tmp_path)
    assert cfg.returncode == 0
    assert "num_query_groups: 8" in cfg.stdout and "final_layernorm: rms_norm" in cfg.stdout


def test_bad_override_and_bad_spec_give_one_message_and_exit_1(tmp_path):
    bad_key = megaspec("build", "model.config.num_layerz=3", cwd=tmp_path)
    assert bad_key.returncode == 1
    assert "Could not override 'model.config.num_layerz'" in bad_key.stderr
    assert "Traceback" not in bad_key.stderr
    bad_name = megaspec("build", *TINY, "model.spec.submodules.decoder.submodules.layers.submodules.mlp.module=mlpp",
                        cwd=tmp_path)
    assert bad_name.returncode == 1
    assert bad_name.stderr.strip() == ("error: command line: decoder.layers[*].mlp: unknown module 'mlpp' "
                                       "(did you mean 'mlp'?); see `megaspec list`")
    bad_size = megaspec("build", "model.config.hidden_size=770", cwd=tmp_path)
    assert bad_size.returncode == 1
    assert bad_size.stderr.strip() == ("error: command line: config: hidden_size (770) must be "
                                       "divisible by num_attention_heads (12), or set kv_channels")


@pytest.mark.parametrize("runner", [["-m", "megaspec", "validate"], [str(ROOT / "tools" / "validate_spec.py")]])
def test_validate_shipped_and_broken_specs(tmp_path, runner):
    ok = subprocess.run([sys.executable, *runner, "specs/gpt2.yaml", "specs/llama.yaml"], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "specs/llama.yaml: ok (8,030,261,248 parameters, meta forward ok, output (1, 8, 128256))" in ok.stdout
    broken = tmp_path / "broken.yaml"
    broken.write_text((ROOT / "specs" / "llama.yaml").read_text()
                      .replace("core_attention: sdpa", "core_attention: spda")
                      .replace("input_layernorm: rms_norm", "input_layernorm: mlp"))
    bad = subprocess.run([sys.executable, *runner, str(broken), "--model", "llama"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"{broken}:") and ": decoder.layers[*].input_layernorm: 'mlp' is of kind mlp" in lines[0]
    assert ": decoder.layers[*].self_attention.core_attention: unknown module 'spda' (did you mean 'sdpa'?)" in lines[1]


def test_validate_catches_shape_mismatch_with_a_meta_forward(tmp_path):
    spec = tmp_path / "mismatch.yaml"
    # The block's final norm is sized for another width: only running the graph reveals it.
    spec.write_text((ROOT / "specs" / "gpt2.yaml").read_text().replace(
        "      final_layernorm: layer_norm", "      final_layernorm: {module: layer_norm, params: {hidden_size: 10}}"))
    result = megaspec("validate", str(spec), "--model", "gpt2", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith(f"{spec}:") and "meta forward failed" in result.stderr


def test_list_and_schema(tmp_path):
    listed = megaspec("list", "norm", cwd=tmp_path)
    assert listed.returncode == 0
    rows = [line.split() for line in listed.stdout.splitlines()]
    assert rows[0] == ["NAME", "KIND", "CLASS", "ORIGIN"]
    assert ["rms_norm", "norm"] == rows[[r[0] for r in rows].index("rms_norm")][:2]
    assert all(r[1] == "norm" for r in rows[1:])
    schema_file = tmp_path / "spec.schema.json"
    assert megaspec("schema", "-o", str(schema_file), cwd=tmp_path).returncode == 0
    schema = json.loads(schema_file.read_text())
    node = schema["$defs"]["ModuleSpec"]
    assert set(node["properties"]) == {"module", "params", "submodules", "config", "repeat"}
    assert "rms_norm" in node["properties"]["module"]["examples"]
    assert node["additionalProperties"] is False


def test_unknown_command_suggests(tmp_path):
    result = megaspec("biuld", cwd=tmp_path)
    assert result.returncode == 2
    assert "unknown command 'biuld' (did you mean 'build'?)" in result.stderr


def test_validate_without_sizes_reports_everything_that_needs_none(tmp_path):
    """A copy of a shipped spec that no model file uses, with no --model and no root config:."""
    broken = tmp_path / "my_copy_of_llama.yaml"
    broken.write_text((ROOT / "specs" / "llama.yaml").read_text()
                      .replace("core_attention: sdpa", "core_attention: spda")
                      .replace("input_layernorm: rms_norm", "input_layernorm: mlp")
                      .replace("params: {attn_mask_type: causal}", "params: {attn_mask_type: casual, dropout: 0.1}")
                      .replace("    module: transformer_block", "    module: transformer_block\n"
                               "    config: {ffn_hidden_size: wide}"))
    result = megaspec("validate", str(broken), cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"{broken}:15: decoder.config.ffn_hidden_size: expected int or None, got 'wide'",
        f"{broken}:21: decoder.layers[*].input_layernorm: 'mlp' is of kind mlp, but slot 'input_layernorm' of "
        "transformer_layer takes norm",
        f"{broken}:24: decoder.layers[*].self_attention.params.attn_mask_type: expected one of 'causal', 'padding', "
        "'no_mask', got 'casual'",
        f"{broken}:24: decoder.layers[*].self_attention.params.dropout: unknown param 'dropout'; accepted: "
        "attn_mask_type, qk_layernorm_per_head, rotary_table",
        f"{broken}:27: decoder.layers[*].self_attention.core_attention: unknown module 'spda' (did you mean "
        "'sdpa'?); see `megaspec list`",
        f"{broken}: sizes were not checked: the spec has no root `config:` and no model in conf/model uses it; "
        "give --model NAME (or a root `config:`) to build it on the meta device too"]
    fine = tmp_path / "my_mixtral.yaml"
    fine.write_text((ROOT / "specs" / "mixtral.yaml").read_text())
    ok = megaspec("validate", str(fine), cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == f"{fine}: names, kinds and params ok; sizes were not checked: the spec has no " \
                                "root `config:` and no model in conf/model uses it; give --model NAME (or a root " \
                                "`config:`) to build it on the meta device too"
    typo = tmp_path / "typo.yaml"
    typo.write_text(fine.read_text().replace("pattern: moe_layer_pattern", "pattern: moe_layer_patern"))
    bad = megaspec("validate", str(typo), cwd=tmp_path)
    assert bad.returncode == 1
    assert bad.stderr.splitlines()[0] == (f"{typo}:19: decoder.layers.pattern: no config field 'moe_layer_patern' "
                                          "(did you mean 'moe_layer_pattern'?)")
