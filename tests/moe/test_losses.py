"""Tests for the auxiliary routing losses."""

from __future__ import annotations

import math

import pytest
import torch

from echomoe.moe import TopKRouter, load_balancing_loss, region_alignment_loss, router_z_loss


def _uniform_case(num_tokens: int, num_experts: int, top_k: int, dtype=torch.float32):
    """Uniform probs and perfectly even assignments: token n picks experts n*k .. n*k+k-1."""
    probs = torch.full((num_tokens, num_experts), 1.0 / num_experts, dtype=dtype)
    flat = torch.arange(num_tokens * top_k) % num_experts
    return probs, flat.view(num_tokens, top_k)


# ---------------------------------------------------------------------- load balancing


@pytest.mark.parametrize(
    ("num_experts", "top_k"), [(1, 1), (2, 1), (4, 2), (5, 1), (5, 2), (5, 3), (7, 7), (8, 2)]
)
def test_load_balancing_uniform_is_one(num_experts: int, top_k: int) -> None:
    # num_tokens a multiple of num_experts so every expert gets exactly N*k/E assignments.
    num_tokens = 3 * num_experts
    probs, ids = _uniform_case(num_tokens, num_experts, top_k, torch.float64)
    counts = torch.bincount(ids.reshape(-1), minlength=num_experts)
    assert bool((counts == counts[0]).all())
    loss = load_balancing_loss(probs, ids, num_experts)
    assert loss.shape == ()
    assert float(loss) == pytest.approx(1.0, rel=0, abs=1e-12)
    # fp32 too, to rounding.
    probs32, _ = _uniform_case(num_tokens, num_experts, top_k)
    assert float(load_balancing_loss(probs32, ids, num_experts)) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("num_experts", [1, 2, 5, 8])
@pytest.mark.parametrize("expert", [0, -1])
def test_load_balancing_collapsed_is_num_experts(num_experts: int, expert: int) -> None:
    expert = expert % num_experts
    num_tokens = 11
    probs = torch.zeros(num_tokens, num_experts)
    probs[:, expert] = 1.0
    ids = torch.full((num_tokens, 1), expert)
    loss = load_balancing_loss(probs, ids, num_experts)
    assert float(loss) == pytest.approx(float(num_experts), abs=1e-6)


def test_load_balancing_hand_value_and_drops() -> None:
    # E=3, N=2, k=2. probs mean P = [0.45, 0.35, 0.2].
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.4, 0.4, 0.2]])
    ids = torch.tensor([[0, 1], [0, 2]])
    # f = [2, 1, 1] / 4; loss = 3 * (0.5*0.45 + 0.25*0.35 + 0.25*0.2) = 1.0875
    assert float(load_balancing_loss(probs, ids, 3)) == pytest.approx(1.0875, abs=1e-6)
    # Dropped (-1) assignments count in neither numerator nor denominator of f:
    # f = [1, 1, 1] / 3 -> loss = 3 * (0.45 + 0.35 + 0.2) / 3 = 1.0
    dropped = torch.tensor([[0, 1], [-1, 2]])
    assert float(load_balancing_loss(probs, dropped, 3)) == pytest.approx(1.0, abs=1e-6)
    # Everything dropped: f = 0 -> loss 0 (not NaN).
    all_dropped = torch.full((2, 2), -1)
    assert float(load_balancing_loss(probs, all_dropped, 3)) == 0.0


def test_load_balancing_gradient_flows_through_probs_only() -> None:
    logits = torch.randn(9, 5, generator=torch.Generator().manual_seed(0), requires_grad=True)
    probs = logits.softmax(-1)
    ids = probs.topk(2, dim=-1).indices
    load_balancing_loss(probs, ids, 5).backward()
    assert logits.grad is not None
    assert float(logits.grad.abs().sum()) > 0


@pytest.mark.parametrize(("num_experts", "top_k"), [(5, 1), (5, 2), (5, 3), (8, 2), (3, 3)])
@pytest.mark.parametrize("seed", [0, 1])
def test_load_balancing_matches_transformers_mixtral(
    num_experts: int, top_k: int, seed: int
) -> None:
    mixtral = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    # Verified against transformers 5.x `load_balancing_loss_func` (no attention mask):
    #   tokens_per_expert = histc(top-k ids) / N       -> sums to k over experts
    #   router_prob_per_expert = softmax(logits).mean(0)
    #   hf = E * sum(tokens_per_expert * router_prob_per_expert)
    # echomoe's f is counts / (N * k) (sums to 1), with the same P, so exactly
    #   hf == k * load_balancing_loss(probs, topk_ids, E).
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(17, num_experts, generator=gen) * 3
    probs = logits.softmax(dim=-1)
    ids = probs.topk(top_k, dim=-1).indices
    ours = load_balancing_loss(probs, ids, num_experts)
    hf = mixtral.load_balancing_loss_func(
        gate_logits=(logits,), num_experts=num_experts, top_k=top_k
    )
    torch.testing.assert_close(ours, hf / top_k, rtol=1e-6, atol=1e-7)
    # The router's "balance" aux loss is the same quantity on its own logits.
    torch.manual_seed(seed)
    router = TopKRouter(32, num_experts, top_k)
    x = torch.randn(17, 32, generator=gen) * 40
    out = router(x)
    hf_router = mixtral.load_balancing_loss_func(
        gate_logits=(out.logits.detach(),), num_experts=num_experts, top_k=top_k
    )
    torch.testing.assert_close(out.aux_losses["balance"].detach(), hf_router / top_k)


# --------------------------------------------------------------------------- z-loss


def test_router_z_loss_hand_values() -> None:
    logits = torch.tensor([[0.0, 0.0], [1.0, 2.0], [-3.0, 5.0]])
    lse = [
        math.log(2.0),
        math.log(math.exp(1.0) + math.exp(2.0)),
        math.log(math.exp(-3.0) + math.exp(5.0)),
    ]
    expected = sum(v * v for v in lse) / 3
    assert float(router_z_loss(logits)) == pytest.approx(expected, rel=1e-6)
    # Single row, three equal logits of value c: (c + log 3)^2.
    assert float(router_z_loss(torch.full((1, 3), 4.0))) == pytest.approx(
        (4.0 + math.log(3.0)) ** 2, rel=1e-6
    )
    # fp16/bf16 input is computed in fp32.
    out = router_z_loss(logits.to(torch.bfloat16))
    assert out.dtype == torch.float32
    assert float(out) == pytest.approx(expected, rel=1e-6)


def test_router_z_loss_ignores_neg_inf() -> None:
    inf = float("inf")
    masked = torch.tensor([[0.0, -inf, 0.0, -inf], [1.0, -inf, -inf, 2.0]])
    dense = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    got = router_z_loss(masked)
    assert torch.isfinite(got)
    assert float(got) == pytest.approx(float(router_z_loss(dense)), rel=1e-6)
    expected = (math.log(2.0) ** 2 + math.log(math.exp(1.0) + math.exp(2.0)) ** 2) / 2
    assert float(got) == pytest.approx(expected, rel=1e-6)


# ----------------------------------------------------------------- region alignment


def _mask() -> torch.Tensor:
    # 3 regions over 5 experts: r0 -> {0, 1}, r1 -> {2, 3}, r2 -> {1, 4}
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[0, [0, 1]] = True
    mask[1, [2, 3]] = True
    mask[2, [1, 4]] = True
    return mask


def test_region_alignment_zero_when_inside() -> None:
    probs = torch.tensor(
        [[0.3, 0.7, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0, 0.0], [0.0, 0.5, 0.0, 0.0, 0.5]]
    )
    loss = region_alignment_loss(probs, torch.tensor([0, 1, 2]), _mask())
    assert float(loss) == pytest.approx(0.0, abs=1e-6)


def test_region_alignment_half_mass() -> None:
    probs = torch.tensor([[0.25, 0.25, 0.25, 0.25, 0.0], [0.1, 0.1, 0.3, 0.2, 0.3]])
    # token 0 (region 0): mass 0.5; token 1 (region 1): mass 0.5.
    loss = region_alignment_loss(probs, torch.tensor([0, 1]), _mask())
    assert float(loss) == pytest.approx(-math.log(0.5), rel=1e-6)
    # Mean over tokens: one at mass 1, one at mass 0.5 -> log(2) / 2.
    probs2 = torch.tensor([[0.0, 1.0, 0.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25, 0.0]])
    loss2 = region_alignment_loss(probs2, torch.tensor([2, 0]), _mask())
    assert float(loss2) == pytest.approx(math.log(2.0) / 2, rel=1e-6)


def test_region_alignment_ignores_unknown_tokens() -> None:
    probs = torch.tensor(
        [
            [0.25, 0.25, 0.25, 0.25, 0.0],  # region 0, mass 0.5
            [0.0, 0.0, 0.0, 0.0, 1.0],  # unknown; would be mass 0 (huge loss) for r0/r1
            [0.0, 0.0, 0.0, 1.0, 0.0],  # unknown
        ]
    )
    loss = region_alignment_loss(probs, torch.tensor([0, -1, -1]), _mask())
    assert float(loss) == pytest.approx(-math.log(0.5), rel=1e-6)


def test_region_alignment_no_known_regions_is_zero() -> None:
    probs = torch.tensor([[0.0, 0.0, 0.0, 0.0, 1.0], [0.2, 0.2, 0.2, 0.2, 0.2]])
    assert float(region_alignment_loss(probs, None, _mask())) == 0.0
    assert float(region_alignment_loss(probs, torch.tensor([-1, -1]), _mask())) == 0.0


def test_region_alignment_zero_mass_is_finite() -> None:
    probs = torch.tensor([[0.0, 0.0, 0.0, 0.0, 1.0]])
    loss = region_alignment_loss(probs, torch.tensor([1]), _mask())
    assert torch.isfinite(loss)
    assert float(loss) > 80  # -log(tiny fp32) ~ 87.3


# ----------------------------------------------------------------------- empty inputs


@pytest.mark.parametrize("top_k", [1, 2])
def test_losses_on_empty_input_are_zero(top_k: int) -> None:
    probs = torch.zeros(0, 5)
    ids = torch.zeros(0, top_k, dtype=torch.long)
    for loss in (
        load_balancing_loss(probs, ids, 5),
        router_z_loss(torch.zeros(0, 5)),
        region_alignment_loss(probs, torch.zeros(0, dtype=torch.long), _mask()),
        region_alignment_loss(probs, None, _mask()),
    ):
        assert loss.shape == ()
        assert not torch.isnan(loss)
        assert float(loss) == 0.0


def test_router_on_empty_input_has_zero_losses() -> None:
    torch.manual_seed(0)
    router = TopKRouter(32, 5, 2, capacity_factor=1.25)
    out = router(torch.zeros(0, 32))
    assert out.expert_ids.shape == (0, 2)
    for name in ("balance", "z"):
        assert float(out.aux_losses[name]) == 0.0
    assert int(out.num_dropped) == 0
