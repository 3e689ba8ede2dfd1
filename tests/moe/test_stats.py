"""Tests for the routing statistics, on hand-built RoutingInfo objects and one real layer."""

from __future__ import annotations

import math

import pytest
import torch

from echomoe.moe import build_moe_layer
from echomoe.moe.layer import RoutingInfo
from echomoe.moe.stats import (
    load_cv,
    normalized_mutual_information,
    region_expert_matrix,
    routing_entropy,
    summarize,
    tokens_per_expert,
)


def _info(expert_ids, probs=None, region_ids=None, num_experts=5, num_dropped=0) -> RoutingInfo:
    ids = torch.as_tensor(expert_ids, dtype=torch.long)
    if probs is None:
        probs = torch.full((ids.shape[0], num_experts), 1.0 / num_experts)
    regions = None if region_ids is None else torch.as_tensor(region_ids, dtype=torch.long)
    weights = (ids >= 0).float() / ids.shape[1]
    return RoutingInfo(ids, weights, torch.as_tensor(probs), regions, num_experts, num_dropped)


def _nmi_reference(matrix: list[list[int]]) -> float:
    """Plain-python NMI, arithmetic normalisation."""
    total = sum(map(sum, matrix))
    p = [[v / total for v in row] for row in matrix]
    pr = [sum(row) for row in p]
    pe = [sum(col) for col in zip(*p, strict=True)]

    def h(q: list[float]) -> float:
        return -sum(v * math.log(v) for v in q if v > 0)

    mi = sum(
        p[i][j] * math.log(p[i][j] / (pr[i] * pe[j]))
        for i in range(len(p))
        for j in range(len(p[0]))
        if p[i][j] > 0
    )
    return mi / ((h(pr) + h(pe)) / 2)


# ---------------------------------------------------------------------- load statistics


def test_tokens_per_expert_counts_kept_only() -> None:
    info = _info([[0, 3], [3, -1], [4, 3], [-1, -1], [0, 1]])
    counts = tokens_per_expert(info)
    assert counts.tolist() == [2, 1, 0, 3, 1]
    assert counts.shape == (5,)


def test_load_cv_even_is_zero() -> None:
    # 10 tokens, k=2, every expert gets exactly 4 assignments.
    ids = (torch.arange(20) % 5).view(10, 2)
    assert load_cv(_info(ids)) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("num_experts", [2, 5, 8])
def test_load_cv_one_expert_is_sqrt_e_minus_1(num_experts: int) -> None:
    ids = torch.full((13, 1), num_experts - 1)
    info = _info(ids, num_experts=num_experts)
    assert load_cv(info) == pytest.approx(math.sqrt(num_experts - 1), rel=1e-12)


def test_load_cv_hand_value_and_empty() -> None:
    # counts [3, 1, 0, 0, 1]: mean 1, population std sqrt((4 + 0 + 1 + 1 + 0) / 5)
    info = _info([[0], [0], [0], [1], [4], [-1]])
    assert load_cv(info) == pytest.approx(math.sqrt(6 / 5), rel=1e-12)
    assert load_cv(_info([[-1], [-1]])) == 0.0


def test_routing_entropy_uniform_and_one_hot() -> None:
    ids = [[0, 1], [2, 3], [4, 0]]
    uniform = _info(ids)
    assert routing_entropy(uniform) == pytest.approx(1.0, abs=1e-6)
    assert routing_entropy(uniform, normalized=False) == pytest.approx(math.log(5), abs=1e-6)
    one_hot = torch.zeros(3, 5)
    one_hot[torch.arange(3), torch.tensor([1, 4, 1])] = 1.0
    assert routing_entropy(_info(ids, one_hot)) == 0.0
    assert routing_entropy(_info(ids, one_hot), normalized=False) == 0.0


def test_routing_entropy_hand_value() -> None:
    probs = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]], dtype=torch.float64)
    info = _info([[0], [1]], probs, num_experts=4)
    # mean(log 2, log 4) / log 4 = 0.75
    assert routing_entropy(info) == pytest.approx(0.75, rel=1e-12)
    assert routing_entropy(info, normalized=False) == pytest.approx(1.5 * math.log(2), rel=1e-12)


# --------------------------------------------------------------------- region x expert


def test_region_expert_matrix_hand_case() -> None:
    ids = [
        [0, 1],  # region 0
        [0, 2],  # region 0
        [1, -1],  # region 1 (second slot dropped)
        [3, 4],  # unknown region: excluded
        [-1, 4],  # region 2 (first slot dropped)
        [4, 0],  # region 2
        [2, 3],  # unknown region: excluded
    ]
    info = _info(ids, region_ids=[0, 0, 1, -1, 2, 2, -1])
    m = region_expert_matrix(info, num_regions=4)
    assert m.dtype == torch.long
    assert m.tolist() == [
        [2, 1, 1, 0, 0],
        [0, 1, 0, 0, 0],
        [1, 0, 0, 0, 2],
        [0, 0, 0, 0, 0],
    ]
    # Total = kept assignments of known-region tokens.
    assert int(m.sum()) == 4 + 1 + 3


def test_region_expert_matrix_without_regions_is_zero() -> None:
    m = region_expert_matrix(_info([[0, 1], [2, 3]]), num_regions=3)
    assert m.shape == (3, 5)
    assert int(m.abs().sum()) == 0


@pytest.mark.parametrize(
    "matrix",
    [
        [[4, 0, 0], [0, 7, 0], [0, 0, 2]],
        [[0, 0, 5], [3, 0, 0], [0, 9, 0]],  # a permutation
        [[3, 0, 0, 0, 0], [0, 0, 5, 0, 0], [0, 0, 0, 0, 2]],  # 3 regions -> 3 of 5 experts
    ],
)
def test_nmi_bijection_is_one(matrix) -> None:
    assert normalized_mutual_information(torch.tensor(matrix)) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize(
    "matrix",
    [
        [[2, 4, 6], [1, 2, 3]],  # rank one: p(r, e) = p(r) p(e)
        [[5, 5, 5, 5, 5], [5, 5, 5, 5, 5], [5, 5, 5, 5, 5]],
    ],
)
def test_nmi_independent_is_zero(matrix) -> None:
    assert normalized_mutual_information(torch.tensor(matrix)) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize(
    "matrix",
    [
        [[3, 4, 5]],  # one region
        [[3, 4, 5], [0, 0, 0]],  # only one region present
        [[0, 6, 0], [0, 2, 0]],  # one expert
        [[0, 0], [0, 0]],  # empty
    ],
)
def test_nmi_constant_variable_is_zero(matrix) -> None:
    assert normalized_mutual_information(torch.tensor(matrix)) == 0.0


def test_nmi_hand_value() -> None:
    matrix = [[2, 1, 1, 0, 0], [0, 1, 0, 0, 0], [1, 0, 0, 0, 2]]
    got = normalized_mutual_information(torch.tensor(matrix))
    expected = _nmi_reference(matrix)
    assert 0.1 < expected < 0.9
    assert got == pytest.approx(expected, rel=1e-12)


# ----------------------------------------------------------------------------- summary


def test_summarize_small_case() -> None:
    # N=4, k=2, E=3; two assignments dropped (capacity).
    probs = torch.tensor(
        [[0.5, 0.5, 0.0], [0.5, 0.0, 0.5], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64
    )
    info = _info(
        [[0, 1], [0, 2], [1, -1], [0, -1]],
        probs,
        region_ids=[0, 0, 1, -1],
        num_experts=3,
        num_dropped=2,
    )
    s = summarize(info)
    assert set(s) == {
        "load_cv",
        "entropy",
        "dropped_fraction",
        "max_expert_share",
        "min_expert_share",
    }
    # counts [3, 2, 1]: mean 2, population std sqrt(2/3)
    assert s["load_cv"] == pytest.approx(math.sqrt(2 / 3) / 2, rel=1e-12)
    # entropies log2, log2, 0, 0 -> mean log2 / 2, normalised by log 3
    assert s["entropy"] == pytest.approx(math.log(2) / 2 / math.log(3), rel=1e-12)
    assert s["dropped_fraction"] == pytest.approx(2 / 8)
    assert s["max_expert_share"] == pytest.approx(3 / 6)
    assert s["min_expert_share"] == pytest.approx(1 / 6)
    assert all(isinstance(v, float) for v in s.values())

    s2 = summarize(info, num_regions=2)
    assert set(s2) == set(s) | {"region_expert_nmi"}
    # region 0: tokens 0, 1 -> experts {0, 1}, {0, 2}; region 1: token 2 -> expert 1.
    assert region_expert_matrix(info, 2).tolist() == [[2, 1, 1], [0, 1, 0]]
    expected = _nmi_reference([[2, 1, 1], [0, 1, 0]])
    assert s2["region_expert_nmi"] == pytest.approx(expected, rel=1e-12)
    assert 0.0 < s2["region_expert_nmi"] < 1.0

    # No region ids -> no NMI key even when num_regions is given.
    no_regions = _info([[0, 1], [0, 2]], num_experts=3)
    assert "region_expert_nmi" not in summarize(no_regions, num_regions=2)


def test_summarize_no_drops() -> None:
    ids = (torch.arange(20) % 5).view(10, 2)
    s = summarize(_info(ids))
    assert s["dropped_fraction"] == 0.0
    assert s["load_cv"] == pytest.approx(0.0, abs=1e-12)
    assert s["max_expert_share"] == pytest.approx(0.2)
    assert s["min_expert_share"] == pytest.approx(0.2)
    assert s["entropy"] == pytest.approx(1.0, abs=1e-6)


# ------------------------------------------------------------------------- end to end


@pytest.mark.parametrize(
    ("top_k", "region_experts"),
    [
        (2, None),  # default: 7 regions over 5 experts, 2 each (wrapping)
        (2, [[0, 1, 2], [3, 4], [1, 3], [0, 4], [2, 3, 4], [0, 1], [1, 2, 3, 4]]),
        (1, [[0], [1], [2], [3], [4], [0, 2], [1, 3]]),
    ],
)
def test_region_hard_layer_matrix_zero_outside_regions(top_k: int, region_experts) -> None:
    torch.manual_seed(0)
    num_regions = 7
    layer = build_moe_layer(
        32,
        37,
        5,
        top_k,
        router="region_hard",
        num_regions=num_regions,
        region_experts=region_experts,
    )
    batch, tokens = 16, 6
    x = torch.randn(batch, tokens, 32, generator=torch.Generator().manual_seed(1))
    regions = torch.tensor([0, 1, 2, 3, 4, 5, 6, -1, 0, 1, 2, 3, 4, 5, 6, -1])
    out = layer(x, regions)
    info = out.routing
    assert info.region_ids.shape == (batch * tokens,)
    m = region_expert_matrix(info, num_regions)
    mask = layer.router.region_mask
    assert mask.shape == (num_regions, 5)
    assert int(m[~mask].abs().sum()) == 0  # nothing outside a region's experts
    # Every region is present, so each row holds all its tokens' k assignments.
    per_region = 2 * tokens * top_k
    assert m.sum(dim=1).tolist() == [per_region] * num_regions
    if region_experts is None:
        # Exactly k experts per region and k slots: the non-zeros are exactly the mask.
        assert torch.equal(m > 0, mask)
        assert bool((m[mask] == 2 * tokens).all())
    # Unknown-region tokens (batch rows 7 and 15) are excluded from the matrix.
    assert int(m.sum()) == (batch - 2) * tokens * top_k
    nmi = summarize(info, num_regions)["region_expert_nmi"]
    assert 0.0 < nmi <= 1.0
