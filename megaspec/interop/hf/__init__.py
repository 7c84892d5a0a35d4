"""Weights between HF transformers and megaspec: `from_hf` and `to_hf`.

`from_hf` translates the HF config into a megaspec spec tree and TransformerConfig
(recorded in the model's BuildRecord by the builder, so `megaspec.save` writes
them out), builds the model with the ordinary builder and moves every
tensor through the family's rules. `to_hf` runs the same rules backwards.
transformers is imported only when these functions are called.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from megaspec.build import build_module
from megaspec.config import DTYPES
from megaspec.configs import Configs, make_configs
from megaspec.errors import Problem, SpecError
from megaspec.interop.hf.bert import Bert, BertForMaskedLM
from megaspec.interop.hf.bloom import Bloom
from megaspec.interop.hf.clip import CLIPVision
from megaspec.interop.hf.core import Family, canonical, raise_problems, translate, unaliased
from megaspec.interop.hf.deepseek import DeepseekV2, DeepseekV3
from megaspec.interop.hf.falcon import Falcon
from megaspec.interop.hf.gemma import Gemma, Gemma2, Gemma3
from megaspec.interop.hf.gpt2 import GPT2
from megaspec.interop.hf.gpt_neox import GPTNeoX
from megaspec.interop.hf.llama import Llama, Mistral, Mixtral
from megaspec.interop.hf.llava import Llava
from megaspec.interop.hf.olmo2 import Olmo2
from megaspec.interop.hf.phi3 import Phi3
from megaspec.interop.hf.qwen import Qwen2, Qwen3
from megaspec.interop.hf.qwen2_moe import Qwen2Moe
from megaspec.interop.hf.t5 import T5
from megaspec.interop.hf.vit import ViT
from megaspec.record import described
from megaspec.spec import ModuleSpec, parse_spec

# Tried in this order by to_hf: the first whose HF config reproduces the model's spec and config wins.
FAMILIES: list[Family] = [GPT2(), Llama(), Mistral(), Mixtral(), Bert(), BertForMaskedLM(), T5(), CLIPVision(),
                          Llava(), Qwen2(), Qwen3(), Gemma(), Gemma2(), Gemma3(),
                          Phi3(), Olmo2(), GPTNeoX(), Falcon(), Bloom(), ViT(), Qwen2Moe(), DeepseekV3(),
                          DeepseekV2()]

# Fields with no effect on what a model computes in eval mode: to_hf does not require HF to carry them.
TRAINING_ONLY = {"hidden_dropout", "attention_dropout", "init_method_std", "scaled_output_init", "params_dtype"}

__all__ = ["FAMILIES", "from_hf", "spec_from_hf", "to_hf"]


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise SpecError("converting to or from HF needs transformers: pip install 'megaspec[hf]'") from None
    return transformers


def family_for(hf_config: Any, hf_class: str | None = None) -> Family:
    """The family for an HF config, or an error naming the unsupported architecture.

    Where several families share a model_type (BertModel, BertForMaskedLM), the HF
    class (`hf_class`, else the config's `architectures`) picks; the first is the default.
    """
    model_type = getattr(hf_config, "model_type", "?")
    architecture = ", ".join(getattr(hf_config, "architectures", None) or []) or model_type
    candidates = [f for f in FAMILIES if model_type in f.model_types]
    if candidates:
        wanted = [hf_class] if hf_class else list(getattr(hf_config, "architectures", None) or [])
        family = next((f for f in candidates if f.hf_class in wanted), candidates[0])
        _check_requires(family, architecture)
        return family
    supported = ", ".join(dict.fromkeys(t for f in FAMILIES for t in f.model_types))
    raise SpecError(f"unsupported HF architecture '{architecture}' (model_type '{model_type}'); "
                    f"megaspec converts: {supported}")


def _check_requires(family: Family, architecture: str) -> None:
    from megaspec.registry import names

    missing = [n for n in family.requires if n not in names()]
    if missing:
        raise SpecError(f"unsupported HF architecture '{architecture}': megaspec has no module "
                        f"{', '.join(repr(m) for m in missing)} to build it with")


def spec_from_hf(hf_config: Any, dtype: torch.dtype = torch.float32,
                 hf_class: str | None = None) -> tuple[ModuleSpec, Configs]:
    """Translate an HF config into a megaspec spec tree and config(s); `spec.to_dict()` is its YAML.

    `hf_class` (e.g. "BertForMaskedLM") picks the layout where one config serves several HF classes.
    """
    family = family_for(hf_config, hf_class)
    spec_data, config_data = family.spec_and_config(hf_config)
    dtype_name = {v: k for k, v in DTYPES.items()}.get(dtype, "float32")
    configs = make_configs(config_data)
    configs = {name: cfg.updated(params_dtype=dtype_name) for name, cfg in configs.items()}
    return parse_spec(spec_data), configs


def _load_hf(model_or_path: Any) -> Any:
    """An HF model object, loading a save_pretrained directory with its family's class."""
    if not isinstance(model_or_path, (str, os.PathLike)):
        return model_or_path
    transformers = _transformers()
    path = Path(model_or_path)
    if not (path / "config.json").is_file():
        raise SpecError(f"'{path}' is not an HF model directory (no config.json)")
    hf_config = transformers.AutoConfig.from_pretrained(path)
    family = family_for(hf_config)
    return getattr(transformers, family.hf_class).from_pretrained(path, config=hf_config)


def _float_dtype(state: dict[str, torch.Tensor]) -> torch.dtype:
    return next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)


def from_hf(model_or_path: Any, *, device: str | torch.device = "cpu") -> nn.Module:
    """An HF model (object or save_pretrained directory) -> the megaspec model with the same weights."""
    hf = _load_hf(model_or_path)
    if not hasattr(hf, "config") or not hasattr(hf, "state_dict"):
        raise SpecError(f"expected an HF transformers model or a directory, got {type(hf).__name__}")
    family = family_for(hf.config, type(hf).__name__)
    hf_state, _ = unaliased(family.hf_state(hf))  # tied weights (lm_head = wte) once
    spec, configs = spec_from_hf(hf.config, _float_dtype(hf_state), type(hf).__name__)
    model = build_module(spec, configs, device="meta")
    expected = dict(model.state_dict())
    done = translate(hf_state, family.rules_from(spec.to_dict(), configs), True, expected, "HF", "megaspec")
    raise_problems(done.problems, f"HF {type(hf).__name__} -> megaspec")
    from megaspec.checkpoint import fill

    fill(model, done.tensors, device)
    return model.train(hf.training)


def _normalised(data: Any) -> Any:
    """Spec data with interchangeable kernels made equal (sdpa and eager compute the same thing)."""
    if isinstance(data, dict):
        return {k: ("sdpa" if k == "core_attention" and v == "eager" else _normalised(v)) for k, v in data.items()}
    if isinstance(data, list):
        return [_normalised(v) for v in data]
    return data


def _hf_config_errors() -> tuple[type[Exception], ...]:
    """What an HF config raises for values its model cannot take (transformers 5's strict configs)."""
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:
        return ()
    return (StrictDataclassError,)


def match_family(spec: ModuleSpec, configs: Configs, hf_class: str | None = None) -> tuple[Family, Any]:
    """The family whose HF config reproduces this spec and config exactly, and that HF config.

    Several HF classes may compute the same model (Phi-3 and Mistral): the first in
    FAMILIES wins, unless `hf_class` names the one wanted.
    """
    families = [f for f in FAMILIES if hf_class in (None, f.hf_class)]
    if not families:
        known = ", ".join(dict.fromkeys(f.hf_class for f in FAMILIES))
        raise SpecError(f"megaspec does not convert to HF class '{hf_class}'; it converts to: {known}")
    reasons = []
    for family in families:
        try:
            hf_config = family.hf_config_from(spec.to_dict(), configs)
            spec_data, config_data = family.spec_and_config(hf_config)
        except (SpecError, KeyError, TypeError, ValueError, *_hf_config_errors()) as exc:
            reasons.append(f"{family.name}: {exc}")
            continue
        if _normalised(parse_spec(spec_data).to_dict()) != _normalised(spec.to_dict()):
            reasons.append(f"{family.name}: the spec differs from the layout of HF {family.hf_class}")
            continue
        theirs = make_configs(config_data)
        if set(theirs) != set(configs):
            reasons.append(f"{family.name}: configs {sorted(theirs)} differ from {sorted(configs)}")
            continue
        diff = sorted({k for n in configs for k, v in canonical(configs[n]).items()
                       if k not in TRAINING_ONLY and k not in family.unread_fields.get(n, ())
                       and canonical(theirs[n]).get(k) != v})
        if diff:
            reasons.append(f"{family.name}: HF cannot express {', '.join(diff)}")
            continue
        return family, hf_config
    raise SpecError([Problem("no HF architecture reproduces this model exactly:"),
                     *(Problem(r) for r in reasons)])


def _new_hf(cls: Any, hf_config: Any, dtype: torch.dtype) -> Any:
    """An HF model of `cls`, skipping its random init (every tensor is overwritten next)."""
    from transformers.initialization import no_init_weights

    with no_init_weights():
        hf = cls(hf_config)
    hf.tie_weights()  # skipped along with the init
    return hf.to(dtype)


def to_hf(model: nn.Module, save_directory: str | os.PathLike[str] | None = None, *,
          spec: ModuleSpec | None = None, config: Any = None, hf_class: str | None = None) -> Any:
    """megaspec model -> the HF transformers model with the same weights (saved with save_pretrained on request).

    `hf_class` (e.g. "Phi3ForCausalLM") picks the HF class where several express the model.
    """
    transformers = _transformers()
    spec, configs, _ = described(model, spec, config)
    family, hf_config = match_family(spec, configs, hf_class)
    ours = {k: v for k, v in model.state_dict().items()}
    dtype = _float_dtype(ours)
    hf = _new_hf(getattr(transformers, family.hf_class), hf_config, dtype)
    family.adapt_hf(hf, configs)
    expected, aliases = unaliased(hf.state_dict())
    done = translate(ours, family.rules_from(spec.to_dict(), configs), False, expected, "megaspec", "HF")
    raise_problems(done.problems, f"megaspec -> HF {family.hf_class}")
    tensors = {**done.tensors, **{alias: done.tensors[name] for alias, name in aliases.items()}}
    with torch.no_grad():
        hf.load_state_dict(tensors, strict=True)
    hf.train(model.training)
    if save_directory is not None:
        hf.save_pretrained(save_directory)
    return hf
