"""megaspec.generate on spec-built models: the cache contract, its kinds of cache, sampling, stops and errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from generate_cases import LAYER, greedy_by_full_forwards, prompts, tiny
from torch import Tensor, nn

import megaspec
from megaspec import SpecError, build_model
from megaspec.cache import KVCache
from megaspec.generation import Generation, Sampler, generate, new_cache
from megaspec.registry import unregister


@pytest.mark.parametrize("name", ["gpt2", "llama", "mixtral"])
def test_greedy_equals_full_forwards(name: str) -> None:
    model = tiny(name)
    ids, mask = prompts()
    out = generate(model, ids, attention_mask=mask, max_new_tokens=12)
    assert out.shape == (3, 7 + 12) and torch.equal(out[:, :7], ids)
    assert torch.equal(out, greedy_by_full_forwards(model, ids, mask, 12))


def grown(model: nn.Module, ids: Tensor, mask: Tensor, new: int) -> list[Tensor]:
    """Greedy logits per step from a growing cache (max_length None), driven by hand."""
    cache = new_cache(model, None)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    cache.step(ids.size(1))
    with torch.no_grad():
        logits = model(ids, attention_mask=mask, position_ids=positions, cache=cache).logits[:, -1]
        steps = [logits]
        for _ in range(new - 1):
            token = logits.argmax(-1, keepdim=True)
            mask = F.pad(mask, (0, 1), value=1)
            positions = positions[:, -1:] + 1
            cache.step(1)
            logits = model(token, attention_mask=mask, position_ids=positions, cache=cache).logits[:, -1]
            steps.append(logits)
    return steps


@pytest.mark.parametrize("window", [None, 3], ids=["full", "window3"])
def test_growing_cache_equals_static_cache(window: int | None) -> None:
    extra = [] if window is None else [f"+model.config.window_size=[{window - 1},0]"]
    model = tiny("llama", *extra)
    ids, mask = prompts()
    static = [step.logits for step in Generation(model, ids, attention_mask=mask, max_new_tokens=8)]
    torch.testing.assert_close(torch.stack(grown(model, ids, mask, 8)), torch.stack(static), atol=1e-5, rtol=0)


def attention_caches(run: Generation) -> list[KVCache]:
    return [layer["self_attention"] for layer in run.cache.state.layers]


@pytest.mark.parametrize("groups", [2, 1], ids=["gqa", "mqa"])
def test_gqa_and_mqa_cache_only_their_key_value_groups(groups: int) -> None:
    model = tiny("llama", f"model.config.num_query_groups={groups}")  # 4 query heads
    ids, mask = prompts()
    run = Generation(model, ids, attention_mask=mask, max_new_tokens=5)
    out = torch.cat([run.prefix, torch.stack([s.tokens for s in run], dim=1)], dim=1)
    for cache in attention_caches(run):  # [b, groups, prompt + new, d]
        assert cache.key.shape == (3, groups, 7 + 5, 8) and cache.value.shape == (3, groups, 7 + 5, 8)
    assert torch.equal(out, greedy_by_full_forwards(model, ids, mask, 5))


def test_sliding_window_keeps_only_its_window() -> None:
    model = tiny("llama", "+model.config.window_size=[3,0]")  # sees 4 positions
    ids, mask = prompts()
    run = Generation(model, ids, attention_mask=mask, max_new_tokens=9)
    out = torch.cat([run.prefix, torch.stack([s.tokens for s in run], dim=1)], dim=1)
    for cache in attention_caches(run):  # positions 0 .. 14 went in (the last token is never fed back)
        assert cache.key.size(2) == 4 and sorted(cache.slot_positions.tolist()) == [11, 12, 13, 14]
    assert torch.equal(out, greedy_by_full_forwards(model, ids, mask, 9))
    # The window matters at this length: without it the tokens differ.
    full = generate(tiny("llama"), ids, attention_mask=mask, max_new_tokens=9)
    assert not torch.equal(full, out)


def test_t5_computes_the_encoders_keys_and_values_once() -> None:
    model = tiny("t5")
    calls = []
    for layer in model.decoder.layers:
        layer.cross_attention.linear_kv.register_forward_hook(lambda *_: calls.append(1))
    encoder_calls = []
    model.encoder.register_forward_hook(lambda *_: encoder_calls.append(1))
    ids, mask = prompts()
    out = generate(model, ids, attention_mask=mask, max_new_tokens=6)
    assert out.shape == (3, 1 + 6) and (out[:, 0] == 0).all()  # the decoder start token, then 6 new
    assert len(calls) == len(model.decoder.layers) and len(encoder_calls) == 1
    # The same tokens as full forwards of the decoder sequence.
    seq = out[:, :1]
    with torch.no_grad():
        for _ in range(6):
            logits = model(ids, attention_mask=mask, decoder_input_ids=seq).logits[:, -1]
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(seq, out)


def test_sampling_is_reproducible_with_a_seed() -> None:
    model = tiny("gpt2")
    ids, mask = prompts()
    draw = dict(attention_mask=mask, max_new_tokens=10, temperature=1.5, top_k=20, top_p=0.9)
    first = generate(model, ids, **draw, seed=1)
    assert torch.equal(first, generate(model, ids, **draw, seed=1))
    assert not torch.equal(first, generate(model, ids, **draw, seed=2))
    greedy = generate(model, ids, attention_mask=mask, max_new_tokens=10)
    assert torch.equal(greedy, generate(model, ids, attention_mask=mask, max_new_tokens=10, temperature=1.0,
                                        top_k=1, seed=3))
    assert not torch.equal(first, greedy)


def test_top_k_and_top_p_keep_only_the_likely_tokens() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.06, 0.04]])).expand(2000, 5)
    generator = torch.Generator().manual_seed(0)
    k2 = Sampler(temperature=1.0, top_k=2)(logits, generator)
    assert set(k2.tolist()) == {0, 1} and abs((k2 == 0).float().mean().item() - 0.5 / 0.75) < 0.05
    p = Sampler(temperature=1.0, top_p=0.8)(logits, generator)  # 0.5 + 0.25 < 0.8 <= 0.9: three tokens
    assert set(p.tolist()) == {0, 1, 2}
    assert set(Sampler(temperature=1.0, top_p=0.4)(logits, generator).tolist()) == {0}
    hot = Sampler(temperature=100.0)(logits, generator)  # nearly uniform
    assert set(hot.tolist()) == {0, 1, 2, 3, 4}


def test_each_sequence_stops_at_eos_and_is_padded() -> None:
    model = tiny("gpt2")
    ids, mask = prompts()
    free = generate(model, ids, attention_mask=mask, max_new_tokens=8)
    eos = int(free[0, 7 + 2])  # what the first sequence says third
    out = generate(model, ids, attention_mask=mask, max_new_tokens=8, eos_token_id=eos)
    for row in range(3):
        new = free[row, 7:].tolist()
        stop = new.index(eos) + 1 if eos in new else len(new)
        assert out[row, 7 : 7 + stop].tolist() == new[:stop]
        assert (out[row, 7 + stop :] == eos).all()
    if all(eos in free[row, 7:].tolist() for row in range(3)):
        assert out.size(1) < free.size(1)  # every sequence stopped: the output ends early


def test_generation_ends_when_every_sequence_has_stopped() -> None:
    model = tiny("gpt2")
    ids = torch.randint(1, 64, (1, 4), generator=torch.Generator().manual_seed(5))
    free = generate(model, ids, max_new_tokens=6)
    eos = int(free[0, 5])
    stop = free[0, 4:].tolist().index(eos) + 4  # its first appearance among the new tokens
    out = generate(model, ids, max_new_tokens=6, eos_token_id=[99, eos])
    assert torch.equal(out, free[:, : stop + 1])


def test_generation_runs_in_eval_mode_and_restores_the_mode() -> None:
    model = tiny("gpt2", "model.config.hidden_dropout=0.5", "model.config.attention_dropout=0.5").train()
    ids, mask = prompts()
    out = generate(model, ids, attention_mask=mask, max_new_tokens=5)
    assert model.training
    assert torch.equal(out, generate(model.eval(), ids, attention_mask=mask, max_new_tokens=5))


# ---------------------------------------------------------------- plug-ins and errors


class PlainAttention(nn.Module):
    """A plug-in causal self-attention that declares no cache."""

    def __init__(self, config: megaspec.TransformerConfig) -> None:
        super().__init__()
        self.heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.dropout = config.attention_dropout
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None, rotary=None) -> Tensor:
        b, s, _ = hidden_states.shape
        q, k, v = self.qkv(hidden_states).view(b, s, 3, self.heads, self.head_dim).transpose(1, 3).unbind(2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, is_causal=attention_mask is None,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.proj(out.transpose(1, 2).flatten(2))


def readme_python(after: str, index: int = 0) -> str:
    """The `index`-th Python block of the README after the heading or sentence `after`."""
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    return text.split(after, 1)[1].split("```python\n")[index + 1].split("```", 1)[0]


@pytest.fixture
def plugins():
    """test_plain_attention (no cache) and the README's plain_attention (with one)."""
    megaspec.register("self_attention", "test_plain_attention")(PlainAttention)
    exec(readme_python("A plug-in attention supports generation"), {})
    yield
    unregister("test_plain_attention")
    unregister("plain_attention")


def test_a_yaml_model_with_the_readme_plugin_attention_generates(plugins, write_yaml) -> None:
    path = write_yaml("""
        module: gpt_model
        config: {num_layers: 2, hidden_size: 32, num_attention_heads: 4, vocab_size: 64,
                 max_position_embeddings: 32, hidden_dropout: 0.0}
        submodules:
          embedding: vocab_embedding
          position_embedding: learned_position_embedding
          decoder:
            module: transformer_block
            submodules:
              layers:
                module: transformer_layer
                submodules:
                  input_layernorm: layer_norm
                  self_attention: plain_attention
                  pre_mlp_layernorm: layer_norm
                  mlp: mlp
              final_layernorm: layer_norm
          output_layer: lm_head
    """)
    torch.manual_seed(0)
    model = build_model(path).eval()
    ids, mask = prompts()
    out = generate(model, ids, attention_mask=mask, max_new_tokens=10)
    assert torch.equal(out, greedy_by_full_forwards(model, ids, mask, 10))


def test_a_plugin_attention_without_a_cache_is_named_when_generating(plugins) -> None:
    model = tiny("gpt2", f"{LAYER}.self_attention=test_plain_attention")
    ids, mask = prompts()
    model(ids, attention_mask=mask)  # it works without generation
    with pytest.raises(SpecError) as exc:
        generate(model, ids, attention_mask=mask, max_new_tokens=3)
    assert str(exc.value) == (
        "cannot generate: self_attention 'test_plain_attention' (test_generate.PlainAttention) at "
        "decoder.layers.0.self_attention: it defines no init_cache; to cache it, define init_cache(self, cache) "
        "returning megaspec.KVCache(cache), take cache=None in forward and attend with "
        "`key, value, mask = cache.update(key, value, mask)`")


def test_a_model_that_cannot_generate_says_so() -> None:
    with pytest.raises(SpecError, match=r"^cannot generate: model 'bert_model' \(megaspec.models.bert.BertModel\) "
                                        r"\(the model\): it defines no init_cache; to cache it, define init_cache"):
        generate(tiny("bert"), torch.ones(1, 3, dtype=torch.long), max_new_tokens=2)


def test_a_bidirectional_decoder_attention_cannot_be_cached() -> None:
    model = tiny("gpt2", f"{LAYER}.self_attention.params.attn_mask_type=padding")
    with pytest.raises(SpecError, match=r"^cannot generate: self_attention 'self_attention' \(megaspec.modules."
                                        r"attention.self_attention.SelfAttention\) at decoder.layers.0.self_attention:"
                                        r" its attn_mask_type is 'padding': it attends to later tokens"):
        generate(model, torch.ones(1, 3, dtype=torch.long), max_new_tokens=2)


def test_a_plugin_with_init_cache_must_take_the_cache() -> None:
    class Forgetful(PlainAttention):
        def init_cache(self, cache: megaspec.Cache) -> megaspec.KVCache:
            return megaspec.KVCache(cache)

    with pytest.raises(SpecError, match="it defines init_cache, but forward has no parameter 'cache', which parents "
                                        "then pass by keyword"):
        megaspec.register("self_attention", "test_forgetful")(Forgetful)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"max_new_tokens": 0}, "max_new_tokens must be a positive integer, got 0"),
    ({"max_new_tokens": 2, "top_k": 5}, "top_k=5 only apply when sampling; temperature=0 is greedy: set "
                                        "temperature > 0 to sample"),
    ({"max_new_tokens": 2, "temperature": -1.0}, "temperature must be >= 0 (0: greedy), got -1.0"),
    ({"max_new_tokens": 2, "temperature": 1.0, "top_p": 0.0}, "top_p must be in (0, 1], got 0.0"),
    ({"max_new_tokens": 2, "attention_mask": torch.tensor([[1, 1, 0]])},
     "attention_mask: the prompts in rows [0] end with padding; generation continues from the last position, "
     "so pad prompts on the left"),
    ({"max_new_tokens": 40}, "generation would reach position 42, but the position embedding holds 32 positions "
                             "(max_position_embeddings); shorten the prompt or generate fewer tokens"),
    ({"max_new_tokens": 2, "eos_token_id": -1}, "eos_token_id must be a token id or a list of them, got -1"),
    ({"max_new_tokens": 2, "input_ids": torch.tensor([[1, 64]])}, "input_ids hold 64, outside the model's "
                                                                  "vocabulary (0 .. 63); was the prompt read with "
                                                                  "another tokenizer?"),
])
def test_bad_requests_are_refused_with_a_message(kwargs: dict, message: str) -> None:
    with pytest.raises(SpecError) as exc:
        generate(tiny("gpt2"), kwargs.pop("input_ids", torch.ones(1, 3, dtype=torch.long)), **kwargs)
    assert str(exc.value) == message



def test_readme_generation_snippet_runs() -> None:
    scope: dict = {}
    exec(readme_python("## Generating text"), scope)
    out, sampled, mask = scope["out"], scope["sampled"], scope["mask"]
    assert out.shape == (2, 24) and sampled.shape[0] == 2 and sampled.shape[1] <= 24
    assert torch.equal(out, greedy_by_full_forwards(scope["model"], scope["prompts"], mask, 16))
