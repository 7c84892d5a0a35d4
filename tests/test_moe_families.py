"""Qwen2-MoE, DeepSeek-V3 and DeepSeek-V2-Lite as shipped: published parameter counts, meta forwards, tiny
builds whose dense/MoE layout follows num_layers, and the `megaspec build` / `megaspec validate` commands."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import TINY

from megaspec import build_model, compose
from megaspec.build import meta_forward
from megaspec.modules.attention.latent import MultiLatentAttention
from megaspec.modules.mlp.mlp import MLP
from megaspec.modules.moe.layer import MoELayer

ROOT = Path(__file__).resolve().parent.parent
# As HF counts the published configurations (DeepSeek-V3's router correction biases are buffers, and its
# multi-token-prediction layer is not part of DeepseekV3ForCausalLM).
PUBLISHED = {"qwen2_moe": 14_315_784_192, "deepseek_v3": 671_026_404_352, "deepseek_v2_lite": 15_706_484_224}


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_parameter_count_and_meta_forward(name: str) -> None:
    model = build_model(name, device="meta")
    assert n_params(model) == PUBLISHED[name]
    out = meta_forward(model, batch=1, seq=8)
    assert out.logits.shape[:2] == (1, 8) and out.aux_loss.shape == ()


def hf_published(name: str) -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    if name == "qwen2_moe":  # Qwen1.5-MoE-A2.7B: the config class's defaults
        return transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig())
    if name == "deepseek_v3":  # DeepSeek-V3: the config class's defaults
        return transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config())
    return transformers.DeepseekV2ForCausalLM(transformers.DeepseekV2Config(
        hidden_size=2048, intermediate_size=10944, num_hidden_layers=27, num_attention_heads=16,
        num_key_value_heads=16, vocab_size=102400, q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64, num_experts_per_tok=6, n_shared_experts=2,
        moe_intermediate_size=1408, first_k_dense_replace=1))


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_hf_counts_the_same(name: str) -> None:
    with torch.device("meta"):
        assert n_params(hf_published(name)) == PUBLISHED[name]


def test_deepseek_v3_layout() -> None:
    model = build_model("deepseek_v3", device="meta")
    layers = model.decoder.layers
    assert [type(layer.mlp) for layer in layers[:4]] == [MLP, MLP, MLP, MoELayer] and len(layers) == 61
    attention = layers[0].self_attention
    assert isinstance(attention, MultiLatentAttention)
    assert attention.linear_q_up_proj.weight.shape == (128 * 192, 1536)
    assert attention.linear_kv_down_proj.weight.shape == (512 + 64, 7168)
    assert attention.linear_kv_up_proj.weight.shape == (128 * (128 + 128), 512)
    moe = layers[3].mlp
    assert moe.experts.fc1_weight.shape == (256, 2 * 2048, 7168) and moe.router.expert_bias.shape == (256,)
    assert len(model.aux_loss_modules) == 58
    short = build_model(compose(["model=deepseek_v3", "model.config.num_layers=4"]), device="meta")
    assert [type(layer.mlp) for layer in short.decoder.layers] == [MLP, MLP, MLP, MoELayer]


@pytest.mark.parametrize("name", ["qwen2_moe", "deepseek_v3", "deepseek_v2_lite"])
def test_tiny_builds_run_and_follow_num_layers(name: str) -> None:
    model = build_model(compose(TINY[name])).eval()
    ids = torch.randint(0, 64, (2, 12))
    out = model(ids, attention_mask=torch.ones(2, 12, dtype=torch.long), labels=ids)
    assert out.logits.shape == (2, 12, 64) and torch.isfinite(out.loss)
    deeper = build_model(compose([*TINY[name], "model.config.num_layers=5"]), device="meta")
    kinds = [type(layer.mlp) for layer in deeper.decoder.layers]
    first_dense = 0 if name == "qwen2_moe" else 1
    assert kinds == [MLP] * first_dense + [MoELayer] * (5 - first_dense)


def megaspec(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megaspec", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, check=False)


@pytest.mark.parametrize("name", ["qwen2_moe", "deepseek_v3", "deepseek_v2_lite"])
def test_megaspec_build_command(name: str) -> None:
    result = megaspec("build", *TINY[name], "build.seq_len=16")
    assert result.returncode == 0, result.stderr
    assert "logits (1, 16, 64)" in result.stdout
    assert "router: topk_router" in result.stdout


def test_megaspec_validate_command() -> None:
    result = megaspec("validate", "specs/qwen2_moe.yaml", "specs/deepseek_v3.yaml")
    assert result.returncode == 0, result.stderr
    # A spec several models use is checked at the first one's sizes (deepseek_v2_lite), or at --model's.
    assert "specs/qwen2_moe.yaml: ok (14,315,784,192 parameters, meta forward ok, output (1, 8, 151936))" in result.stdout
    assert "specs/deepseek_v3.yaml: ok (15,706,484,224 parameters, meta forward ok, output (1, 8, 102400))" \
        in result.stdout
    v3 = megaspec("validate", "specs/deepseek_v3.yaml", "--model", "deepseek_v3")
    assert v3.returncode == 0, v3.stderr
    assert "671,026,404,352 parameters" in v3.stdout


def readme_family_counts() -> dict[str, int]:
    """`model=` name -> parameters, from the README's family table."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Model families", 1)[1].split("\n## ", 1)[0]
    table = next(block for block in section.split("\n\n") if block.startswith("| `model=` |"))
    rows = [line.split("|") for line in table.splitlines()[2:]]  # after the header and its rule
    return {row[1].strip().strip("`"): int(row[-2].strip().replace(",", "")) for row in rows}


def test_readme_family_table_holds_the_meta_build_counts() -> None:
    counts = readme_family_counts()
    assert {name: counts[name] for name in PUBLISHED} == PUBLISHED
    for name, count in counts.items():
        assert n_params(build_model(name, device="meta")) == count, name
