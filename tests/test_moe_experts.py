"""Routed and shared experts: the grouped kind matches the sequential reference (outputs and gradients)."""

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from megaspec.config import TransformerConfig
from megaspec.modules.linear import Linear
from megaspec.modules.moe import grouped_gemm
from megaspec.modules.moe.experts import GroupedExperts, SequentialExperts
from megaspec.modules.moe.layer import MoELayer
from megaspec.modules.moe.router import TopKRouter
from megaspec.modules.moe.shared import SharedExpertMLP

E, K, H, T = 6, 2, 16, 40


def moe_config(**changes) -> TransformerConfig:
    base = dict(
        num_layers=2, hidden_size=H, num_attention_heads=2, ffn_hidden_size=24, add_bias_linear=False,
        gated_linear_unit=True, activation="silu", num_moe_experts=E, moe_router_topk=K,
    )  # fmt: skip
    return TransformerConfig(**{**base, **changes})


def init(module: nn.Module) -> nn.Module:
    """What the builder does: every module initialises its own tensors."""
    torch.manual_seed(0)
    for m in module.modules():
        if hasattr(m, "init_weights"):
            m.init_weights()
    return module


def layer_pair(config: TransformerConfig) -> tuple[MoELayer, MoELayer]:
    """The same weights behind sequential and grouped experts."""
    seq = init(MoELayer(config, router=TopKRouter(config), experts=SequentialExperts(config)))
    grp = MoELayer(config, router=TopKRouter(config), experts=GroupedExperts(config))
    grp.load_state_dict(seq.state_dict())
    for p in seq.parameters():  # larger weights, so differences are not hidden by tiny outputs
        p.data.mul_(10.0)
    grp.load_state_dict(seq.state_dict())
    return seq, grp


def run(layer: MoELayer, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    x = x.clone().requires_grad_()
    out = layer(x)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    grads = {n: p.grad for n, p in layer.named_parameters()}
    return out.detach(), {**grads, "input": x.grad}


CASES = {
    "swiglu dropless": {},
    "gelu with bias": {"gated_linear_unit": False, "activation": "gelu", "add_bias_linear": True},
    "capacity 0.5": {"moe_expert_capacity_factor": 0.5},
    "capacity with bias": {"moe_expert_capacity_factor": 0.75, "add_bias_linear": True},
    "sigmoid, groups": {"moe_router_score_function": "sigmoid", "moe_router_num_groups": 3, "moe_router_group_topk": 2},
}  # fmt: skip


@pytest.mark.parametrize("fallback", [False, True], ids=["grouped_mm", "segments"])
@pytest.mark.parametrize("changes", CASES.values(), ids=CASES.keys())
def test_grouped_matches_sequential(changes: dict, fallback: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if fallback:
        monkeypatch.setattr(grouped_gemm, "grouped_mm_supported", lambda x: False)
    elif not grouped_gemm.grouped_mm_supported(torch.zeros(1)):
        pytest.skip("this torch build has no grouped_mm for fp32 on the CPU")
    seq, grp = layer_pair(moe_config(**changes))
    x = torch.randn(2, T // 2, H, generator=torch.Generator().manual_seed(3))
    out_s, grads_s = run(seq, x)
    out_g, grads_g = run(grp, x)
    torch.testing.assert_close(out_g, out_s, atol=1e-5, rtol=0)
    assert grads_s.keys() == grads_g.keys()
    for name in grads_s:
        torch.testing.assert_close(grads_g[name], grads_s[name], atol=1e-5, rtol=0, msg=name)
        assert torch.isfinite(grads_g[name]).all(), name
    torch.testing.assert_close(grp.tokens_per_expert, seq.tokens_per_expert)


def test_experts_compute_the_weighted_sum_of_per_expert_mlps() -> None:
    config = moe_config()
    experts = init(GroupedExperts(config))
    x = torch.randn(T, H)
    indices = torch.stack([torch.arange(T) % E, (torch.arange(T) + 1) % E], dim=1)  # [T, 2]
    probs = torch.rand(T, K)
    counts = torch.bincount(indices.flatten(), minlength=E)
    want = torch.zeros(T, H)
    for t in range(T):
        for j in range(K):
            e = indices[t, j]
            gate, up = F.linear(x[t], experts.fc1_weight[e]).chunk(2)
            want[t] += probs[t, j] * F.linear(F.silu(gate) * up, experts.fc2_weight[e])
    torch.testing.assert_close(experts(x, probs, indices, counts), want, atol=1e-5, rtol=0)


def test_shared_experts_with_sigmoid_gate() -> None:
    config = moe_config(moe_shared_expert_intermediate_size=20, moe_shared_expert_gate=True)
    linear = functools.partial(Linear, config)
    shared = init(SharedExpertMLP(config, linear_fc1=linear, linear_fc2=linear))
    assert shared.linear_fc1.weight.shape == (40, H) and shared.linear_fc2.weight.shape == (H, 20)
    x = torch.randn(3, H)
    gate, up = F.linear(x, shared.linear_fc1.weight).chunk(2, dim=-1)
    dense = F.linear(F.silu(gate) * up, shared.linear_fc2.weight)
    torch.testing.assert_close(shared(x), dense * torch.sigmoid(x @ shared.gate_weight.T))

    layer = init(MoELayer(config, router=TopKRouter(config), experts=GroupedExperts(config), shared_experts=shared))
    routed = MoELayer(config.updated(moe_shared_expert_intermediate_size=None, moe_shared_expert_gate=False),
                      router=layer.router, experts=layer.experts)  # fmt: skip
    torch.testing.assert_close(layer(x[None]), routed(x[None]) + shared(x)[None])


def test_shared_experts_need_their_size() -> None:
    """The spec's shared_experts slot decides whether there are shared experts; they need their width."""
    config = moe_config()
    with pytest.raises(ValueError, match="shared_expert_mlp needs config.moe_shared_expert_intermediate_size"):
        SharedExpertMLP(config, linear_fc1=functools.partial(Linear, config),
                        linear_fc2=functools.partial(Linear, config))


def test_compiles_as_one_graph() -> None:
    """The MoE layer traces without graph breaks (bf16, where grouped_mm's shape rules are known)."""
    config = moe_config(params_dtype="bfloat16")
    if not grouped_gemm.grouped_mm_supported(torch.zeros(1, dtype=torch.bfloat16)):
        pytest.skip("no grouped_mm for bf16 on this device")
    layer = init(MoELayer(config, router=TopKRouter(config), experts=GroupedExperts(config)))
    x = torch.randn(2, 8, H, dtype=torch.bfloat16)
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x))
    assert layer.aux_loss is not None and int(layer.tokens_per_expert.sum()) == 2 * 8 * K
