"""Mixture of experts: router, routed experts, shared experts and the MoE layer; importing registers them."""

from megaspec.modules.moe import experts, layer, router, shared  # noqa: F401  (imported for registration)
from megaspec.modules.moe.experts import GroupedExperts, SequentialExperts
from megaspec.modules.moe.layer import MoELayer
from megaspec.modules.moe.router import TopKRouter
from megaspec.modules.moe.shared import SharedExpertMLP

__all__ = ["GroupedExperts", "MoELayer", "SequentialExperts", "SharedExpertMLP", "TopKRouter"]
