"""Tiny sizes for every shipped model, as Hydra overrides: the suite's one table of them."""

from __future__ import annotations

_SIZES = ["num_layers=2", "hidden_size=32", "num_attention_heads=4", "ffn_hidden_size=64", "vocab_size=64",
          "hidden_dropout=0.0", "attention_dropout=0.0"]
_TEXT = [*_SIZES, "max_position_embeddings=32"]  # a position table: learned, or RoPE's precomputed angles


def _fields(prefix: str, fields: list[str]) -> list[str]:
    return [f"{prefix}.{field}" for field in fields]


TINY: dict[str, list[str]] = {
    "gpt2": ["model=gpt2", *_fields("model.config", _TEXT)],
    "llama": ["model=llama", *_fields("model.config", [*_TEXT, "num_query_groups=2"])],
    "mixtral": ["model=mixtral", *_fields("model.config", [*_TEXT, "num_query_groups=2", "num_moe_experts=4"])],
    "bert": ["model=bert", *_fields("model.config", _TEXT)],
    "t5": ["model=t5", *_fields("model.config", [*_SIZES, "relative_attention_num_buckets=8",
                                                 "relative_attention_max_distance=16"])],
    "t5_v1_1": ["model=t5_v1_1", *_fields("model.config", [*_SIZES, "relative_attention_num_buckets=8",
                                                           "relative_attention_max_distance=16"])],
    "llava": ["model=llava", *_fields("model.config.language", [*_TEXT, "num_query_groups=2"]),
              *_fields("model.config.vision", ["num_layers=2", "hidden_size=32", "num_attention_heads=4",
                                               "ffn_hidden_size=64", "image_size=28", "patch_size=7"]),
              "model.spec.params.image_token_index=63"],
}
