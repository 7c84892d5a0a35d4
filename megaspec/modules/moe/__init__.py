"""Mixture of experts: router, routed experts, shared experts and the MoE layer."""
