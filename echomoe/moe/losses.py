"""Auxiliary routing losses, as plain functions of the router's outputs.

Every loss returns a raw scalar; coefficients are applied where the losses are summed (the
training loop), never here, so that what is logged is what the router actually produced.

Axis legend: ``N`` tokens, ``E`` experts, ``k`` experts per token, ``R`` regions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
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
    # Shift by one so that dropped (-1) assignments land in bin 0: no boolean gather, no sync.
    counts = torch.bincount(expert_ids.reshape(-1) + 1, minlength=num_experts + 1)[1:]
    counts = counts.to(probs.dtype)
    f = counts / counts.sum().clamp_min(1.0)
    p = probs.mean(dim=0)
    return num_experts * torch.dot(f, p)


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
    if region_ids is None or probs.shape[0] == 0:
        return probs.new_zeros(())
    # Column R (all zero) serves unknown regions, which index -1 picks; they are then left out
    # of the sum and of the count, without a boolean gather or a host sync.
    mask_t = F.pad(region_mask.t().to(probs.dtype), (0, 1))  # (E, R + 1)
    mass = (probs.t() * mask_t[:, region_ids]).sum(dim=0)  # (N,)
    known = region_ids >= 0
    log_mass = torch.log(mass.clamp_min(torch.finfo(probs.dtype).tiny))
    return -torch.where(known, log_mass, 0.0).sum() / known.sum().clamp_min(1)
