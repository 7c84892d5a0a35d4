"""MoE settings HF's Mixtral-style families share: the load-balancing loss coefficient and its scale."""

from __future__ import annotations

from typing import Any

from megaspec.config import TransformerConfig


def aux_loss_coeff(c: Any) -> float:
    """HF router_aux_loss_coef -> moe_aux_loss_coeff: HF adds its loss only with output_router_logits,
    and Megatron's loss is HF's divided by top-k, so the coefficient is multiplied by it."""
    return c.router_aux_loss_coef * c.num_experts_per_tok if c.output_router_logits else 0.0


def hf_aux_loss(cfg: TransformerConfig) -> dict[str, Any]:
    """moe_aux_loss_coeff -> HF's output_router_logits and router_aux_loss_coef (HF's default when off)."""
    coeff = cfg.moe_aux_loss_coeff / cfg.moe_router_topk
    return {"output_router_logits": coeff > 0, "router_aux_loss_coef": coeff if coeff > 0 else 0.001}
