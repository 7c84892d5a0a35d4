"""megaspec.generate against HF transformers' generate: the same greedy tokens, and cached steps equal full forwards.

Each family is a small random HF model with every weight perturbed away from its
initial value, converted with from_hf. Prompts: one sequence, and three of different
lengths padded on the left.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from megaspec.generation import Generation, generate
from megaspec.interop.hf import from_hf

transformers = pytest.importorskip("transformers")

VOCAB, NEW = 101, 10
IMAGE = 100  # LLaVA's image token: the last vocabulary id
IMAGE_SIZE, PATCH = 28, 7  # 16 patches per image


def perturbed(hf: nn.Module) -> nn.Module:
    """Every weight nudged (norms start at one, biases at zero), in eval mode, with no eos to stop at."""
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.2)  # large enough that greedy outputs vary
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return hf.eval()


def gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=64,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return perturbed(transformers.GPT2LMHeadModel(config))


LLAMA = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=VOCAB, rms_norm_eps=1e-6)


def llama() -> nn.Module:
    torch.manual_seed(0)
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8}
    return perturbed(transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA, rope_parameters=rope)))


def mistral() -> nn.Module:
    """A window of 4 positions: every prompt and output here is longer."""
    torch.manual_seed(0)
    return perturbed(transformers.MistralForCausalLM(transformers.MistralConfig(**LLAMA, sliding_window=4)))


def mixtral() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.MixtralConfig(**{**LLAMA, "intermediate_size": 48}, num_local_experts=4,
                                        num_experts_per_tok=2, rope_parameters={"rope_type": "default",
                                                                                "rope_theta": 1e6})
    return perturbed(transformers.MixtralForCausalLM(config))


def t5() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.T5Config(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, vocab_size=VOCAB,
                                   dropout_rate=0.0, relative_attention_num_buckets=8,
                                   relative_attention_max_distance=16, decoder_start_token_id=0,
                                   feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    return perturbed(transformers.T5ForConditionalGeneration(config))


def llava() -> nn.Module:
    torch.manual_seed(0)
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=PATCH,
                                           hidden_act="quick_gelu")
    text = transformers.LlamaConfig(**LLAMA, max_position_embeddings=128, tie_word_embeddings=False)
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE)
    return perturbed(transformers.LlavaForConditionalGeneration(config))


def prompts(batch: int, vocab: int = IMAGE) -> tuple[Tensor, Tensor]:
    """Token ids [batch, 9] with lengths 9, 6, 3 (left padding) and their attention mask."""
    ids = torch.randint(3, vocab, (batch, 9), generator=torch.Generator().manual_seed(batch))
    mask = torch.ones(batch, 9, dtype=torch.long)
    for row in range(batch):
        mask[row, : 3 * row] = 0
    return ids.masked_fill(mask == 0, 0), mask


def llava_prompts(batch: int) -> tuple[Tensor, Tensor, Tensor]:
    """Each prompt: 2 text tokens, one image (16 image tokens), more text; left padded; with pixel values."""
    text, mask = prompts(batch)
    ids = torch.zeros(batch, 9 + 16, dtype=torch.long)
    for row in range(batch):
        start = 3 * row  # where this prompt's tokens begin
        ids[row, start:] = torch.cat([text[row, start : start + 2], torch.full((16,), IMAGE), text[row, start + 2 :]])
    mask = torch.cat([torch.ones(batch, 16, dtype=torch.long), mask], dim=1)  # the same pads, on the left
    pixels = torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(9))
    return ids, mask.sort(dim=1).values, pixels


FAMILIES: dict[str, Callable[[], nn.Module]] = {
    "gpt2": gpt2, "llama": llama, "mistral_window": mistral, "mixtral": mixtral, "t5": t5, "llava": llava,
}


def inputs(family: str, batch: int) -> dict[str, Tensor]:
    """Generation inputs; a batch of one has no mask (HF and megaspec then take their unpadded paths)."""
    if family == "llava":
        ids, mask, pixels = llava_prompts(batch)
        extra = {"pixel_values": pixels}
    else:
        ids, mask = prompts(batch)
        extra = {}
    if batch == 1:
        return {"input_ids": ids, **extra}
    return {"input_ids": ids, "attention_mask": mask, **extra}


@pytest.mark.parametrize("batch", [1, 3], ids=["batch1", "batch3_left_padded"])
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_tokens_equal_hf_generate(family: str, batch: int) -> None:
    hf = FAMILIES[family]()
    ours = from_hf(hf)
    given = inputs(family, batch)
    with torch.no_grad():
        want = hf.generate(**given, max_new_tokens=NEW, do_sample=False)
    got = generate(ours, **given, max_new_tokens=NEW)
    assert got.shape == want.shape
    assert torch.equal(got, want), (got, want)
    # Not a degenerate model repeating one token, which a broken cache could also produce.
    assert min(len(set(row)) for row in got[:, -NEW:].tolist()) >= 3


def full_logits(model: nn.Module, family: str, given: dict[str, Tensor], out: Tensor) -> Tensor:
    """Logits [b, NEW, vocab] a full forward over the whole output gives where each new token was chosen."""
    if family == "t5":
        logits = model(input_ids=given["input_ids"], attention_mask=given.get("attention_mask"),
                       decoder_input_ids=out[:, :-1]).logits  # [b, NEW, vocab]
        return logits
    p = given["input_ids"].size(1)
    mask = given.get("attention_mask")
    extra = {"pixel_values": given["pixel_values"]} if "pixel_values" in given else {}
    if mask is None:
        logits = model(input_ids=out[:, :-1], **extra).logits
    else:
        full = torch.cat([mask, torch.ones(mask.size(0), NEW - 1, dtype=torch.long)], dim=1)
        positions = (full.cumsum(-1) - 1).masked_fill(full == 0, 0)
        logits = model(input_ids=out[:, :-1], attention_mask=full, position_ids=positions, **extra).logits
    return logits[:, p - 1 :]


@pytest.mark.parametrize("batch", [1, 3], ids=["batch1", "batch3_left_padded"])
@pytest.mark.parametrize("family", FAMILIES)
def test_each_cached_step_equals_a_full_forward(family: str, batch: int) -> None:
    ours = from_hf(FAMILIES[family]())
    given = inputs(family, batch)
    run = Generation(ours, **given, max_new_tokens=NEW)
    steps = list(run)
    out = torch.cat([run.prefix, torch.stack([s.tokens for s in steps], dim=1)], dim=1)
    cached = torch.stack([s.logits for s in steps], dim=1)  # [b, NEW, vocab]
    with torch.no_grad():
        full = full_logits(ours, family, given, out)
    torch.testing.assert_close(cached, full, atol=1e-4, rtol=0)


def test_t5_decoder_start_token_travels_with_the_model() -> None:
    """A start token other than T5's 0: in the spec's params, back in to_hf's config, first in every output."""
    from megaspec import build_record
    from megaspec.interop.hf import to_hf

    hf = t5()
    hf.config.decoder_start_token_id = hf.generation_config.decoder_start_token_id = 7
    ours = from_hf(hf)
    assert ours.decoder_start_token_id == 7
    assert build_record(ours).spec.to_dict()["params"] == {"decoder_start_token_id": 7}
    assert to_hf(ours).config.decoder_start_token_id == 7
    given = inputs("t5", 3)
    with torch.no_grad():
        want = hf.generate(**given, max_new_tokens=NEW, do_sample=False)
    got = generate(ours, **given, max_new_tokens=NEW)
    assert (got[:, 0] == 7).all() and torch.equal(got, want)
