"""Every config field that is set takes effect or is refused: walked over every field of every shipped model."""

from __future__ import annotations

import copy
import types
import typing
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf
from pydantic import BaseModel, ValidationError
from tiny import TINY

import megaspec
from megaspec import SpecError, build_model, compose
from megaspec.config import TransformerConfig, field_annotation, field_names
from megaspec.train.balance import ExpertBiasUpdater

REFUSED = "set, but no module of this model reads it"
# Fields whose None means "derived": a value equal to the derived one is the same model, so it is not tried.
DERIVED = {"num_query_groups": "query_groups", "kv_channels": "head_dim", "ffn_hidden_size": "ffn_size",
           "moe_ffn_hidden_size": "moe_ffn_size"}


def hydra_value(value: Any) -> str:
    """A value as Hydra's override grammar writes it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {hydra_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def candidates(annotation: Any, current: Any) -> list[Any]:
    """Values other than `current` that a field of this type could take, most likely valid first."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return [v for arm in args if arm is not type(None) for v in candidates(arm, current)]
    if origin is typing.Literal:
        return [v for v in args if v != current]
    if origin is typing.Annotated:
        return candidates(args[0], current)
    if annotation is bool:
        return [not current]
    if annotation is int or (isinstance(current, int) and not isinstance(current, bool) and annotation is not float):
        base = current if isinstance(current, int) and not isinstance(current, bool) else 2
        return [v for v in (base * 2, base + 1, max(base // 2, 1), 1, 16) if v != current]
    if annotation is float:
        base = current if isinstance(current, float) else 0.0
        return [v for v in (0.5, base * 0.5 + 0.125, 0.25, 2.0) if v != current]
    if origin is tuple:
        return [(1, 0), (2, 2)]
    if origin is list:
        return []
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        try:
            return [annotation().model_dump(mode="json")]
        except ValidationError:  # a model with required fields (a RoPE scaling type): a small valid one
            required = {"rope_type": "linear", "factor": 2.0}
            return [required] if set(annotation.model_fields) >= set(required) else []
    if annotation is str:
        return [f"{current}_other"]
    return []


def fingerprint(model: torch.nn.Module) -> tuple:
    """What a model is and computes: module tree, tensor shapes and dtypes, train-mode outputs on fixed inputs, and
    the tensors' values after the trainer's balancing step.

    Values count too: a field may change how a weight is stored rather than what the first forward computes
    (layernorm_zero_centered_gamma keeps gamma - 1, as HF's Gemma checkpoints do, and weight decay pulls it
    to 0), or a buffer the trainer updates (moe_router_bias_update_rate).
    """
    record = megaspec.build_record(model)
    # Each module's settings as its repr shows them (a model's context length, a norm's epsilon).
    tree = tuple(sorted((path, entry.name, module.extra_repr()) for path, module in model.named_modules()
                        if (entry := record.modules.get(path)) is not None))
    named = [*model.named_parameters(), *model.named_buffers()]
    tensors = tuple((name, tuple(t.shape), t.dtype) for name, t in named)
    model.train()  # dropout is part of what the config decides
    inputs = model.example_inputs(batch=2, seq=8, device="cpu")
    ids = inputs.get("decoder_input_ids", inputs.get("input_ids"))
    torch.manual_seed(1)
    vocab = record.config.vocab_size
    inputs = {k: (v.random_(0, min(vocab, 60)) if k.endswith("input_ids") else v) for k, v in inputs.items()}
    if "input_ids" in inputs and hasattr(model, "image_token_index"):  # keep LLaVA's image tokens in place
        inputs["input_ids"] = model.example_inputs(batch=2, seq=8, device="cpu")["input_ids"]
    if "pixel_values" in inputs:
        inputs["pixel_values"] = torch.randn(inputs["pixel_values"].shape)
    labeled = getattr(model, "lm_head", True) is not None and ids is not None
    balance = ExpertBiasUpdater(model)  # what the trainer does after a step: routers' expert biases move
    torch.manual_seed(2)
    out = model(**inputs, **({"labels": inputs.get("decoder_input_ids", inputs.get("input_ids"))} if labeled else {}))
    outputs = tuple((k, v.detach().clone()) for k, v in vars(out).items() if isinstance(v, torch.Tensor))
    balance.step()
    values = tuple(t.detach().clone() for _, t in named)
    return tree, tensors, outputs, values


def same(a: tuple, b: tuple) -> bool:
    if a[:2] != b[:2] or [k for k, _ in a[2]] != [k for k, _ in b[2]]:
        return False
    if not all(torch.equal(x, y) for x, y in zip(a[3], b[3], strict=True)):
        return False
    return all(x.shape == y.shape and torch.equal(x, y) for (_, x), (_, y) in zip(a[2], b[2], strict=True))


def built(cfg: Any) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(cfg)


def override(base: Any, key: str, value: Any) -> Any:
    """`base` with one override applied, recorded as compose records it (so the builder sees it as given)."""
    cfg = copy.deepcopy(base)
    OmegaConf.update(cfg, key, value, merge=False)
    cfg.sources.overrides = [*cfg.sources.overrides, f"{key}={hydra_value(value)}"]
    return cfg


def walk(model: str) -> dict[str, tuple[str, Any, str]]:
    """field (scoped for named configs) -> ('changed' | 'refused', value tried, refusal message)."""
    base = compose(TINY[model])
    base_model = built(base)
    reference = fingerprint(base_model)
    assert same(reference, fingerprint(built(base))), "the same config must build the same model"
    scopes = list(base.model.config) if "language" in base.model.config else [None]
    results = {}
    for scope in scopes:
        fields = base.model.config[scope] if scope else base.model.config
        for name in field_names():
            key = f"model.config.{scope}.{name}" if scope else f"model.config.{name}"
            current = OmegaConf.to_container(fields)[name] if name in fields else None
            config = megaspec.build_record(base_model).configs[scope or ""]
            derived = getattr(config, DERIVED[name]) if name in DERIVED else None
            outcome = None
            for value in [v for v in candidates(field_annotation(name), current) if v != derived]:
                try:
                    fp = fingerprint(built(override(base, key, value)))
                except SpecError as exc:
                    outcome = outcome or ("refused", value, str(exc))
                    continue
                except IndexError:  # e.g. more image tokens than positions: these inputs do not fit; try another
                    continue
                assert not same(fp, reference), f"{model}: {key}={value!r} was accepted and changed nothing"
                outcome = ("changed", value, "")
                break
            assert outcome is not None, f"{model}: no value to try for {key} ({field_annotation(name)})"
            results[f"{scope}.{name}" if scope else name] = outcome
    return results


@pytest.fixture(scope="module")
def walked() -> dict[str, dict[str, tuple[str, Any, str]]]:
    return {model: walk(model) for model in TINY}


def test_every_field_of_every_shipped_model_takes_effect_or_is_refused(walked) -> None:
    """Each override of each field (core and module-declared) changes the built model, or the build refuses it."""
    for model, results in walked.items():
        assert {n.split(".")[-1] for n in results} == set(field_names()), model
        changed = [n for n, (what, _, _) in results.items() if what == "changed"]
        assert len(changed) >= 15, (model, changed)  # the walk really builds and compares
        for name, (what, value, message) in results.items():
            # Refused as a field no module reads (this one, or one it replaces), or by the config's own rules
            # naming it: never by a failure somewhere else.
            field = name.split(".")[-1]
            assert what == "changed" or REFUSED in message or f"config.{name}" in message or f" {field} " in message \
                or f"{field} (" in message, (model, name, value, message)


def test_fields_for_parts_a_model_lacks_are_refused_saying_so(walked) -> None:
    gpt2, llama, mixtral, t5, llava = (walked[m] for m in ("gpt2", "llama", "mixtral", "t5", "llava"))
    assert gpt2["image_size"][2] == (f"command line: config.image_size: {REFUSED}: this model has no patch "
                                     "embedding (patch_embedding); remove it")
    assert llama["moe_router_topk"][2] == (f"command line: config.moe_router_topk: {REFUSED}: this model has no "
                                           "mixture-of-experts layer (moe); remove it")
    assert gpt2["rotary_base"][0] == "refused" and "has no rotary position embedding" in gpt2["rotary_base"][2]
    assert t5["max_position_embeddings"][0] == "refused" and "has no position table" in t5["max_position_embeddings"][2]
    assert "the part built with config 'vision' has no position table" in llava["vision.max_position_embeddings"][2]
    assert mixtral["moe_token_drop_policy"][2].endswith("it takes effect only with moe_expert_capacity_factor; "
                                                        "remove it")


def test_structural_fields_are_decided_by_the_spec_and_say_where(walked) -> None:
    llama, gpt2 = walked["llama"], walked["gpt2"]
    assert llama["activation"][2] == (
        f"command line: config.activation: {REFUSED}: the spec decides it (decoder.layers[*].mlp.activation: silu "
        "at specs/llama.yaml:34); change the spec or remove the field")
    assert llama["position_embedding_type"][2].endswith(
        "the spec decides it (position_embedding: rotary_embedding at specs/llama.yaml:12); change the spec or "
        "remove the field")
    assert "decoder.layers[*].input_layernorm: rms_norm at specs/llama.yaml:20" in llama["normalization"][2]
    assert "self_attention.q_layernorm: empty" in gpt2["qk_layernorm"][2]
    # Structural fields a module obeys change the model.
    assert llama["gated_linear_unit"][0] == gpt2["add_bias_linear"][0] == "changed"
    assert gpt2["share_embeddings_and_output_weights"][0] == "changed"
    assert walked["bert"]["share_embeddings_and_output_weights"][0] == "refused"  # no masked-LM head to tie
    assert walked["mixtral"]["activation"][0] == "changed"  # the experts read it (their slot is empty)


def test_shipped_model_files_set_only_what_their_models_read() -> None:
    """No descriptive-only field is left in conf/model: every shipped model builds at full size, on meta."""
    for name in TINY:
        build_model(name, device="meta")


def test_a_set_field_is_located_in_its_model_file() -> None:
    """A field the model file sets and the new layout no longer reads is refused at its line in that file."""
    cfg = compose([*TINY["llava"], "+specs@model.spec.submodules.language_model=gpt2",
                   "model.config.language.gated_linear_unit=false"])
    with pytest.raises(SpecError) as info:
        build_model(cfg, device="meta")
    assert str(info.value) == (f"conf/model/llava.yaml:25: config.language.rotary_base: {REFUSED}: the part built "
                               "with config 'language' has no rotary position embedding (rotary_embedding); remove it")


def test_spec_node_config_settings_are_checked_too(toys) -> None:
    spec = megaspec.spec.parse_spec({
        "module": "toy_stack", "submodules": {"layers": {
            "module": "toy_layer", "config": {"window_size": [1, 0]},
            "submodules": {"attn": "toy_attn", "mlp": "toy_mlp"}}}})
    with pytest.raises(SpecError) as info:
        megaspec.build_module(spec, toys, device="meta")
    assert str(info.value) == (f"layers[*].config.window_size: {REFUSED}: it would have no effect on the subtree "
                               "at layers[*]; remove it")


def test_module_declared_fields_follow_the_same_rule() -> None:
    class Capped(torch.nn.Module):
        config_fields: typing.ClassVar[dict] = {"test_cap_value": (float, 30.0)}

        def __init__(self, config: TransformerConfig) -> None:
            super().__init__()
            self.cap = config.test_cap_value
            self.proj = torch.nn.Linear(config.hidden_size, config.hidden_size)

        def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
            return self.cap * torch.tanh(self.proj(hidden_states) / self.cap)

    megaspec.register("mlp", "test_capped")(Capped)
    try:
        with pytest.raises(SpecError) as info:
            build_model(compose([*TINY["gpt2"], "model.config.test_cap_value=5"]), device="meta")
        assert str(info.value) == (f"command line: config.test_cap_value: {REFUSED}: it belongs to test_capped "
                                   "(mlp), which this model does not contain; remove it or put that module in the spec")
        mlp = "model.spec.submodules.decoder.submodules.layers.submodules.mlp"
        model = build_model(compose([*TINY["gpt2"], f"{mlp}=test_capped", "~model.config.ffn_hidden_size",
                                     "model.config.test_cap_value=5"]), device="meta")
        assert model.decoder.layers[0].mlp.cap == 5.0
    finally:
        megaspec.registry.unregister("test_capped")


def test_a_module_that_keeps_its_config_is_refused() -> None:
    class Keeper(torch.nn.Module):
        def __init__(self, config: TransformerConfig) -> None:
            super().__init__()
            self.config = config

        def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
            return hidden_states

    megaspec.register("mlp", "test_keeper")(Keeper)
    try:
        mlp = "model.spec.submodules.decoder.submodules.layers.submodules.mlp"
        with pytest.raises(SpecError, match=r"decoder.layers.0.mlp: test_keeper keeps its TransformerConfig as "
                                            r"self.config; copy the values it needs in __init__"):
            build_model(compose([*TINY["gpt2"], f"{mlp}=test_keeper", "~model.config.ffn_hidden_size"]),
                        device="meta")
    finally:
        megaspec.registry.unregister("test_keeper")


def test_every_field_is_in_the_composed_config_and_takes_a_plain_override() -> None:
    """No `+` needed: every field, also of named configs and those modules declare, is there with its default."""
    values = {name: candidates(field_annotation(name), None)[:1] for name in field_names()}
    plain = [f"model.config.{n}={hydra_value(v[0])}" for n, v in values.items() if v and n != "num_layers"]
    cfg = compose(plain)  # Hydra would refuse any of these without `+` if the field were missing
    assert set(field_names()) <= set(cfg.model.config)
    assert {n: cfg.model.config[n] for n in ("qk_layernorm", "window_size")} == {"qk_layernorm": True,
                                                                                 "window_size": [1, 0]}
    named = compose(["model=llava", "model.config.vision.qk_layernorm=true", "model.config.language.rope_scaling="
                     "{rope_type: llama3, factor: 2.0}"])
    assert named.model.config.vision.qk_layernorm is True
    assert named.model.config.language.rope_scaling.factor == 2.0
    assert named.model.config.language.moe_router_topk == 2  # a default, present in each named config
