"""Modules may declare config fields of their own: set, validated and overridden like the core ones."""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch
from tiny import TINY
from torch import nn

import megaspec
from megaspec import SpecError, TransformerConfig, build_model, compose
from megaspec.config import module_fields
from megaspec.configs import make_config
from megaspec.registry import unregister

MLP = "model.spec.submodules.decoder.submodules.layers.submodules.mlp"


class CappedMlp(nn.Module):
    """An MLP whose output is soft-capped at a size that lives in the config."""

    config_fields: ClassVar[dict] = {"mlp_output_cap": (float, 30.0)}

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.cap = config.mlp_output_cap
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.cap * torch.tanh(self.proj(hidden_states) / self.cap)


@pytest.fixture
def capped():
    megaspec.register("mlp", "test_capped_mlp")(CappedMlp)
    yield
    unregister("test_capped_mlp")


def test_declared_field_has_its_default_and_takes_overrides(capped) -> None:
    assert module_fields()["mlp_output_cap"].owner == "test_capped_mlp"
    model = build_model(compose([*TINY["llama"], f"{MLP}=test_capped_mlp"]), device="meta")
    assert model.decoder.layers[0].mlp.cap == 30.0
    model = build_model(compose([*TINY["llama"], f"{MLP}=test_capped_mlp", "+model.config.mlp_output_cap=5"]),
                        device="meta")
    assert model.decoder.layers[0].mlp.cap == 5.0 and megaspec.build_record(model).config.mlp_output_cap == 5.0


def test_unregistering_removes_the_fields() -> None:
    """A field outlives no module: configs made after unregistering do not carry it (or differ from saved ones)."""
    megaspec.register("mlp", "test_capped_mlp")(CappedMlp)
    unregister("test_capped_mlp")
    assert "mlp_output_cap" not in module_fields()
    assert "mlp_output_cap" not in TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2).model_dump()


def test_declared_field_is_type_checked_with_its_location(capped) -> None:
    with pytest.raises(SpecError) as exc:
        build_model(compose([*TINY["llama"], f"{MLP}=test_capped_mlp", "+model.config.mlp_output_cap=big"]))
    assert str(exc.value) == "command line: config.mlp_output_cap: expected float, got 'big'"


def test_unknown_field_is_refused_with_a_suggestion(capped) -> None:
    with pytest.raises(SpecError, match=r"unknown config field 'mlp_output_capp' \(did you mean 'mlp_output_cap'\?\)"):
        make_config({"num_layers": 1, "hidden_size": 8, "num_attention_heads": 2, "mlp_output_capp": 1.0})


def test_two_modules_cannot_mean_different_things_by_one_field(capped) -> None:
    class Other(CappedMlp):
        config_fields: ClassVar[dict] = {"mlp_output_cap": (int, 3)}

    with pytest.raises(SpecError, match=r"cannot register 'test_other_mlp': test_other_mlp declares config field "
                                        r"'mlp_output_cap' as <class 'int'> = 3, but test_capped_mlp declares it as "
                                        r"<class 'float'> = 30.0"):
        megaspec.register("mlp", "test_other_mlp")(Other)
    with pytest.raises(SpecError, match="declares config field 'hidden_size', which TransformerConfig already has"):
        class Clash(CappedMlp):
            config_fields: ClassVar[dict] = {"hidden_size": (int, 3)}

        megaspec.register("mlp", "test_clash_mlp")(Clash)
