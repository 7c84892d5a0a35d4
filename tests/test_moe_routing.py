"""The top-k router: selection rules, capacity dropping, and the balancing losses against hand computations."""

import math

import pytest
import torch
import torch.nn.functional as F

from megaspec.config import TransformerConfig
from megaspec.modules.moe.experts import SequentialExperts
from megaspec.modules.moe.layer import MoELayer
from megaspec.modules.moe.router import TopKRouter
from megaspec.modules.moe.routing import drop_over_capacity

E, K, H, T = 8, 2, 16, 64


def moe_config(**changes) -> TransformerConfig:
    base = dict(
        num_layers=2, hidden_size=H, num_attention_heads=2, ffn_hidden_size=24, add_bias_linear=False,
        gated_linear_unit=True, activation="silu", num_moe_experts=E, moe_router_topk=K,
    )  # fmt: skip
    return TransformerConfig(**{**base, **changes})


def router(**changes) -> TopKRouter:
    torch.manual_seed(0)
    r = TopKRouter(moe_config(**changes))
    r.init_weights()
    r.weight.data.normal_(0.0, 1.0)  # spread logits, so choices are not near-ties
    return r


def tokens(t: int = T) -> torch.Tensor:
    return torch.randn(t, H, generator=torch.Generator().manual_seed(1))


def test_softmax_topk_picks_the_largest_logits_and_renormalises() -> None:
    r = router()
    x = tokens()
    probs, indices, _ = r(x)
    logits = x @ r.weight.T
    assert indices.shape == probs.shape == (T, K)
    torch.testing.assert_close(indices, logits.topk(K).indices)
    # Every token reaches exactly k distinct experts, with weights summing to 1.
    assert all(len(set(row)) == K for row in indices.tolist())
    torch.testing.assert_close(probs, F.softmax(logits.gather(1, indices), dim=-1))
    torch.testing.assert_close(probs.sum(-1), torch.ones(T))


def test_pre_softmax_keeps_the_full_softmax_probabilities() -> None:
    r = router(moe_router_pre_softmax=True)
    x = tokens()
    probs, indices, _ = r(x)
    full = F.softmax(x @ r.weight.T, dim=-1)
    torch.testing.assert_close(probs, full.topk(K).values)
    assert (probs.sum(-1) < 1).all()


def test_sigmoid_scores_and_expert_bias_steer_selection_only() -> None:
    r = router(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True)
    x = tokens()
    scores = torch.sigmoid(x @ r.weight.T)
    # A large bias on expert 5 makes every token pick it...
    r.expert_bias[5] = 10.0
    probs, indices, _ = r(x)
    assert (indices == 5).any(dim=-1).all()
    # ...but the weights are still the unbiased sigmoid scores, normalised over the chosen k.
    chosen = scores.gather(1, indices)
    torch.testing.assert_close(probs, chosen / chosen.sum(-1, keepdim=True))


def test_expert_bias_update_moves_toward_balance() -> None:
    r = router(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
               moe_router_bias_update_rate=0.5)  # fmt: skip
    r.update_expert_bias(torch.tensor([10, 0, 2, 2, 2, 2, 2, 4]))  # mean 3
    torch.testing.assert_close(r.expert_bias, torch.tensor([-0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, -0.5]))


def test_group_limited_topk_chooses_only_inside_the_best_groups() -> None:
    r = router(moe_router_topk=4, moe_router_num_groups=4, moe_router_group_topk=2)
    x = tokens()
    _, indices, _ = r(x)
    logits = x @ r.weight.T
    group_scores = logits.view(T, 4, 2).topk(2, dim=-1).values.sum(-1)  # k / group_topk = 2 per group
    best = group_scores.topk(2, dim=-1).indices
    for t in range(T):
        allowed = {2 * g + i for g in best[t].tolist() for i in range(2)}
        assert set(indices[t].tolist()) == allowed  # 4 of the 4 experts in the 2 best groups


@pytest.mark.parametrize("per_group", [1, 2])
def test_group_score_sums_the_configured_number_of_best_experts(per_group: int) -> None:
    """DeepSeek-V2 scores a group by its best expert, V3 by its best two, whatever k / group_topk is."""
    r = router(moe_router_topk=4, moe_router_num_groups=2, moe_router_group_topk=1,
               moe_router_group_score_topk=per_group)  # k / group_topk would be 4
    x = tokens()
    _, indices, _ = r(x)
    logits = x @ r.weight.T
    best = logits.view(T, 2, 4).topk(per_group, dim=-1).values.sum(-1).argmax(-1)  # [T]
    for t in range(T):
        assert {i // 4 for i in indices[t].tolist()} == {best[t].item()}
    # The rule makes a difference on these tokens: by the default, some tokens pick another group.
    default = router(moe_router_topk=4, moe_router_num_groups=2, moe_router_group_topk=1)(x)[1]
    assert not torch.equal(default.sort(-1).values, indices.sort(-1).values)


def test_group_score_topk_needs_groups_that_hold_it() -> None:
    with pytest.raises(ValueError, match=r"moe_router_group_score_topk needs group-limited routing"):
        router(moe_router_group_score_topk=2)
    with pytest.raises(ValueError, match=r"moe_router_group_score_topk \(3\) must be <= the experts per group \(2\)"):
        router(moe_router_topk=2, moe_router_num_groups=4, moe_router_group_topk=2, moe_router_group_score_topk=3)


def test_capacity_drops_the_lowest_probabilities_and_counts_them() -> None:
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4]])
    indices = torch.tensor([[0, 1], [0, 1], [0, 2], [0, 3]])
    # capacity = ceil(4 tokens * 2 / 4 experts * 1.0) = 2: expert 0 keeps its two most confident tokens.
    kept_probs, kept_idx = drop_over_capacity(probs, indices, num_experts=4, capacity_factor=1.0)
    assert kept_idx.tolist() == [[0, 1], [0, 1], [4, 2], [4, 3]]
    torch.testing.assert_close(kept_probs, torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.0, 0.3], [0.0, 0.4]]))
    _, by_position = drop_over_capacity(probs.flip(0), indices, num_experts=4, capacity_factor=1.0,
                                        policy="position")  # fmt: skip
    assert by_position[:, 0].tolist() == [0, 0, 4, 4]  # the earliest tokens stay


def test_moe_layer_counts_dropped_tokens_and_they_contribute_nothing() -> None:
    config = moe_config(moe_expert_capacity_factor=0.5)
    torch.manual_seed(0)
    layer = MoELayer(config, router=TopKRouter(config), experts=SequentialExperts(config))
    for m in layer.modules():
        if hasattr(m, "init_weights"):
            m.init_weights()
    x = tokens().unsqueeze(0)  # [1, T, H]
    out = layer(x)
    capacity = math.ceil(T * K / E * 0.5)
    assert (layer.tokens_per_expert <= capacity).all()
    assert int(layer.tokens_per_expert.sum() + layer.num_dropped_tokens) == T * K
    assert int(layer.num_dropped_tokens) > 0
    # A token whose assignments were all dropped passes through as zeros.
    probs, indices, _ = layer.router(x[0])
    fully_dropped = (indices == E).all(dim=-1)
    assert fully_dropped.any()
    assert (out[0, fully_dropped] == 0).all()
    assert (probs[indices == E] == 0).all()


def test_dropless_keeps_every_assignment() -> None:
    config = moe_config()
    layer = MoELayer(config, router=router(), experts=SequentialExperts(config))
    layer(tokens().unsqueeze(0))
    assert int(layer.num_dropped_tokens) == 0
    assert int(layer.tokens_per_expert.sum()) == T * K


def test_aux_and_z_loss_match_a_hand_computation() -> None:
    r = router(moe_aux_loss_coeff=0.01, moe_z_loss_coeff=0.001)
    x = tokens()
    _, indices, aux = r(x)
    logits = (x @ r.weight.T).double()
    p = logits.softmax(-1)
    # Switch Transformer: E * sum_i f_i * P_i, f_i = share of the t*k assignments, P_i = mean probability.
    f = torch.stack([(indices == i).sum() for i in range(E)]).double() / (T * K)
    balance = E * (f * p.mean(0)).sum()
    z = (logits.exp().sum(-1).log() ** 2).mean()
    assert aux.item() == pytest.approx(0.01 * balance.item() + 0.001 * z.item(), rel=1e-5)
    # Uniform routing gives the minimum, 1 (times the coefficient).
    uniform = router(moe_aux_loss_coeff=1.0)
    uniform.weight.data.zero_()
    assert uniform(x)[2].item() == pytest.approx(1.0, rel=1e-6)
    assert router()(x)[2].item() == 0.0  # no coefficients, no loss


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"moe_router_topk": 9}, "moe_router_topk (9) must be <= num_moe_experts (8)"),
        ({"moe_layer_freq": [1, 0, 1]}, "moe_layer_freq lists 3 layers but num_layers is 2"),
        ({"moe_layer_freq": [1, 2]}, "moe_layer_freq as a list holds one 0 (dense) or 1 (MoE) per layer, got [1, 2]"),
        ({"moe_router_num_groups": 3, "moe_router_group_topk": 1},
         "moe_router_num_groups (3) must divide num_moe_experts (8)"),
        ({"moe_router_num_groups": 4},
         "moe_router_num_groups and moe_router_group_topk are set together or not at all"),
        ({"moe_router_num_groups": 2, "moe_router_group_topk": 3},
         "moe_router_group_topk (3) must be <= moe_router_num_groups (2)"),
        ({"moe_router_num_groups": 2, "moe_router_group_topk": 1, "moe_router_topk": 5},
         "moe_router_topk (5) must be between moe_router_group_topk (1) and the experts in the chosen groups (4)"),
        ({"moe_router_enable_expert_bias": True},
         "moe_router_enable_expert_bias needs moe_router_score_function 'sigmoid'"),
        ({"moe_router_score_function": "sigmoid", "moe_router_pre_softmax": True},
         "moe_router_pre_softmax applies only to moe_router_score_function 'softmax'"),
        ({"moe_expert_capacity_factor": 0.0}, "moe_expert_capacity_factor must be positive or None, got 0.0"),
        ({"moe_shared_expert_gate": True}, "moe_shared_expert_gate needs moe_shared_expert_intermediate_size"),
        ({"moe_layer_freq": [0, 1], "moe_first_k_dense": 1},
         "moe_first_k_dense applies to an every-N-th moe_layer_freq; a list already says which layers are dense"),
    ],
)  # fmt: skip
def test_config_cross_field_rules(changes: dict, message: str) -> None:
    with pytest.raises(ValueError) as info:
        moe_config(**changes)
    assert message in str(info.value)


def test_moe_layer_pattern_follows_moe_layer_freq() -> None:
    assert moe_config(num_layers=5, moe_layer_freq=2).moe_layer_pattern == ["moe", "dense", "moe", "dense", "moe"]
    assert moe_config(num_layers=3, moe_layer_freq=[0, 1, 1]).moe_layer_pattern == ["dense", "moe", "moe"]
    assert moe_config(num_moe_experts=None).moe_layer_pattern == ["dense", "dense"]
    # The first k dense (DeepSeek), on top of every-N-th, for any number of layers.
    assert moe_config(num_layers=5, moe_first_k_dense=2).moe_layer_pattern == ["dense"] * 2 + ["moe"] * 3
    assert moe_config(num_layers=6, moe_layer_freq=2, moe_first_k_dense=3).moe_layer_pattern == [
        "dense", "dense", "dense", "dense", "moe", "dense"]
    assert moe_config(num_layers=2, moe_first_k_dense=3).moe_layer_pattern == ["dense", "dense"]


def test_expert_bias_balancing_counts_every_micro_batch_and_nudges_the_load():
    from megaspec import build_model, compose
    from megaspec.train.balance import ExpertBiasUpdater

    model = build_model(compose([
        "model=mixtral", "model.config.num_layers=1", "model.config.hidden_size=32",
        "model.config.num_attention_heads=4", "model.config.num_query_groups=2", "model.config.moe_ffn_hidden_size=16", "model.config.num_moe_experts=4",
        "model.config.vocab_size=50", "model.config.max_position_embeddings=16",
        "+model.config.moe_router_score_function=sigmoid", "+model.config.moe_router_enable_expert_bias=true",
        "+model.config.moe_router_bias_update_rate=0.5"]))
    updater = ExpertBiasUpdater(model)
    layer = updater.layers[0]
    seen = torch.zeros(4)
    for seed in (0, 1):  # two micro-batches of one step
        model(torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(seed)))
        seen += layer.tokens_per_expert.float()
    assert seen.sum() == 2 * 2 * 8 * 2  # micro-batches x batch x seq x top-2
    updater.step()
    expected = 0.5 * torch.sign(seen.mean() - seen)  # under-loaded experts up, over-loaded down
    assert torch.equal(layer.router.expert_bias, expected)
    assert updater.counts == {}  # reset for the next step
