"""Built models are ordinary modules: they copy, pickle and save like any nn.Module, and keep their record."""

from __future__ import annotations

import copy
import io
import pickle
from typing import ClassVar

import pytest
import torch
from tiny import TINY
from torch import nn

import megaspec
from megaspec import SpecError, build_model, build_record, compose
from megaspec.registry import unregister


def main_output(model: nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if out.logits is not None else out.last_hidden_state


@pytest.mark.parametrize("family", sorted(TINY))
def test_deepcopy_pickle_and_torch_save_give_identical_models(family: str) -> None:
    torch.manual_seed(0)
    model = build_model(compose(TINY[family])).eval()
    inputs = model.example_inputs(batch=2, seq=8)
    if "input_ids" in inputs:  # a vision transformer takes (blank) images alone
        ids = inputs["input_ids"]
        # Random text (ids below LLaVA's image token 63), with the image tokens left where they are.
        inputs["input_ids"] = torch.where(ids == 63, ids, torch.randint(0, 60, ids.shape))
    want = main_output(model, inputs)

    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    copies = {
        "deepcopy": copy.deepcopy(model),
        "pickle": pickle.loads(pickle.dumps(model)),
        "torch.save": torch.load(buffer, weights_only=False),
    }
    for how, twin in copies.items():
        assert twin is not model
        assert torch.equal(main_output(twin, inputs), want), how
        assert build_record(twin) == build_record(model), how
        # A copy owns its weights: training it leaves the original alone.
        assert all(a.data_ptr() != b.data_ptr() for a, b in zip(twin.parameters(), model.parameters())), how


def test_the_record_says_what_built_the_model() -> None:
    cfg = compose([*TINY["llama"], "model.spec.submodules.decoder.submodules.layers.submodules.self_attention"
                   ".submodules.core_attention=eager"])
    model = build_model(cfg, device="meta")
    record = build_record(model)
    assert record.config.num_query_groups == 2 and record.allow_imports == ()
    assert record.spec.submodules["decoder"].module == "transformer_block"
    assert record.modules[""] == ("gpt_model", "model")
    assert record.modules["decoder.layers.1.self_attention.core_attention"] == ("eager", "core_attention")
    assert record.modules["decoder.layers.0.mlp.linear_fc1"] == ("linear", "linear")
    assert record.parallel is None
    with pytest.raises(SpecError, match=r"^Linear was not built by megaspec, so it records no spec and config"):
        build_record(nn.Linear(2, 2))


class _Alibi(nn.Module):
    """A plug-in attention bias with ALiBi-like slopes computed in __init__ (and, optionally, in init_weights)."""

    def __init__(self, config: megaspec.TransformerConfig) -> None:
        super().__init__()
        self.register_buffer("slopes", self._slopes(config.num_attention_heads), persistent=False)

    @staticmethod
    def _slopes(heads: int, device: torch.device | None = None) -> torch.Tensor:
        return 2.0 ** (-8.0 * torch.arange(1, heads + 1, device=device) / heads)  # [nh]

    def forward(self, query_length: int, key_length: int) -> torch.Tensor:
        # [1, nh, sq, sk]: a distance penalty with no causal mask of its own.
        distance = (torch.arange(key_length)[None, :] - torch.arange(query_length)[:, None]).abs()
        return -(self.slopes[:, None, None] * distance).unsqueeze(0)


class _AlibiWithInit(_Alibi):
    def init_weights(self) -> None:
        self.slopes.copy_(self._slopes(self.slopes.numel(), self.slopes.device))


@pytest.fixture
def alibi_plugins():
    megaspec.register("attention_bias", "test_alibi")(_Alibi)
    megaspec.register("attention_bias", "test_alibi_init")(_AlibiWithInit)
    yield
    unregister("test_alibi")
    unregister("test_alibi_init")


BIAS = "model.spec.submodules.decoder.submodules.attention_bias"


def test_buffer_computed_only_in_init_is_an_error_naming_it(alibi_plugins) -> None:
    with pytest.raises(SpecError) as exc:
        build_model(compose([*TINY["llama"], f"+{BIAS}=test_alibi"]))
    assert str(exc.value) == (
        "decoder.attention_bias.slopes: buffer 'slopes' of _Alibi has no value after the meta-device build: it was "
        "computed in __init__, which runs on the meta device. Implement init_weights() (or reset_parameters()) to "
        "compute it again; the builder calls it after allocating the module")


def test_buffer_recomputed_by_init_weights_has_its_values(alibi_plugins) -> None:
    model = build_model(compose([*TINY["llama"], f"+{BIAS}=test_alibi_init"]))
    torch.testing.assert_close(model.decoder.attention_bias.slopes, _Alibi._slopes(4), rtol=0, atol=0)


def test_a_bias_never_makes_causal_attention_see_the_future(alibi_plugins) -> None:
    """The block turns 'no mask' into a bias tensor; the causal self-attention must still be causal."""
    for core in ("sdpa", "eager"):
        torch.manual_seed(0)
        model = build_model(compose([*TINY["llama"], f"+{BIAS}=test_alibi_init",
                                     "model.spec.submodules.decoder.submodules.layers.submodules.self_attention"
                                     f".submodules.core_attention={core}"])).eval()
        ids = torch.randint(0, 64, (1, 8))
        changed = ids.clone()
        changed[0, -1] = (ids[0, -1] + 1) % 64
        with torch.no_grad():
            a, b = model(ids).logits, model(changed).logits
        torch.testing.assert_close(a[:, :-1], b[:, :-1], rtol=0, atol=0)  # every earlier position: unchanged
        assert not torch.equal(a[:, -1], b[:, -1])  # the changed position itself does change


class _NoContract(nn.Module):
    slots: ClassVar[dict] = {}

    def __init__(self, config: megaspec.TransformerConfig) -> None:
        super().__init__()

    def forward(self, hidden_states: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        return hidden_states


def test_a_plugin_that_breaks_its_kind_contract_is_refused_at_registration() -> None:
    with pytest.raises(SpecError) as exc:
        megaspec.register("self_attention", "test_bad_attention")(_NoContract)
    assert str(exc.value) == (
        "cannot register 'test_bad_attention' as self_attention: _NoContract does not fit the self_attention "
        "contract forward(hidden_states, /, attention_mask=None, rotary=None, cache=None): forward has no parameter "
        "'attention_mask', which parents pass by keyword; forward has no parameter 'rotary', which parents pass "
        "by keyword; forward requires 'memory', which parents never pass")
    with pytest.raises(SpecError, match=r"the mlp contract forward\(hidden_states, /\): forward requires 'memory', "
                                        r"which parents never pass$"):
        megaspec.register("mlp", "test_contract_mlp")(_NoContract)


def test_self_and_cross_attention_are_different_kinds() -> None:
    cfg = compose([*TINY["t5"], "model.spec.submodules.decoder.submodules.layers.submodules.cross_attention"
                   "=self_attention"])
    with pytest.raises(SpecError, match="'self_attention' is of kind self_attention, but slot 'cross_attention' of "
                                        "transformer_layer takes cross_attention"):
        build_model(cfg, device="meta")
