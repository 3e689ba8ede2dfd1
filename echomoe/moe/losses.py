"""Auxiliary routing losses, as plain functions of the router's outputs.

Every loss returns a raw scalar; coefficients are applied where the losses are summed (the
training loop), never here, so that what is logged is what the router actually produced.

Axis legend: ``N`` tokens, ``E`` experts, ``k`` experts per token, ``R`` regions.
"""

from __future__ import annotations

import torch
from torch import Tensor


def load_balancing_loss(probs: Tensor, expert_ids: Tensor, num_experts: int) -> Tensor:
    """Switch-Transformer load-balancing loss ``E * sum_i f_i * P_i``.

    Args:
        probs: ``(N, E)`` routing probabilities (softmax of the router logits).
        expert_ids: ``(N, k)`` selected experts; ``-1`` marks a dropped assignment, which counts
            in neither numerator nor denominator of ``f``.
        num_experts: ``E``.

    ``f_i`` is the fraction of kept (token, expert) assignments that went to expert ``i`` and
    ``P_i`` the mean probability the router gave expert ``i``.  Under perfectly uniform routing
    (``f_i = P_i = 1/E``) the loss is exactly **1.0**, whatever ``E`` and ``k`` are; its minimum
    over balanced assignments is 1.0 and it grows as load concentrates.  (The
    ``transformers`` Mixtral helper sums ``f`` over the ``k`` slots instead of averaging, so its
    value is ``k`` times this one.)
    """
    if probs.shape[0] == 0:
        return probs.new_zeros(())
    kept = expert_ids[expert_ids >= 0]
    counts = torch.bincount(kept, minlength=num_experts).to(probs.dtype)
    f = counts / counts.sum().clamp_min(1.0)
    p = probs.mean(dim=0)
    return num_experts * torch.sum(f * p)


def router_z_loss(logits: Tensor) -> Tensor:
    """ST-MoE router z-loss ``mean_n logsumexp(z_n)^2`` over ``(N, E)`` logits.

    Logits masked to ``-inf`` (region-hard routing) are ignored by ``logsumexp``.
    """
    if logits.shape[0] == 0:
        return logits.new_zeros((), dtype=torch.float32)
    return torch.logsumexp(logits.float(), dim=-1).square().mean()


def region_alignment_loss(probs: Tensor, region_ids: Tensor | None, region_mask: Tensor) -> Tensor:
    """Negative log of the routing mass a token puts on its own region's experts.

    Args:
        probs: ``(N, E)`` routing probabilities.
        region_ids: ``(N,)`` region of each token, ``-1`` = unknown (ignored), or ``None``.
        region_mask: ``(R, E)`` boolean, ``True`` where expert ``e`` belongs to region ``r``.

    Returns ``-mean_n log(sum_{e in S(r_n)} p_{n,e})`` over tokens with a known region, and 0 when
    there are none.  It is 0 when every token routes entirely inside its region's experts.
    """
    if region_ids is None:
        return probs.new_zeros(())
    known = region_ids >= 0
    if not bool(known.any()):
        return probs.new_zeros(())
    mass = (probs[known] * region_mask[region_ids[known]].to(probs.dtype)).sum(dim=-1)
    return -torch.log(mass.clamp_min(torch.finfo(probs.dtype).tiny)).mean()
