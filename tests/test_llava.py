"""LLaVA-1.5 and its CLIP ViT tower, built from specs/llava.yaml: HF parity, feature selection, counts, CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_gpt_parity import fuse_qkv, load_hf_llama
from torch import Tensor, nn

from megaspec import SpecError, build_model, build_record, compose
from megaspec.models.llava import LLaVAModel

ROOT = Path(__file__).resolve().parent.parent
VOCAB, IMAGE = 101, 100  # the image token is the last vocabulary id, as `<image>` in llava-1.5-7b-hf
VISION_LAYERS, IMAGE_SIZE, PATCH = 3, 28, 7  # 4 x 4 = 16 patches, plus the class token
TINY = [
    "model.config.language.num_layers=2", "model.config.language.hidden_size=64",
    "model.config.language.num_attention_heads=4", "model.config.language.num_query_groups=2",
    "model.config.language.ffn_hidden_size=96", f"model.config.language.vocab_size={VOCAB}",
    f"model.config.vision.num_layers={VISION_LAYERS}", "model.config.vision.hidden_size=32",
    "model.config.vision.num_attention_heads=4", "model.config.vision.ffn_hidden_size=64",
    f"model.config.vision.image_size={IMAGE_SIZE}", f"model.config.vision.patch_size={PATCH}",
    f"model.spec.params.image_token_index={IMAGE}",
]  # fmt: skip


def hf_llava(feature_layer: int, strategy: str) -> nn.Module:
    """HF LlavaForConditionalGeneration of the TINY sizes, random weights."""
    transformers = pytest.importorskip("transformers")
    vision = transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=VISION_LAYERS, num_attention_heads=4,
        image_size=IMAGE_SIZE, patch_size=PATCH, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    )  # fmt: skip
    text = transformers.LlamaConfig(
        num_hidden_layers=2, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )  # fmt: skip
    config = transformers.LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=IMAGE, projector_hidden_act="gelu",
        vision_feature_layer=feature_layer, vision_feature_select_strategy=strategy,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlavaForConditionalGeneration(config).eval()


@torch.no_grad()
def load_hf_clip_vision(ours: nn.Module, hf: nn.Module) -> None:
    """Copy an HF CLIPVisionModel into our vision_transformer (fusing q/k/v per head)."""
    emb, heads = hf.embeddings, hf.config.num_attention_heads
    ours.embedding.weight.copy_(emb.patch_embedding.weight)
    ours.embedding.class_embedding.copy_(emb.class_embedding)
    ours.embedding.position_embedding.copy_(emb.position_embedding.weight)
    ours.pre_layernorm.load_state_dict(hf.pre_layrnorm.state_dict())
    ours.post_layernorm.load_state_dict(hf.post_layernorm.state_dict())
    for layer, block in zip(ours.encoder.layers, hf.encoder.layers, strict=True):
        attn = block.self_attn
        layer.input_layernorm.load_state_dict(block.layer_norm1.state_dict())
        layer.pre_mlp_layernorm.load_state_dict(block.layer_norm2.state_dict())
        qkv = layer.self_attention.linear_qkv
        qkv.weight.copy_(fuse_qkv(attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, heads))
        qkv.bias.copy_(fuse_qkv(attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias, heads))
        layer.self_attention.linear_proj.load_state_dict(attn.out_proj.state_dict())
        layer.mlp.linear_fc1.load_state_dict(block.mlp.fc1.state_dict())
        layer.mlp.linear_fc2.load_state_dict(block.mlp.fc2.state_dict())


@torch.no_grad()
def load_hf_llava(ours: LLaVAModel, hf: nn.Module) -> None:
    """Copy LlavaForConditionalGeneration weights into ours: tower, projector, language model."""
    load_hf_clip_vision(ours.vision_model, hf.model.vision_tower)
    projector = hf.model.multi_modal_projector
    ours.vision_projection.linear_fc1.load_state_dict(projector.linear_1.state_dict())
    ours.vision_projection.linear_fc2.load_state_dict(projector.linear_2.state_dict())
    # HF's LLaVA holds a bare LlamaModel and the head beside it: the LlamaForCausalLM layout, split.
    llama = SimpleNamespace(model=hf.model.language_model, lm_head=hf.lm_head, config=hf.config.text_config)
    load_hf_llama(ours.language_model, llama)


def tiny_pair(feature_layer: int = -2, strategy: str = "default") -> tuple[LLaVAModel, nn.Module]:
    """Ours from conf/model/llava.yaml + specs/llava.yaml at the TINY sizes, with HF's weights."""
    hf = hf_llava(feature_layer, strategy)
    params = [f"model.spec.params.vision_feature_layer={feature_layer}",
              f"model.spec.params.vision_feature_select_strategy={strategy}"]
    ours = build_model(compose(["model=llava", *TINY, *params])).eval()
    load_hf_llava(ours, hf)
    return ours, hf


def prompts(tokens_per_image: int) -> tuple[Tensor, Tensor, Tensor]:
    """Two prompts holding 2 and 1 images (HF's expanded `<image>` runs), the second left-padded.

    Returns input_ids [2, s], attention_mask [2, s] and pixel_values [3, 3, H, W].
    """
    t = tokens_per_image
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, IMAGE, (2, 2 * t + 10), generator=generator)
    input_ids[0, 1 : 1 + t] = IMAGE
    input_ids[0, 4 + t : 4 + 2 * t] = IMAGE
    input_ids[1, 6 : 6 + t] = IMAGE
    mask = torch.ones_like(input_ids)
    mask[1, :4] = 0  # left padding
    pixel_values = torch.randn(3, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    return input_ids, mask, pixel_values


def assert_llava_parity(ours: LLaVAModel, hf: nn.Module) -> None:
    """Logits (with and without padding) and loss equal HF's, with image features in the prompt."""
    input_ids, mask, pixel_values = prompts(ours.num_image_tokens)
    keep = mask.bool()
    with torch.no_grad():
        got, want = ours(input_ids, pixel_values).logits, hf(input_ids=input_ids, pixel_values=pixel_values).logits
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
        got = ours(input_ids, pixel_values, attention_mask=mask).logits
        want = hf(input_ids=input_ids, pixel_values=pixel_values, attention_mask=mask).logits
        torch.testing.assert_close(got[keep], want[keep], atol=1e-4, rtol=0)
        # Text targets only: not at images or pads, nor where a left pad would predict.
        after_pad = torch.cat([torch.zeros(2, 1, dtype=torch.bool), ~keep[:, :-1]], dim=1)
        labels = input_ids.masked_fill(~keep | after_pad | (input_ids == IMAGE), -100)
        got = ours(input_ids, pixel_values, attention_mask=mask, labels=labels).loss
        want = hf(input_ids=input_ids, pixel_values=pixel_values, attention_mask=mask, labels=labels).loss
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


# ---- tests ------------------------------------------------------------------------------------


def test_llava_matches_hf() -> None:
    ours, hf = tiny_pair()
    assert ours.num_image_tokens == 16  # the class token is dropped
    assert_llava_parity(ours, hf)


# Layer 0 is written -4 here: HF reads a feature layer of 0 as "no hidden states" (tower test covers 0).
@pytest.mark.parametrize(("feature_layer", "strategy", "tokens"), [
    (-1, "full", 17), (1, "full", 17), (-4, "default", 16),
])  # fmt: skip
def test_feature_layer_and_select_strategy_match_hf(feature_layer: int, strategy: str, tokens: int) -> None:
    ours, hf = tiny_pair(feature_layer, strategy)
    assert ours.num_image_tokens == tokens
    assert_llava_parity(ours, hf)


def test_clip_vision_tower_matches_hf_hidden_states() -> None:
    """Every hidden state HF's CLIPVisionModel reports, and its last and pooled outputs."""
    ours, hf = tiny_pair()
    tower, hf_tower = ours.vision_model, hf.model.vision_tower
    _, _, pixel_values = prompts(16)
    with torch.no_grad():
        want = hf_tower(pixel_values, output_hidden_states=True)
        assert len(want.hidden_states) == VISION_LAYERS + 1
        for layer in range(-VISION_LAYERS - 1, VISION_LAYERS + 1):
            got = tower.hidden_states(pixel_values, layer)  # [3, 17, 32]
            torch.testing.assert_close(got, want.hidden_states[layer], atol=1e-5, rtol=0)
        got = tower(pixel_values)
        torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, atol=1e-5, rtol=0)
        torch.testing.assert_close(got.pooler_output, want.pooler_output, atol=1e-5, rtol=0)
    # Features from layer -2 never run the last layer.
    ran = []
    hook = tower.encoder.layers[-1].register_forward_hook(lambda *_: ran.append(True))
    ours(*prompts(16)[::2])
    hook.remove()
    assert ran == []


def test_image_token_count_mismatch_is_a_clear_error() -> None:
    ours, _ = tiny_pair()
    input_ids, _, pixel_values = prompts(16)
    with pytest.raises(SpecError) as info:
        ours(input_ids, pixel_values[:2])
    assert str(info.value) == ("the prompt holds 48 image tokens (id 100) but 2 image(s) give 32 features "
                               "(16 per image); put exactly 16 image tokens in the prompt for each image")
    with pytest.raises(SpecError, match="the prompt holds 48 image tokens .* but 0 image"):
        ours(input_ids)
    with pytest.raises(SpecError) as info:
        ours(input_ids, pixel_values[..., :14, :14])
    assert str(info.value) == "images are 14x14 but the patch embedding was built for 28x28 (config.image_size)"
    text_only = input_ids.masked_fill(input_ids == IMAGE, 5)
    assert ours(text_only).logits.shape == (2, 42, VOCAB)


def test_out_of_range_feature_layer_is_located() -> None:
    with pytest.raises(SpecError) as info:
        build_model(compose(["model=llava", *TINY, "model.spec.params.vision_feature_layer=4"]), device="meta")
    assert str(info.value).startswith("specs/llava.yaml:11: <root>: building 'llava_model' (LLaVAModel) failed: "
                                      "ValueError: vision_feature_layer 4 is out of range")


def test_llava_1_5_7b_parameter_count_equals_hf() -> None:
    """7,063,427,072, as HF's LlavaForConditionalGeneration for llava-1.5-7b-hf (built here on meta)."""
    model = build_model("llava", device="meta")
    assert sum(p.numel() for p in model.parameters()) == 7_063_427_072
    # HF's vision tower holds CLIP's post_layernorm although LLaVA never reads it; so does ours.
    assert sum(p.numel() for p in model.vision_model.parameters()) == 303_507_456
    assert sum(p.numel() for p in model.vision_projection.parameters()) == 20_979_712
    assert model.num_image_tokens == 576
    ids = model.example_inputs(batch=2, seq=8, device="cpu")["input_ids"]
    assert ids.shape == (2, 8 + 576) and (ids == 32000).sum(dim=1).tolist() == [576, 576]
    with torch.no_grad():
        assert model(**model.example_inputs(batch=2, seq=8, device="meta")).logits.shape == (2, 8 + 576, 32064)

    transformers = pytest.importorskip("transformers")
    vision = transformers.CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    )  # fmt: skip
    text = transformers.LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )  # fmt: skip
    with torch.device("meta"):
        hf = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(vision_config=vision, text_config=text))
    assert sum(p.numel() for p in hf.parameters()) == 7_063_427_072


def megaspec(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run `python -m megaspec ARGS` and capture its output."""
    return subprocess.run([sys.executable, "-m", "megaspec", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_validate_llava_spec() -> None:
    result = megaspec("validate", "specs/llava.yaml", cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ("specs/llava.yaml: ok (7,063,427,072 parameters, meta forward ok, "
                                     "output (1, 584, 32064))")


def test_build_tiny_llava_prints_both_subtrees(tmp_path: Path) -> None:
    result = megaspec("build", "model=llava", *TINY, "build.seq_len=16", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    # "slot: registered name ... parameters", the first row of each name, e.g. rows["vision_model"].
    rows: dict[str, tuple[str, str]] = {}
    for line in out.splitlines():
        if ": " in line and line.startswith("  "):
            slot, rest = line.strip().split(": ", 1)
            rows.setdefault(slot, (rest.split()[0], rest.split()[-1]))
    # The vision subtree, at the vision config's sizes: 3 layers of width 32, 4 x 4 patches + class token.
    assert rows["vision_model"] == ("vision_transformer", "31,040")
    assert rows["embedding"] == ("patch_embedding", "5,280")  # 32x3x7x7 kernel, 32 class, 17x32 positions
    assert rows["pre_layernorm"] == ("layer_norm", "64") and rows["post_layernorm"] == ("layer_norm", "64")
    assert "layers[0..2]: transformer_layer x3" in out and "8,544 each" in out
    # The projector (32 -> 64 -> 64), then the language subtree at the language config's sizes.
    assert rows["vision_projection"] == ("mlp2x_gelu", "6,272")
    assert rows["language_model"] == ("gpt_model", "74,688")
    assert "layers[0..1]: transformer_layer x2" in out and "30,848 each" in out
    assert "activation: quick_gelu" in out and "activation: silu" in out
    assert "total parameters: 112,000" in out
    # `seq_len` text tokens plus one image's 16 tokens.
    assert "forward pass on random tokens [1, 16] -> logits (1, 32, 101)" in out


def test_any_language_model_spec_plugs_in() -> None:
    """The language model is a slot: another shipped spec replaces the Llama layout by one override."""
    cfg = compose(["model=llava", *TINY, "+specs@model.spec.submodules.language_model=gpt2",
                   "model.config.language.gated_linear_unit=false", "model.config.language.add_bias_linear=true",
                   "model.config.language.share_embeddings_and_output_weights=true",
                   "~model.config.language.rotary_base"])  # GPT-2's learned positions have no RoPE base
    model = build_model(cfg, device="meta")
    lm = model.language_model
    names = build_record(model).modules
    assert [names["language_model.position_embedding"].name, names["language_model.decoder.final_layernorm"].name] \
        == ["learned_position_embedding", "layer_norm"]
    assert lm.output_layer.weight is None  # tied, as GPT-2
    assert names["vision_model.encoder.layers.0.mlp.activation"].name == "quick_gelu"
    with torch.no_grad():
        assert model(**model.example_inputs(batch=1, seq=4, device="meta")).logits.shape == (1, 20, VOCAB)


def test_forward_traces_as_one_graph() -> None:
    """torch.compile(fullgraph=True) sees no graph break: the token-count check runs only eagerly."""
    ours, _ = tiny_pair()
    input_ids, mask, pixel_values = prompts(ours.num_image_tokens)
    compiled = torch.compile(ours, backend="eager", fullgraph=True)  # Dynamo only: no C++ toolchain needed
    with torch.no_grad():
        got = compiled(input_ids, pixel_values, attention_mask=mask, labels=input_ids)
        want = ours(input_ids, pixel_values, attention_mask=mask, labels=input_ids)
    torch.testing.assert_close(got.logits, want.logits)
    torch.testing.assert_close(got.loss, want.loss)
