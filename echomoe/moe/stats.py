"""Routing statistics from :class:`~echomoe.moe.layer.RoutingInfo`.

All functions are pure and cheap (a bincount or two) so they can run every logging step.
Axis legend: ``N`` tokens, ``k`` slots, ``E`` experts, ``R`` regions.
"""

from __future__ import annotations

import torch
from torch import Tensor

from echomoe.moe.layer import RoutingInfo


def tokens_per_expert(info: RoutingInfo) -> Tensor:
    """``(E,)`` number of kept (token, expert) assignments per expert."""
    ids = info.expert_ids[info.expert_ids >= 0]
    return torch.bincount(ids, minlength=info.num_experts)


def load_cv(info: RoutingInfo) -> float:
    """Coefficient of variation (std / mean, population std) of :func:`tokens_per_expert`.

    0 for perfectly even load; ``sqrt(E - 1)`` when one expert takes everything.
    """
    counts = tokens_per_expert(info).double()
    mean = counts.mean()
    if mean == 0:
        return 0.0
    return float(counts.std(unbiased=False) / mean)


def routing_entropy(info: RoutingInfo, normalized: bool = True) -> float:
    """Mean per-token entropy of the routing distribution (nats; ``/ log E`` if normalized).

    1.0 (normalized) for uniform routing probabilities, 0 for one-hot routing.
    """
    probs = info.probs.double()
    if probs.shape[0] == 0:
        return 0.0
    ent = -(probs * probs.clamp_min(1e-30).log()).sum(dim=-1).mean()
    if normalized and info.num_experts > 1:
        ent = ent / torch.log(torch.tensor(float(info.num_experts), dtype=torch.float64))
    return float(ent)


def region_expert_matrix(info: RoutingInfo, num_regions: int) -> Tensor:
    """``(R, E)`` count of assignments from tokens of region ``r`` to expert ``e``.

    Tokens of unknown region (``-1``) and dropped assignments are left out.  All zeros when the
    routing carried no region ids.
    """
    matrix = torch.zeros(num_regions, info.num_experts, dtype=torch.long)
    if info.region_ids is None:
        return matrix
    k = info.expert_ids.shape[1]
    regions = info.region_ids.to(info.expert_ids.device).unsqueeze(-1).expand(-1, k)
    keep = (regions >= 0) & (info.expert_ids >= 0)
    flat = regions[keep] * info.num_experts + info.expert_ids[keep]
    counts = torch.bincount(flat, minlength=num_regions * info.num_experts)
    return counts.view(num_regions, info.num_experts).cpu()


def normalized_mutual_information(matrix: Tensor) -> float:
    """NMI between region and expert from an ``(R, E)`` contingency matrix.

    ``I(R; E) / ((H(R) + H(E)) / 2)`` (arithmetic normalisation, as scikit-learn's default):
    1 when the expert determines the region and vice versa, 0 when they are independent, and 0
    by convention when either variable is constant.
    """
    joint = matrix.double()
    total = joint.sum()
    if total == 0:
        return 0.0
    joint = joint / total
    p_r, p_e = joint.sum(dim=1), joint.sum(dim=0)

    def entropy(p: Tensor) -> Tensor:
        p = p[p > 0]
        return -(p * p.log()).sum()

    h_r, h_e = entropy(p_r), entropy(p_e)
    if h_r <= 0 or h_e <= 0:
        return 0.0
    nz = joint > 0
    outer = p_r.unsqueeze(1) * p_e.unsqueeze(0)
    mi = (joint[nz] * (joint[nz] / outer[nz]).log()).sum()
    return float((mi / ((h_r + h_e) / 2)).clamp(0.0, 1.0))


def summarize(info: RoutingInfo, num_regions: int | None = None) -> dict[str, float]:
    """Scalars for logging: load CV, entropy, drop fraction, max/min expert share, NMI."""
    counts = tokens_per_expert(info).double()
    total = counts.sum().clamp_min(1.0)
    num_assign = max(int((info.expert_ids >= 0).sum()) + info.num_dropped, 1)
    out = {
        "load_cv": load_cv(info),
        "entropy": routing_entropy(info),
        "dropped_fraction": info.num_dropped / num_assign,
        "max_expert_share": float(counts.max() / total) if counts.numel() else 0.0,
        "min_expert_share": float(counts.min() / total) if counts.numel() else 0.0,
    }
    if num_regions is not None and info.region_ids is not None:
        out["region_expert_nmi"] = normalized_mutual_information(
            region_expert_matrix(info, num_regions)
        )
    return out
