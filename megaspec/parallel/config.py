"""ParallelConfig (Megatron's names) and the checks that a model can be split that way."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, NonNegativeInt, PositiveInt, ValidationError

from megaspec.config import TransformerConfig
from megaspec.errors import Problem, SpecError


class ParallelConfig(BaseModel):
    """How one training job is split across processes (Megatron-Core field names)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # None: whatever the other sizes leave of the world size.
    data_parallel_size: PositiveInt | None = None
    tensor_model_parallel_size: PositiveInt = 1
    # Experts are split over ranks of the data-parallel group (as Megatron does), so
    # this must divide data_parallel_size.
    expert_model_parallel_size: PositiveInt = 1
    pipeline_model_parallel_size: PositiveInt = 1
    # Under tensor parallelism, split norms and the residual stream over the sequence too.
    sequence_parallel: bool = False
    # Data parallelism shards parameters, gradients and optimizer state (FSDP2, ZeRO-3);
    # false keeps full parameters after forward (ZeRO-2: less communication, more memory).
    reshard_after_forward: bool = True
    # Activation checkpointing: "full" recomputes whole layers, "selective" only core attention.
    recompute_granularity: Literal["full", "selective"] | None = None
    recompute_layers: list[NonNegativeInt] | None = None  # which layers; None: all of them
    pipeline_schedule: Literal["gpipe", "1f1b"] = "1f1b"
    num_microbatches: PositiveInt | None = None  # None: one per pipeline stage

    def sizes(self, world_size: int) -> dict[str, int]:
        """Mesh sizes {pp, dp, ep, tp} for a world size (dp derived when not given)."""
        tp, pp, ep = self.tensor_model_parallel_size, self.pipeline_model_parallel_size, self.expert_model_parallel_size
        dp = self.data_parallel_size or max(world_size // (tp * pp), 1)
        return {"pp": pp, "dp": dp, "ep": ep, "tp": tp}

    @property
    def microbatches(self) -> int:
        """Micro-batches per pipeline step."""
        return self.num_microbatches or self.pipeline_model_parallel_size


def parallel_config(cfg: Any) -> ParallelConfig:
    """A ParallelConfig from itself, a mapping, or a composed config holding `parallel`."""
    if isinstance(cfg, ParallelConfig):
        return cfg
    if cfg is None:
        return ParallelConfig()
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            cfg = OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf ships with hydra-core
        pass
    if not isinstance(cfg, Mapping):
        raise SpecError(f"expected a parallel config (mapping), got {type(cfg).__name__}")
    data = dict(cfg.get("parallel") or {}) if "model" in cfg or "parallel" in cfg else dict(cfg)
    data.pop("name", None)  # the group's own label (parallel=fsdp), not a setting
    try:
        return ParallelConfig.model_validate(data)
    except ValidationError as exc:
        raise SpecError([
            Problem(f"{e['msg']} (got {e.get('input')!r})", ".".join(["parallel", *map(str, e["loc"])]))
            for e in exc.errors()
        ]) from None


_as_parallel_config = parallel_config  # check_parallel's argument shadows the name


def _configs(model_config: Any) -> dict[str, TransformerConfig]:
    """One TransformerConfig, or several by name, as {label: config}."""
    if model_config is None:
        return {}
    if isinstance(model_config, TransformerConfig):
        return {"": model_config}
    if isinstance(model_config, Mapping):
        return {f"{k}.": v for k, v in model_config.items() if isinstance(v, TransformerConfig)}
    raise SpecError(f"expected a TransformerConfig (or named ones), got {type(model_config).__name__}")


def _divides(problems: list[Problem], size: int, name: str, value: int, field: str, why: str) -> None:
    if value % size:
        problems.append(Problem(f"{field} ({value}) is not divisible by {name} ({size}): {why}", f"parallel.{name}"))


def check_parallel(model_config: Any, parallel_config: Any, world_size: int) -> list[Problem]:
    """Every reason this model cannot be split this way over `world_size` processes (no processes needed)."""
    pc = _as_parallel_config(parallel_config)
    problems: list[Problem] = []
    s = pc.sizes(world_size)
    tp, pp, ep, dp = s["tp"], s["pp"], s["ep"], s["dp"]
    if world_size % (tp * pp):
        problems.append(Problem(
            f"the world size ({world_size}) is not divisible by tensor_model_parallel_size ({tp}) x "
            f"pipeline_model_parallel_size ({pp})", "parallel"))
    elif dp * tp * pp != world_size:
        problems.append(Problem(
            f"data_parallel_size ({dp}) x tensor_model_parallel_size ({tp}) x pipeline_model_parallel_size ({pp}) "
            f"= {dp * tp * pp}, but the world size is {world_size}", "parallel.data_parallel_size"))
    if dp % ep:
        problems.append(Problem(
            f"expert_model_parallel_size ({ep}) must divide data_parallel_size ({dp}): experts are split over "
            "data-parallel ranks", "parallel.expert_model_parallel_size"))
    if pc.sequence_parallel and tp == 1:
        problems.append(Problem("sequence_parallel needs tensor_model_parallel_size > 1", "parallel.sequence_parallel"))
    if ep > 1 and tp > 1:
        problems.append(Problem(
            "expert_model_parallel_size > 1 with tensor_model_parallel_size > 1 is not supported yet",
            "parallel.expert_model_parallel_size"))
    if pc.num_microbatches is not None and pc.num_microbatches < pp:
        problems.append(Problem(
            f"num_microbatches ({pc.num_microbatches}) must be at least pipeline_model_parallel_size ({pp})",
            "parallel.num_microbatches"))

    for label, c in _configs(model_config).items():
        where = f"model.config.{label}"
        if tp > 1:
            name = "tensor_model_parallel_size"
            _divides(problems, tp, name, c.num_attention_heads, f"{where}num_attention_heads",
                     "each rank holds whole heads")
            _divides(problems, tp, name, c.query_groups, f"{where}num_query_groups" if c.num_query_groups else
                     f"{where}num_attention_heads (query groups)", "each rank holds whole query groups")
            _divides(problems, tp, name, c.ffn_size, f"{where}ffn_hidden_size", "the MLP is split by column")
            _divides(problems, tp, name, c.vocab_size, f"{where}vocab_size",
                     "the embedding and output layer are split over the vocabulary")
            if c.num_moe_experts is not None:
                _divides(problems, tp, name, c.moe_ffn_size, f"{where}moe_ffn_hidden_size",
                         "experts are split by column")
        if ep > 1 and c.num_moe_experts is not None:
            _divides(problems, ep, "expert_model_parallel_size", c.num_moe_experts, f"{where}num_moe_experts",
                     f"each rank holds num_moe_experts / {ep} experts")
        if pp > 1 and c.num_layers < pp:
            problems.append(Problem(
                f"{where}num_layers ({c.num_layers}) is fewer than pipeline_model_parallel_size ({pp}): "
                "every stage needs at least one layer", "parallel.pipeline_model_parallel_size"))
        if pc.recompute_layers is not None:
            bad = [i for i in pc.recompute_layers if i >= c.num_layers]
            if bad:
                problems.append(Problem(f"recompute_layers {bad} are out of range: the model has "
                                        f"{c.num_layers} layers", "parallel.recompute_layers"))
    configs = _configs(model_config)
    if ep > 1 and configs and all(c.num_moe_experts is None for c in configs.values()):
        problems.append(Problem(
            f"expert_model_parallel_size ({ep}) needs a mixture-of-experts model (num_moe_experts is not set)",
            "parallel.expert_model_parallel_size"))
    return problems


def validate_parallel(model_config: Any, parallel_config: Any, world_size: int) -> None:
    """Raise SpecError listing every problem check_parallel finds."""
    problems = check_parallel(model_config, parallel_config, world_size)
    if problems:
        raise SpecError(problems)
