"""Mixtral from specs/mixtral.yaml: HF parity, the published parameter count, layer interleaving, the CLI."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_gpt_parity import fuse_qkv  # noqa: E402  (tests/ is on sys.path, see conftest)
from torch import nn

from megaspec import build_model, compose
from megaspec.build import meta_forward
from megaspec.modules.mlp.mlp import MLP
from megaspec.modules.moe.experts import GroupedExperts, SequentialExperts
from megaspec.modules.moe.layer import MoELayer

ROOT = Path(__file__).resolve().parent.parent
MIXTRAL_8X7B = 46_702_792_704
VOCAB, SEQ = 101, 12
TINY = [
    "model=mixtral", "model.config.num_layers=2", "model.config.hidden_size=64",
    "model.config.num_attention_heads=4", "model.config.num_query_groups=2", "model.config.ffn_hidden_size=48",
    "model.config.num_moe_experts=4", f"model.config.vocab_size={VOCAB}",
    "model.config.max_position_embeddings=64",
]  # fmt: skip


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_mixtral_8x7b_parameter_count_and_meta_forward() -> None:
    model = build_model("mixtral", device="meta")
    assert n_params(model) == MIXTRAL_8X7B
    layer = model.decoder.layers[0]
    assert isinstance(layer.mlp, MoELayer) and isinstance(layer.mlp.experts, GroupedExperts)
    assert layer.mlp.experts.fc1_weight.shape == (8, 2 * 14336, 4096)
    assert layer.mlp.experts.fc2_weight.shape == (8, 4096, 14336)
    assert len(model.aux_loss_modules) == 32
    out = meta_forward(model, batch=2, seq=16)
    assert out.logits.shape == (2, 16, 32000) and out.aux_loss.shape == ()


def test_mixtral_8x7b_matches_hf_parameter_count() -> None:
    transformers = pytest.importorskip("transformers")
    with torch.device("meta"):
        hf = transformers.MixtralForCausalLM(transformers.MixtralConfig())
    assert n_params(hf) == MIXTRAL_8X7B


def test_moe_layer_freq_is_one_override() -> None:
    every_other = build_model(compose([*TINY, "model.config.num_layers=4", "model.config.moe_layer_freq=2",
                                       "model.config.moe_ffn_hidden_size=24"]),
                              device="meta")  # fmt: skip
    kinds = [type(layer.mlp) for layer in every_other.decoder.layers]
    assert kinds == [MoELayer, MLP, MoELayer, MLP]
    assert len(every_other.aux_loss_modules) == 2
    listed = build_model(compose([*TINY, "model.config.num_layers=3", "model.config.moe_layer_freq=[0,0,1]",
                                 "model.config.moe_ffn_hidden_size=24"]),
                         device="meta")  # fmt: skip
    assert [type(layer.mlp) for layer in listed.decoder.layers] == [MLP, MLP, MoELayer]


# ---- HF parity ---------------------------------------------------------------------------------


EXPERTS = "model.spec.submodules.decoder.submodules.layers.nodes.moe.submodules.mlp.submodules.experts"


def tiny_pair(aux_coef: float = 0.0, experts: str = "grouped_experts") -> tuple[nn.Module, nn.Module]:
    """A tiny random HF Mixtral and ours with its weights copied in."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf_config = transformers.MixtralConfig(
        num_hidden_layers=2, hidden_size=64, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
        num_local_experts=4, num_experts_per_tok=2, vocab_size=VOCAB, max_position_embeddings=64,
        rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 1e6}, tie_word_embeddings=False,
        router_aux_loss_coef=aux_coef, output_router_logits=True, attn_implementation="sdpa",
    )  # fmt: skip
    hf = transformers.MixtralForCausalLM(hf_config).eval()
    # Our coefficient multiplies Megatron's loss, which is HF's divided by top-k.
    ours = build_model(compose([*TINY, f"model.config.moe_aux_loss_coeff={aux_coef * 2}", f"{EXPERTS}={experts}"]))
    ours.eval()
    load_hf_mixtral(ours, hf)
    return ours, hf


@torch.no_grad()
def load_hf_mixtral(ours: nn.Module, hf: nn.Module) -> None:
    """Copy MixtralForCausalLM weights: attention as Llama's, experts already stacked [E, out, in]."""
    m = hf.model
    groups = hf.config.num_key_value_heads
    ours.embedding.weight.copy_(m.embed_tokens.weight)
    for layer, block in zip(ours.decoder.layers, m.layers, strict=True):
        attn, moe = block.self_attn, block.mlp
        layer.input_layernorm.weight.copy_(block.input_layernorm.weight)
        layer.pre_mlp_layernorm.weight.copy_(block.post_attention_layernorm.weight)
        fused = fuse_qkv(attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, groups)
        layer.self_attention.linear_qkv.weight.copy_(fused)
        layer.self_attention.linear_proj.weight.copy_(attn.o_proj.weight)
        layer.mlp.router.weight.copy_(moe.gate.weight)
        layer.mlp.experts.fc1_weight.copy_(moe.experts.gate_up_proj)  # [E, gate | up, h]
        layer.mlp.experts.fc2_weight.copy_(moe.experts.down_proj)
    ours.decoder.final_layernorm.weight.copy_(m.norm.weight)
    ours.output_layer.weight.copy_(hf.lm_head.weight)


def record_choices(routers: list[nn.Module], index: int) -> tuple[list[torch.Tensor], list]:
    """Hooks that collect each router's expert indices (output `index`), sorted per token to compare as sets."""
    picks: list[torch.Tensor] = []
    hooks = [r.register_forward_hook(lambda mod, args, out: picks.append(out[index].sort(-1).values))
             for r in routers]  # fmt: skip
    return picks, hooks


@pytest.mark.parametrize("experts", [GroupedExperts, SequentialExperts])
def test_logits_and_expert_choices_match_hf(experts: type[nn.Module]) -> None:
    ours, hf = tiny_pair(experts=f"{experts.__name__.removesuffix('Experts').lower()}_experts")
    assert isinstance(ours.decoder.layers[0].mlp.experts, experts)
    input_ids = torch.randint(0, VOCAB, (3, SEQ), generator=torch.Generator().manual_seed(1))
    hf_picks, hf_hooks = record_choices([block.mlp.gate for block in hf.model.layers], index=2)
    our_picks, our_hooks = record_choices([layer.mlp.router for layer in ours.decoder.layers], index=1)
    with torch.no_grad():
        want = hf(input_ids).logits
        got = ours(input_ids).logits
    for hook in hf_hooks + our_hooks:
        hook.remove()
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert len(our_picks) == len(hf_picks) == 2
    for ours_pick, hf_pick in zip(our_picks, hf_picks, strict=True):
        assert torch.equal(ours_pick, hf_pick)  # the same two experts for every token
    for layer, hf_pick in zip(ours.decoder.layers, hf_picks, strict=True):
        torch.testing.assert_close(layer.mlp.tokens_per_expert, torch.bincount(hf_pick.flatten(), minlength=4))


def test_loss_and_aux_loss_match_hf() -> None:
    ours, hf = tiny_pair(aux_coef=0.02)
    input_ids = torch.randint(0, VOCAB, (3, SEQ), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = ours(input_ids, labels=input_ids)
        want = hf(input_ids, labels=input_ids)
    # HF pools all layers' routing before the product; ours (Megatron's) sums per-layer losses.
    # Per layer, HF's loss is top-k times Megatron's.
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    per_layer = [load_balancing_loss_func((logits,), 4, 2) for logits in want.router_logits]
    torch.testing.assert_close(got.aux_loss, 0.02 * sum(per_layer), atol=1e-6, rtol=1e-5)
    lm_loss = want.loss - 0.02 * want.aux_loss
    torch.testing.assert_close(got.loss, lm_loss + got.aux_loss, atol=1e-5, rtol=0)


def test_cli_builds_tiny_mixtral(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "megaspec", "build", *TINY, "model.config.moe_layer_freq=2", "build.seq_len=16"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    want = n_params(build_model(compose([*TINY, "model.config.moe_layer_freq=2"]), device="meta"))
    assert f"total parameters: {want:,}" in result.stdout
    assert "mlp: moe" in result.stdout and "mlp: mlp" in result.stdout
    assert "forward pass on random tokens [1, 16] -> logits (1, 16, 101)" in result.stdout


def test_moe_without_experts_is_a_located_error() -> None:
    from megaspec import SpecError

    layer = "model.spec.submodules.decoder.submodules.layers.submodules.mlp"
    cfg = compose(["model=llama", "model.config.num_layers=2", "model.config.hidden_size=64",
                   "model.config.num_attention_heads=4", "model.config.num_query_groups=2",
                   "model.config.vocab_size=100", f"{layer}=moe"])  # fmt: skip
    with pytest.raises(SpecError) as info:
        build_model(cfg, device="meta")
    assert str(info.value) == (
        "command line: decoder.layers[*].mlp.router: building 'topk_router' (TopKRouter) failed: "
        "ValueError: topk_router needs config.num_moe_experts (the number of routed experts)"
    )


def test_shared_experts_through_the_spec() -> None:
    moe = "model.spec.submodules.decoder.submodules.layers.nodes.moe.submodules.mlp.submodules"
    cfg = compose([*TINY, "model.config.moe_shared_expert_intermediate_size=32",
                   "model.config.moe_shared_expert_gate=true", f"+{moe}.shared_experts=shared_expert_mlp"])  # fmt: skip
    model = build_model(cfg)
    shared = model.decoder.layers[0].mlp.shared_experts
    assert shared.linear_fc1.weight.shape == (64, 64) and shared.gate_weight.shape == (1, 64)
    # 64 * 64 (fc1, gated 2 x 32) + 32 * 64 (fc2) + 64 (gate), in each of the 2 layers.
    plain = n_params(build_model(compose(TINY), device="meta"))
    assert n_params(model) == plain + 2 * (64 * 64 + 32 * 64 + 64)
    assert model(**model.example_inputs(batch=2, seq=8)).logits.shape == (2, 8, VOCAB)
