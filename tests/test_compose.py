"""Hydra composition: the override grammar, spec swaps and located errors."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

import megaspec
from megaspec import SpecError, build_model, compose

LAYER = "model.spec.submodules.decoder.submodules.layers"
TINY = ["model.config.num_layers=2", "model.config.hidden_size=64", "model.config.num_attention_heads=4",
        "model.config.ffn_hidden_size=128", "model.config.vocab_size=100", "model.config.max_position_embeddings=32"]


def test_composed_config_holds_config_and_inline_spec():
    cfg = compose(["model=llama", "model.config.num_layers=4"])
    assert cfg.model.config.num_layers == 4
    assert cfg.model.config.num_query_groups == 8
    assert cfg.model.spec.module == "gpt_model"
    assert cfg.model.spec.submodules.decoder.submodules.final_layernorm == "rms_norm"
    assert dict(cfg.sources) == {"model": "conf/model/llama.yaml", "spec": "specs/llama.yaml",
                                 "overrides": ["model=llama", "model.config.num_layers=4"]}
    # Every field is there with its default, also those the model file does not set.
    assert cfg.model.config.qk_layernorm is False and cfg.model.config.rope_scaling is None


def test_size_override_changes_the_built_model():
    model = build_model(compose([*TINY, "model.config.num_layers=3"]), device="meta")
    assert len(model.decoder.layers) == 3
    assert model.decoder.layers[0].mlp.linear_fc1.weight.shape == (128, 64)


def test_one_override_swaps_the_mlp_of_every_layer(toys):
    # A bare name replaces the whole node; the new module's slots take their defaults.
    model = build_model(compose([*TINY, f"{LAYER}.submodules.mlp=toy_mlp"]), device="meta")
    assert [type(layer.mlp).__name__ for layer in model.decoder.layers] == ["ToyMlp", "ToyMlp"]
    # A node with params replaces the node there too, in one override (not merged into the old one).
    cfg = compose([*TINY, f"{LAYER}.submodules.mlp={{module: toy_mlp, params: {{ffn_hidden_size: 7}}}}",
                   "~model.config.ffn_hidden_size"])  # the param, not the config, sizes it now
    assert OmegaConf.to_container(cfg.model.spec.submodules.decoder.submodules.layers.submodules.mlp) == {
        "module": "toy_mlp", "params": {"ffn_hidden_size": 7}}
    model = build_model(cfg, device="meta")
    assert [layer.mlp.width for layer in model.decoder.layers] == [7, 7]


def test_plus_and_tilde_and_group_choice():
    cfg = compose([*TINY, f"+{LAYER}.config.ffn_hidden_size=96", "~model.spec.submodules.position_embedding",
                   "specs@model.spec=llama", "~model.config.max_position_embeddings",
                   "~model.config.ffn_hidden_size"])  # every layer's own ffn_hidden_size replaces it
    assert cfg.model.spec.submodules.decoder.submodules.layers.submodules.input_layernorm == "rms_norm"
    assert "position_embedding" not in cfg.model.spec.submodules
    model = build_model(cfg, device="meta")
    assert model.decoder.layers[1].mlp.linear_fc2.weight.shape == (64, 96)
    assert model.position_embedding is None


def test_bad_override_is_one_readable_error():
    with pytest.raises(SpecError, match="Could not override 'model.config.num_layerz'"):
        compose(["model.config.num_layerz=3"])
    with pytest.raises(SpecError, match="Could not find 'model/nope'"):
        compose(["model=nope"])


def test_errors_from_overrides_and_files_are_located():
    with pytest.raises(SpecError) as info:
        build_model(compose([*TINY, f"{LAYER}.submodules.mlp.module=mlpp"]), device="meta")
    assert str(info.value).startswith(
        "command line: decoder.layers[*].mlp: unknown module 'mlpp' (did you mean 'mlp'?)")
    with pytest.raises(SpecError) as info:
        build_model(compose([*TINY, "model.config.num_query_groups=3"]), device="meta")
    assert str(info.value) == ("command line: config: num_attention_heads (4) must be "
                               "divisible by num_query_groups (3)")
    with pytest.raises(SpecError) as info:
        build_model(compose([*TINY, "model.config.hidden_size=big"]), device="meta")
    assert str(info.value) == "command line: config.hidden_size: expected int, got 'big'"


def test_build_model_accepts_a_model_name_and_a_spec_file(tmp_path):
    meta = build_model("gpt2", device="meta")
    assert sum(p.numel() for p in meta.parameters()) == 124_439_808
    spec = tmp_path / "small.yaml"
    spec.write_text("module: gpt_model\nconfig: {num_layers: 1, hidden_size: 32, num_attention_heads: 2,"
                    " vocab_size: 50, max_position_embeddings: 16}\nsubmodules:\n"
                    "  embedding: vocab_embedding\n  position_embedding: learned_position_embedding\n"
                    "  decoder:\n    module: transformer_block\n    submodules:\n"
                    "      layers: {module: transformer_layer, submodules: {self_attention: {module: self_attention,"
                    " submodules: {linear_qkv: linear, core_attention: sdpa, linear_proj: linear}},"
                    " mlp: {module: mlp, submodules: {linear_fc1: linear, linear_fc2: linear}}}}\n"
                    "  output_layer: lm_head\n")
    model = build_model(spec)
    logits = model(torch.randint(0, 50, (2, 5))).logits
    assert logits.shape == (2, 5, 50)


def test_public_api_names():
    for name in ("compose", "build_model", "load_spec", "build_module", "register", "SpecError"):
        assert hasattr(megaspec, name)


def test_slot_defaults_complete_a_bare_node():
    cfg = compose([*TINY, f"{LAYER}.submodules.self_attention=self_attention", f"{LAYER}.submodules.mlp=mlp"])
    names = megaspec.build_record(build_model(cfg, device="meta")).modules
    layer = "decoder.layers.0"
    assert [names[f"{layer}.self_attention.linear_qkv"].name, names[f"{layer}.self_attention.core_attention"].name,
            names[f"{layer}.mlp.linear_fc2"].name] == ["linear", "sdpa", "linear"]


def test_structural_config_fields_are_decided_by_the_spec():
    """qk_layernorm names a structural choice: the spec's q/k_layernorm slots make it, so the flag is refused."""
    with pytest.raises(SpecError) as info:
        build_model(compose([*TINY, "model.config.qk_layernorm=true"]), device="meta")
    assert str(info.value) == (
        "command line: config.qk_layernorm: set, but no module of this model reads it: the spec decides it "
        "(decoder.layers[*].self_attention.k_layernorm: empty; decoder.layers[*].self_attention.q_layernorm: empty); "
        "change the spec or remove the field")
    attn = f"{LAYER}.submodules.self_attention.submodules"
    model = build_model(compose([*TINY, f"+{attn}.q_layernorm=layer_norm", f"+{attn}.k_layernorm=layer_norm"]),
                        device="meta")
    assert model.decoder.layers[0].self_attention.q_layernorm.weight.shape == (16,)
