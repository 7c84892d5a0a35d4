"""Multi-head Latent Attention as a module: its query paths, its checks, and the latent a cache would hold."""

import pytest
import torch
from tiny import TINY

from megaspec import SpecError, build_model, compose

ATTENTION = "model.spec.submodules.decoder.submodules.layers.nodes.{}.submodules.self_attention.submodules"


def test_the_config_picks_the_query_path() -> None:
    low = build_model(compose(TINY["deepseek_v3"]), device="meta").decoder.layers[0].self_attention
    full = build_model(compose([*TINY["deepseek_v3"], "model.config.q_lora_rank=null"]),
                       device="meta").decoder.layers[0].self_attention
    assert low.linear_q_proj is None and low.linear_q_up_proj.weight.shape == (4 * 16, 16)
    assert full.linear_q_down_proj is None and full.q_layernorm is None
    assert full.linear_q_proj.weight.shape == (4 * 16, 32)  # 4 heads x (8 without position + 8 rotary)


@pytest.mark.parametrize(("overrides", "message"), [
    ([f"~{ATTENTION.format('dense')}.linear_q_up_proj", f"~{ATTENTION.format('moe')}.linear_q_up_proj"],
     "config.q_lora_rank is 16 (a low-rank query), but the spec leaves linear_q_up_proj empty"),
    (["model.config.q_lora_rank=null", f"~{ATTENTION.format('dense')}.linear_q_proj",
      f"~{ATTENTION.format('moe')}.linear_q_proj"],
     "config.q_lora_rank is null (a full-rank query), but the spec leaves linear_q_proj empty"),
    (["+model.config.num_query_groups=2"],
     ("multi_latent_attention expands keys and values for every head: num_query_groups (2) must be unset or "
      "equal num_attention_heads (4)")),
])  # fmt: skip
def test_a_config_the_spec_cannot_serve_is_refused(overrides: list[str], message: str) -> None:
    with pytest.raises(SpecError) as info:
        build_model(compose([*TINY["deepseek_v3"], *overrides]), device="meta")
    assert message in str(info.value)


def test_the_latent_and_rotary_key_are_all_keys_and_values_need() -> None:
    """compress_kv's outputs ([b, s, kv_lora_rank], [b, s, 1, rot]) expand to the keys and values forward uses."""
    model = build_model(compose(TINY["deepseek_v3"])).eval()
    attention = model.decoder.layers[0].self_attention
    hidden = torch.randn(2, 6, 32)
    _, rotary = model.position_embedding(hidden, torch.arange(6).unsqueeze(0))
    latent, key_rope = attention.compress_kv(hidden, rotary)
    assert latent.shape == (2, 6, 16) and key_rope.shape == (2, 6, 1, 8)
    key, value = attention.expand_kv(latent, key_rope)
    assert key.shape == (2, 6, 4, 16) and value.shape == (2, 6, 4, 8)
    assert torch.equal(key[..., 8:], key_rope.expand(-1, -1, 4, -1))  # one rotary key, shared by every head
    # Causal: the first position's output does not depend on later tokens.
    with torch.no_grad():
        out = attention(hidden, rotary=rotary)
        changed = hidden.clone()
        changed[:, -1] += 1.0
        assert torch.equal(attention(changed, rotary=rotary)[:, 0], out[:, 0])
