"""GPT-2 and Llama built by hand from megaspec modules: HF parity, loss, published parameter counts."""

import functools

import pytest
import torch
from torch import Tensor, nn

from megaspec.config import TransformerConfig
from megaspec.models.gpt import GPTModel
from megaspec.modules.activation import GELUTanh, SiLU
from megaspec.modules.attention.core import EagerAttention, SDPAttention
from megaspec.modules.attention.self_attention import SelfAttention
from megaspec.modules.embedding.vocab import VocabEmbedding
from megaspec.modules.head.lm_head import LMHead
from megaspec.modules.layer.transformer_block import TransformerBlock
from megaspec.modules.layer.transformer_layer import TransformerLayer
from megaspec.modules.linear import Linear
from megaspec.modules.mlp.mlp import MLP
from megaspec.modules.norm import LayerNorm, RMSNorm
from megaspec.modules.position.learned import LearnedPositionEmbedding
from megaspec.modules.position.rotary import RotaryEmbedding

NO_DROPOUT = {"hidden_dropout": 0.0, "attention_dropout": 0.0}

# Published sizes, as TransformerConfig fields.
GPT2_SMALL = TransformerConfig(
    num_layers=12, hidden_size=768, num_attention_heads=12, vocab_size=50257,
    max_position_embeddings=1024, activation="gelu_tanh",
)  # fmt: skip
LLAMA3_8B = TransformerConfig(
    num_layers=32, hidden_size=4096, num_attention_heads=32, num_query_groups=8,
    ffn_hidden_size=14336, vocab_size=128256, max_position_embeddings=8192,
    normalization="RMSNorm", activation="silu", gated_linear_unit=True, add_bias_linear=False,
    position_embedding_type="rope", rotary_base=500000.0, share_embeddings_and_output_weights=False,
    hidden_dropout=0.0, attention_dropout=0.0,
)  # fmt: skip


def build_gpt(config: TransformerConfig, llama: bool, core_attention: type[nn.Module] = SDPAttention) -> GPTModel:
    """Assemble the model through the constructors, as the gpt2 / llama specs describe it."""
    norm = RMSNorm if llama else LayerNorm
    activation = SiLU if llama else GELUTanh
    linear = functools.partial(Linear, config)

    def layer() -> TransformerLayer:
        attention = SelfAttention(config, linear_qkv=linear, core_attention=core_attention(config), linear_proj=linear)
        mlp = MLP(config, linear_fc1=linear, linear_fc2=linear, activation=activation(config))
        return TransformerLayer(
            config,
            input_layernorm=norm(config),
            self_attention=attention,
            pre_mlp_layernorm=norm(config),
            mlp=mlp,
        )

    decoder = TransformerBlock(config, layers=[layer() for _ in range(config.num_layers)], final_layernorm=norm(config))
    position = RotaryEmbedding(config) if llama else LearnedPositionEmbedding(config)
    return GPTModel(
        config,
        embedding=VocabEmbedding(config),
        position_embedding=position,
        decoder=decoder,
        output_layer=LMHead(config),
    )


def init_weights(model: nn.Module) -> nn.Module:
    """What the builder does after construction: each module initialises its own tensors."""
    for module in model.modules():
        if hasattr(module, "init_weights"):
            module.init_weights()
    return model


def n_params(model: nn.Module) -> int:
    """Distinct parameters (a tied weight counts once)."""
    return sum(p.numel() for p in model.parameters())


# ---- HF -> megaspec weight mapping ------------------------------------------------------------


def fuse_qkv(q: Tensor, k: Tensor, v: Tensor, groups: int) -> Tensor:
    """Separate Q [nh*d, ...], K, V [ng*d, ...] -> Megatron's fused per-group rows [ng*(nh/ng+2)*d, ...]."""
    # Row blocks per group: that group's query heads, then its key head, then its value head.
    per_group = [t.unflatten(0, (groups, -1)) for t in (q, k, v)]  # [ng, rows/ng, ...] each
    return torch.cat(per_group, dim=1).flatten(0, 1)


@torch.no_grad()
def load_hf_gpt2(ours: GPTModel, hf: nn.Module) -> None:
    """Copy GPT2LMHeadModel weights into ours (HF's Conv1D stores weights as [in, out])."""
    t = hf.transformer
    heads = t.config.n_head
    ours.embedding.weight.copy_(t.wte.weight)
    ours.position_embedding.weight.copy_(t.wpe.weight)
    for layer, block in zip(ours.decoder.layers, t.h, strict=True):
        layer.input_layernorm.load_state_dict(block.ln_1.state_dict())
        layer.pre_mlp_layernorm.load_state_dict(block.ln_2.state_dict())
        q, k, v = block.attn.c_attn.weight.t().chunk(3, dim=0)
        layer.self_attention.linear_qkv.weight.copy_(fuse_qkv(q, k, v, heads))
        layer.self_attention.linear_qkv.bias.copy_(fuse_qkv(*block.attn.c_attn.bias.chunk(3), heads))
        layer.self_attention.linear_proj.weight.copy_(block.attn.c_proj.weight.t())
        layer.self_attention.linear_proj.bias.copy_(block.attn.c_proj.bias)
        layer.mlp.linear_fc1.weight.copy_(block.mlp.c_fc.weight.t())
        layer.mlp.linear_fc1.bias.copy_(block.mlp.c_fc.bias)
        layer.mlp.linear_fc2.weight.copy_(block.mlp.c_proj.weight.t())
        layer.mlp.linear_fc2.bias.copy_(block.mlp.c_proj.bias)
    ours.decoder.final_layernorm.load_state_dict(t.ln_f.state_dict())


@torch.no_grad()
def load_hf_llama(ours: GPTModel, hf: nn.Module) -> None:
    """Copy LlamaForCausalLM weights into ours (fusing q/k/v and gate/up)."""
    m = hf.model
    groups = hf.config.num_key_value_heads
    ours.embedding.weight.copy_(m.embed_tokens.weight)
    for layer, block in zip(ours.decoder.layers, m.layers, strict=True):
        attn, mlp = block.self_attn, block.mlp
        layer.input_layernorm.weight.copy_(block.input_layernorm.weight)
        layer.pre_mlp_layernorm.weight.copy_(block.post_attention_layernorm.weight)
        fused = fuse_qkv(attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, groups)
        layer.self_attention.linear_qkv.weight.copy_(fused)
        layer.self_attention.linear_proj.weight.copy_(attn.o_proj.weight)
        layer.mlp.linear_fc1.weight.copy_(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
        layer.mlp.linear_fc2.weight.copy_(mlp.down_proj.weight)
    ours.decoder.final_layernorm.weight.copy_(m.norm.weight)
    ours.output_layer.weight.copy_(hf.lm_head.weight)


# ---- fixtures ---------------------------------------------------------------------------------

VOCAB, SEQ = 101, 12


def tiny_gpt2_pair(core_attention: type[nn.Module] = SDPAttention) -> tuple[GPTModel, nn.Module]:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf_config = transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=32,
        activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=0, eos_token_id=0, attn_implementation="sdpa",
    )  # fmt: skip
    hf = transformers.GPT2LMHeadModel(hf_config).eval()
    config = TransformerConfig(
        num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=VOCAB,
        max_position_embeddings=32, activation="gelu_tanh", **NO_DROPOUT,
    )  # fmt: skip
    ours = init_weights(build_gpt(config, llama=False, core_attention=core_attention)).eval()
    load_hf_gpt2(ours, hf)
    return ours, hf


def tiny_llama_pair(kv_heads: int, core_attention: type[nn.Module] = SDPAttention) -> tuple[GPTModel, nn.Module]:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(
        num_hidden_layers=2, hidden_size=64, intermediate_size=96, num_attention_heads=4,
        num_key_value_heads=kv_heads, vocab_size=VOCAB, max_position_embeddings=64, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, tie_word_embeddings=False,
        attn_implementation="sdpa",
    )  # fmt: skip
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    config = TransformerConfig(
        num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=kv_heads,
        ffn_hidden_size=96, vocab_size=VOCAB, normalization="RMSNorm", layernorm_epsilon=1e-6,
        activation="silu", gated_linear_unit=True, add_bias_linear=False, position_embedding_type="rope",
        rotary_base=500000.0, share_embeddings_and_output_weights=False, **NO_DROPOUT,
    )  # fmt: skip
    ours = init_weights(build_gpt(config, llama=True, core_attention=core_attention)).eval()
    load_hf_llama(ours, hf)
    return ours, hf


def batch() -> tuple[Tensor, Tensor]:
    """Token ids [3, SEQ] and a keep-mask with no padding, right padding and left padding."""
    input_ids = torch.randint(0, VOCAB, (3, SEQ), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, SEQ, dtype=torch.long)
    mask[1, -4:] = 0  # right padding
    mask[2, :5] = 0  # left padding
    return input_ids, mask


def assert_parity(ours: GPTModel, hf: nn.Module) -> None:
    """Logits without and with padding (non-pad positions only), and loss with labels."""
    input_ids, mask = batch()
    with torch.no_grad():
        got, want = ours(input_ids).logits, hf(input_ids).logits
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)

        got, want = ours(input_ids, attention_mask=mask).logits, hf(input_ids, attention_mask=mask).logits
        keep = mask.bool()
        torch.testing.assert_close(got[keep], want[keep], atol=1e-4, rtol=0)

        # No targets at pads, nor where a pad would predict (a left-pad's next token):
        # logits at pad positions are arbitrary and differ between implementations.
        after_pad = torch.cat([torch.zeros(3, 1, dtype=torch.bool), ~keep[:, :-1]], dim=1)
        labels = input_ids.masked_fill(~keep | after_pad, -100)
        got = ours(input_ids, attention_mask=mask, labels=labels).loss
        want = hf(input_ids, attention_mask=mask, labels=labels).loss
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        got, want = ours(input_ids, labels=input_ids).loss, hf(input_ids, labels=input_ids).loss
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


# ---- tests ------------------------------------------------------------------------------------


@pytest.mark.parametrize("core_attention", [SDPAttention, EagerAttention], ids=["sdpa", "eager"])
def test_gpt2_matches_hf(core_attention: type[nn.Module]) -> None:
    assert_parity(*tiny_gpt2_pair(core_attention))


@pytest.mark.parametrize("core_attention", [SDPAttention, EagerAttention], ids=["sdpa", "eager"])
@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_llama_matches_hf(kv_heads: int, core_attention: type[nn.Module]) -> None:
    assert_parity(*tiny_llama_pair(kv_heads, core_attention))


def test_llama_gradients_match_hf() -> None:
    """Backward too: the fused QKV / gate-up gradients equal HF's separate ones, re-fused."""
    ours, hf = tiny_llama_pair(kv_heads=2)
    input_ids, _ = batch()
    ours(input_ids, labels=input_ids).loss.backward()
    hf(input_ids, labels=input_ids).loss.backward()
    attn, got = hf.model.layers[0].self_attn, ours.decoder.layers[0].self_attention
    want = fuse_qkv(attn.q_proj.weight.grad, attn.k_proj.weight.grad, attn.v_proj.weight.grad, 2)
    torch.testing.assert_close(got.linear_qkv.weight.grad, want, atol=1e-5, rtol=1e-4)
    mlp = hf.model.layers[1].mlp
    want = torch.cat([mlp.gate_proj.weight.grad, mlp.up_proj.weight.grad])
    torch.testing.assert_close(ours.decoder.layers[1].mlp.linear_fc1.weight.grad, want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours.embedding.weight.grad, hf.model.embed_tokens.weight.grad, atol=1e-5, rtol=1e-4)


def test_padding_never_gives_nan() -> None:
    """A query row that is entirely padding still attends to itself, so no NaN reaches the loss."""
    ours, _ = tiny_gpt2_pair()
    input_ids, mask = batch()
    mask[0] = 0  # a sequence with no tokens at all
    logits = ours(input_ids, attention_mask=mask).logits
    assert torch.isfinite(logits).all()


def test_gpt2_small_parameter_count() -> None:
    with torch.device("meta"):
        model = build_gpt(GPT2_SMALL, llama=False)
    assert n_params(model) == 124_439_808
    # Tied: the head owns no weight, and the embedding's is the only vocab-sized matrix.
    assert model.output_layer.weight is None
    assert "output_layer.weight" not in model.state_dict()


def test_llama3_8b_parameter_count() -> None:
    with torch.device("meta"):
        model = build_gpt(LLAMA3_8B, llama=True)
    assert n_params(model) == 8_030_261_248
    assert model.output_layer.weight.shape == (128256, 4096)


def test_meta_build_then_materialise() -> None:
    """Meta build -> to_empty -> init_weights gives a working model with Megatron's init."""
    config = LLAMA3_8B.updated(num_layers=2, hidden_size=256, num_attention_heads=4, num_query_groups=2,
                               ffn_hidden_size=512, vocab_size=1000)  # fmt: skip
    with torch.device("meta"):
        model = build_gpt(config, llama=True)
        out = model(**model.example_inputs(batch=2, seq=8))
    assert out.logits.shape == (2, 8, 1000) and out.logits.is_meta

    torch.manual_seed(0)
    init_weights(model.to_empty(device="cpu"))
    rope = model.position_embedding
    torch.testing.assert_close(rope.inv_freq, RotaryEmbedding(config).inv_freq)
    layer = model.decoder.layers[0]
    assert torch.equal(layer.input_layernorm.weight, torch.ones(256))
    std = config.init_method_std
    assert abs(layer.self_attention.linear_qkv.weight.std().item() - std) < 1e-3
    # Projections into the residual stream: std / sqrt(2 * num_layers).
    assert abs(layer.mlp.linear_fc2.weight.std().item() - std / 2.0) < 1e-3
    input_ids = torch.randint(0, 1000, (2, 8))
    loss = model(input_ids, labels=input_ids).loss
    # A freshly initialised model predicts about uniformly over the vocabulary.
    assert abs(loss.item() - torch.log(torch.tensor(1000.0)).item()) < 0.1


@pytest.mark.parametrize("llama", [False, True], ids=["gpt2", "llama"])
def test_forward_traces_as_one_graph(llama: bool) -> None:
    """torch.compile(fullgraph=True) sees no graph break, with and without a padding mask."""
    ours, _ = tiny_llama_pair(kv_heads=2) if llama else tiny_gpt2_pair()
    input_ids, mask = batch()
    compiled = torch.compile(ours, backend="eager", fullgraph=True)  # Dynamo only: no C++ toolchain needed
    torch.testing.assert_close(compiled(input_ids).logits, ours(input_ids).logits)
    got = compiled(input_ids, attention_mask=mask, labels=input_ids).loss
    torch.testing.assert_close(got, ours(input_ids, attention_mask=mask, labels=input_ids).loss)
