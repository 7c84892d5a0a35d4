"""Tiny sizes for every shipped model, as Hydra overrides: the suite's one table of them."""

from __future__ import annotations

_TEXT = ["num_layers=2", "hidden_size=32", "num_attention_heads=4", "ffn_hidden_size=64", "vocab_size=64",
         "max_position_embeddings=32", "hidden_dropout=0.0", "attention_dropout=0.0"]

_SPARSE = [f for f in _TEXT if not f.startswith("ffn_hidden_size")]  # every layer MoE: no dense MLP to size
# DeepSeek: small latent ranks and head parts, 8 experts, the first layer dense.
_MLA = ["q_lora_rank=16", "kv_lora_rank=16", "qk_head_dim=8", "kv_channels=8", "v_head_dim=8", "num_moe_experts=8",
        "moe_router_topk=2", "moe_ffn_hidden_size=16", "moe_shared_expert_intermediate_size=16",
        "moe_first_k_dense=1", "rope_scaling.original_max_position_embeddings=8"]


def _fields(prefix: str, fields: list[str]) -> list[str]:
    return [f"{prefix}.{field}" for field in fields]


TINY: dict[str, list[str]] = {
    "gpt2": ["model=gpt2", *_fields("model.config", _TEXT)],
    "llama": ["model=llama", *_fields("model.config", [*_TEXT, "num_query_groups=2"])],
    "mixtral": ["model=mixtral", *_fields("model.config", [*_TEXT, "num_query_groups=2", "num_moe_experts=4"])],
    "qwen2_moe": ["model=qwen2_moe", *_fields("model.config", [*_SPARSE, "num_query_groups=2", "num_moe_experts=4",
                                                               "moe_ffn_hidden_size=16",
                                                               "moe_shared_expert_intermediate_size=32"])],
    "deepseek_v3": ["model=deepseek_v3", *_fields("model.config", [*_TEXT, *_MLA, "moe_router_num_groups=4",
                                                                   "moe_router_group_topk=2"])],
    "deepseek_v2_lite": ["model=deepseek_v2_lite", *_fields("model.config", _TEXT + _MLA)],
    "bert": ["model=bert", *_fields("model.config", _TEXT)],
    "t5": ["model=t5", *_fields("model.config", [*_TEXT, "relative_attention_num_buckets=8",
                                                 "relative_attention_max_distance=16"])],
    "t5_v1_1": ["model=t5_v1_1", *_fields("model.config", [*_TEXT, "relative_attention_num_buckets=8",
                                                           "relative_attention_max_distance=16"])],
    "qwen2": ["model=qwen2", *_fields("model.config", [*_TEXT, "num_query_groups=2"])],
    "qwen3": ["model=qwen3", *_fields("model.config", [*_TEXT, "num_query_groups=2", "kv_channels=16"])],
    "phi3": ["model=phi3", *_fields("model.config", [*_TEXT, "num_query_groups=4", "window_size=[3,0]"])],
    "olmo2": ["model=olmo2", *_fields("model.config", [*_TEXT, "num_query_groups=2"])],
    "gpt_neox": ["model=gpt_neox", *_fields("model.config", _TEXT)],
    "falcon": ["model=falcon", *_fields("model.config", [*_TEXT, "num_query_groups=1"])],
    "falcon_40b": ["model=falcon_40b", *_fields("model.config", [*_TEXT, "num_query_groups=2"])],
    "bloom": ["model=bloom", *_fields("model.config", _TEXT)],
    "vit": ["model=vit", *_fields("model.config", ["num_layers=2", "hidden_size=32", "num_attention_heads=4",
                                                   "ffn_hidden_size=64", "image_size=28", "patch_size=7",
                                                   "max_position_embeddings=17"])],
    "gemma": ["model=gemma", *_fields("model.config", [*_TEXT, "num_query_groups=2", "kv_channels=16"])],
    "gemma2": ["model=gemma2", *_fields("model.config", [*_TEXT, "num_query_groups=2", "kv_channels=16",
                                                         "window_size=[3,0]"])],
    "gemma3": ["model=gemma3", *_fields("model.config", [*_TEXT, "num_query_groups=2", "kv_channels=16",
                                                         "window_size=[3,0]"])],
    "llava": ["model=llava", *_fields("model.config.language", [*_TEXT, "num_query_groups=2"]),
              *_fields("model.config.vision", ["num_layers=2", "hidden_size=32", "num_attention_heads=4",
                                               "ffn_hidden_size=64", "image_size=28", "patch_size=7",
                                               "max_position_embeddings=17"]),
              "model.spec.params.image_token_index=63"],
}
