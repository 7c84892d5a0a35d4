"""CLIP's vision tower (CLIPVisionModel) and LLaVA (CLIP + Llama) between HF transformers and megaspec."""

import pytest
import torch
from hf_cases import max_diff
from torch import Tensor, nn

import megaspec
from megaspec import SpecError, build_model, build_module, compose
from megaspec.interop.hf import from_hf, spec_from_hf, to_hf

transformers = pytest.importorskip("transformers")

VOCAB, IMAGE = 101, 100  # the image token is the last vocabulary id, as `<image>` in llava-1.5-7b-hf
IMAGE_SIZE, PATCH = 28, 7  # 4 x 4 patches, plus the class token


def perturbed(hf: nn.Module) -> nn.Module:
    """Every weight nudged (HF starts norms at the identity and biases at zero), in eval mode."""
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return hf.eval()


def vision_config(**overrides) -> object:
    fields = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  image_size=IMAGE_SIZE, patch_size=PATCH, hidden_act="quick_gelu", layer_norm_eps=1e-5)
    return transformers.CLIPVisionConfig(**{**fields, **overrides})


def tiny_clip(**overrides) -> nn.Module:
    torch.manual_seed(0)
    return perturbed(transformers.CLIPVisionModel(vision_config(**overrides)))


def tiny_llava(**overrides) -> nn.Module:
    torch.manual_seed(0)
    text = transformers.LlamaConfig(
        num_hidden_layers=2, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )  # fmt: skip
    fields = {"vision_config": vision_config(), "text_config": text, "image_token_index": IMAGE, **overrides}
    return perturbed(transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(**fields)))


def pixels(n: int) -> Tensor:
    return torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(2))


def prompts(tokens_per_image: int) -> tuple[Tensor, Tensor, Tensor]:
    """Two prompts holding 2 and 1 images (HF's expanded `<image>` runs), the second left-padded.

    Returns input_ids [2, s], attention_mask [2, s] and pixel_values [3, 3, H, W].
    """
    t = tokens_per_image
    input_ids = torch.randint(0, IMAGE, (2, 2 * t + 10), generator=torch.Generator().manual_seed(1))
    input_ids[0, 1 : 1 + t] = IMAGE
    input_ids[0, 4 + t : 4 + 2 * t] = IMAGE
    input_ids[1, 6 : 6 + t] = IMAGE
    mask = torch.ones_like(input_ids)
    mask[1, :4] = 0  # left padding
    return input_ids, mask, pixels(3)


def llava_diffs(ours: nn.Module, hf: nn.Module) -> dict[str, float]:
    """Max abs differences of logits (with and without padding, real tokens) and of the text-only loss."""
    input_ids, mask, pixel_values = prompts(ours.num_image_tokens)
    keep = mask.bool()
    # Text targets only: not at images or pads, nor where a left pad would predict.
    after_pad = torch.cat([torch.zeros(2, 1, dtype=torch.bool), ~keep[:, :-1]], dim=1)
    labels = input_ids.masked_fill(~keep | after_pad | (input_ids == IMAGE), -100)
    with torch.no_grad():
        plain = max_diff(ours(input_ids, pixel_values).logits,
                         hf(input_ids=input_ids, pixel_values=pixel_values).logits)
        got = ours(input_ids, pixel_values, attention_mask=mask, labels=labels)
        want = hf(input_ids=input_ids, pixel_values=pixel_values, attention_mask=mask, labels=labels)
    return {"logits": plain, "padded logits": max_diff(got.logits[keep], want.logits[keep]),
            "loss": max_diff(got.loss, want.loss)}


def assert_llava_parity(ours: nn.Module, hf: nn.Module, atol: float = 1e-4) -> None:
    found = llava_diffs(ours, hf)
    assert max(found.values()) <= atol, found


def assert_same_state(hf: nn.Module, back: nn.Module) -> None:
    assert back.state_dict().keys() == hf.state_dict().keys()
    for name, tensor in hf.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name


# ---- CLIP vision ------------------------------------------------------------------------------


def test_clip_vision_from_hf_matches_hf_and_back() -> None:
    hf = tiny_clip(hidden_act="gelu")
    ours = from_hf(hf)
    assert megaspec.build_record(ours).configs[""].activation == "gelu" and ours.num_patches == 16
    with torch.no_grad():
        got, want = ours(pixels(2)), hf(pixels(2), output_hidden_states=True)
        assert max_diff(got.last_hidden_state, want.last_hidden_state) <= 1e-4
        assert max_diff(got.pooler_output, want.pooler_output) <= 1e-4
        for layer, hidden in enumerate(want.hidden_states):  # every layer's tokens, as LLaVA reads them
            assert max_diff(ours.hidden_states(pixels(2), layer), hidden) <= 1e-4
    assert_same_state(hf, to_hf(ours))


def test_clip_vision_to_hf_reproduces_megaspec_outputs(tmp_path) -> None:
    spec, configs = spec_from_hf(tiny_clip().config)
    torch.manual_seed(3)
    ours = build_module(spec, configs).eval()
    hf = to_hf(ours, tmp_path / "hf")
    assert type(hf).__name__ == "CLIPVisionModel"
    again = transformers.CLIPVisionModel.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        got = ours(pixels(2))
        for theirs in (hf(pixels(2)), again(pixels(2))):
            assert max_diff(got.last_hidden_state, theirs.last_hidden_state) <= 1e-5
            assert max_diff(got.pooler_output, theirs.pooler_output) <= 1e-5


def test_clip_vision_with_projection_is_refused() -> None:
    torch.manual_seed(0)
    hf = transformers.CLIPVisionModelWithProjection(vision_config(projection_dim=16))
    with pytest.raises(SpecError, match=r"unsupported HF class 'CLIPVisionModelWithProjection': megaspec converts "
                                        r"CLIP's vision tower as CLIPVisionModel"):
        from_hf(hf)


# ---- LLaVA ------------------------------------------------------------------------------------


def test_llava_from_hf_matches_hf() -> None:
    hf = tiny_llava()
    ours = from_hf(hf)
    assert set(megaspec.build_record(ours).configs) == {"language", "vision"}
    assert megaspec.build_record(ours).configs["vision"].num_layers == 3 and megaspec.build_record(ours).configs["language"].query_groups == 2
    assert ours.image_token_index == IMAGE and ours.num_image_tokens == 16  # class token dropped
    assert_llava_parity(ours, hf)
    assert_same_state(hf, to_hf(ours))


def test_llava_options_carry_over() -> None:
    """Full features from the last layer, a bias-free projector with another activation, a tied head."""
    text = transformers.LlamaConfig(num_hidden_layers=1, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                                    vocab_size=VOCAB, tie_word_embeddings=True)
    hf = tiny_llava(text_config=text, vision_feature_layer=-1, vision_feature_select_strategy="full",
                    multimodal_projector_bias=False, projector_hidden_act="gelu_pytorch_tanh")
    ours = from_hf(hf)
    assert ours.num_image_tokens == 17 and ours.vision_feature_layer == -1
    assert ours.vision_projection.linear_fc1.bias is None
    assert ours.language_model.output_layer.weight is None  # tied to the embedding
    assert_llava_parity(ours, hf)
    back = to_hf(ours)
    assert back.config.projector_hidden_act == "gelu_new" and not back.config.multimodal_projector_bias
    assert back.config.tie_word_embeddings and back.config.vision_feature_select_strategy == "full"
    assert_llava_parity(ours, back, atol=1e-5)


def test_llava_to_hf_reproduces_megaspec_outputs() -> None:
    """conf/model/llava.yaml at a tiny size, megaspec-initialised, carried to HF."""
    tiny = [
        "model=llava", "model.config.language.num_layers=2", "model.config.language.hidden_size=64",
        "model.config.language.num_attention_heads=4", "model.config.language.num_query_groups=2",
        "model.config.language.ffn_hidden_size=96", f"model.config.language.vocab_size={VOCAB}",
        "model.config.vision.num_layers=3", "model.config.vision.hidden_size=32",
        "model.config.vision.num_attention_heads=4", "model.config.vision.ffn_hidden_size=64",
        f"model.config.vision.image_size={IMAGE_SIZE}", f"model.config.vision.patch_size={PATCH}",
        f"model.spec.params.image_token_index={IMAGE}",
    ]  # fmt: skip
    torch.manual_seed(3)
    ours = build_model(compose(tiny)).eval()
    hf = to_hf(ours)
    assert type(hf).__name__ == "LlavaForConditionalGeneration"
    assert (hf.config.image_token_index, hf.config.vision_feature_layer, hf.config.text_config.vocab_size) == (
        IMAGE, -2, VOCAB)
    assert_llava_parity(ours, hf, atol=1e-5)


def test_llava_unsupported_options_are_named() -> None:
    with pytest.raises(SpecError, match=r"unsupported LLaVA configuration: vision_feature_layer=\[-2, -1\]"):
        from_hf(tiny_llava(vision_feature_layer=[-2, -1]))
    text = transformers.Qwen2Config(num_hidden_layers=1, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                                    num_key_value_heads=2, vocab_size=VOCAB)
    with pytest.raises(SpecError, match=r"unsupported LLaVA configuration: text_config_model_type='qwen2' "
                                        r"\(megaspec supports 'llama'\)"):
        from_hf(tiny_llava(text_config=text))
