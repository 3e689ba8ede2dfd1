"""Tests for the token-choice and expert-choice routers and the builder's validation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from echomoe.moe import (
    BACKENDS,
    ROUTERS,
    ExpertChoiceRouter,
    RegionHardRouter,
    RegionSoftRouter,
    SoftMoE,
    TopKRouter,
    build_moe_layer,
    region_alignment_loss,
)
from echomoe.moe.experts import GroupedExperts

HIDDEN = 32
WIDTH = 37
EXPERTS = 5
N_TOKENS = 13


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- TopKRouter


@pytest.mark.parametrize("top_k", [1, 2, 3, 5])
def test_topk_normalized_weights_sum_to_one(top_k: int) -> None:
    torch.manual_seed(0)
    router = TopKRouter(HIDDEN, EXPERTS, top_k, normalize=True)
    out = router(_randn(N_TOKENS, HIDDEN, seed=1))
    assert out.weights.shape == (N_TOKENS, top_k)
    assert out.expert_ids.shape == (N_TOKENS, top_k)
    assert out.expert_ids.dtype == torch.int64
    torch.testing.assert_close(out.weights.sum(-1), torch.ones(N_TOKENS), rtol=0, atol=1e-6)
    # Normalised weights are the top-k probs divided by their sum.
    top = out.probs.gather(1, out.expert_ids)
    torch.testing.assert_close(out.weights, top / top.sum(-1, keepdim=True))
    assert out.num_dropped is None
    assert set(out.aux_losses) == {"balance", "z"}


@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_topk_unnormalized_weights_are_raw_probs(top_k: int) -> None:
    torch.manual_seed(0)
    router = TopKRouter(HIDDEN, EXPERTS, top_k, normalize=False)
    x = _randn(N_TOKENS, HIDDEN, seed=2) * 20  # spread the probabilities out
    out = router(x)
    probs = F.linear(x, router.weight).float().softmax(-1)
    torch.testing.assert_close(out.probs, probs)
    expected_w, expected_ids = probs.topk(top_k, dim=-1)
    torch.testing.assert_close(out.weights, out.probs.gather(1, out.expert_ids), rtol=0, atol=0)
    torch.testing.assert_close(out.weights, expected_w)
    assert torch.equal(out.expert_ids, expected_ids)
    if top_k < EXPERTS:
        # Raw probabilities of a strict subset of experts sum to less than 1.
        assert bool((out.weights.sum(-1) < 1 - 1e-4).all())


def test_topk_expert_ids_are_argmax_topk_of_probs() -> None:
    torch.manual_seed(3)
    router = TopKRouter(HIDDEN, EXPERTS, 2)
    out = router(_randn(N_TOKENS, HIDDEN, seed=4) * 10)
    # Slot 0 is the argmax; slot 1 the argmax once slot 0 is removed.
    assert torch.equal(out.expert_ids[:, 0], out.probs.argmax(-1))
    masked = out.probs.scatter(1, out.expert_ids[:, :1], -1.0)
    assert torch.equal(out.expert_ids[:, 1], masked.argmax(-1))
    # Every chosen prob >= every unchosen prob.
    chosen = out.probs.gather(1, out.expert_ids)
    unchosen = out.probs.scatter(1, out.expert_ids, -1.0)
    assert bool((chosen.min(-1).values >= unchosen.max(-1).values).all())


@pytest.mark.parametrize("top_k", [0, EXPERTS + 1, 11])
def test_topk_bad_top_k_raises(top_k: int) -> None:
    with pytest.raises(ValueError, match="top_k"):
        TopKRouter(HIDDEN, EXPERTS, top_k)


def _one_expert_router(top_k: int, capacity_factor: float) -> TopKRouter:
    """A router whose weight sends every token with positive features to expert 2 first,
    expert 4 second, expert 0 third (logits 10*s, 5*s, 2*s, others 0 with s > 0)."""
    router = TopKRouter(HIDDEN, EXPERTS, top_k, capacity_factor=capacity_factor)
    with torch.no_grad():
        router.weight.zero_()
        router.weight[2] = 10.0
        router.weight[4] = 5.0
        router.weight[0] = 2.0
    return router


@pytest.mark.parametrize(
    ("top_k", "capacity_factor"), [(1, 1.0), (2, 1.0), (2, 1.5), (3, 0.5), (1, 0.01)]
)
def test_topk_capacity_factor_drops(top_k: int, capacity_factor: float) -> None:
    router = _one_expert_router(top_k, capacity_factor)
    x = _randn(N_TOKENS, HIDDEN, seed=5).abs() / HIDDEN + 0.01
    out = router(x)
    capacity = math.ceil(capacity_factor * N_TOKENS * top_k / EXPERTS)
    kept = out.expert_ids[out.expert_ids >= 0]
    per_expert = torch.bincount(kept, minlength=EXPERTS)
    assert int(per_expert.max()) <= capacity
    # Each token's slot j would go to [2, 4, 0][j]; exactly the first `capacity` tokens keep it.
    preferred = [2, 4, 0][:top_k]
    for slot, expert in enumerate(preferred):
        n_keep = min(capacity, N_TOKENS)
        assert int(per_expert[expert]) == n_keep
        assert (out.expert_ids[:n_keep, slot] == expert).all()
        assert (out.expert_ids[n_keep:, slot] == -1).all()
    dropped = out.expert_ids == -1
    assert bool((out.weights[dropped] == 0).all())
    assert bool((out.weights[~dropped] > 0).all())
    assert int(out.num_dropped) == int(dropped.sum())
    assert int(out.num_dropped) == top_k * max(N_TOKENS - capacity, 0)
    # Kept weights are unchanged by the drop (still the renormalised top-k weights).
    top = out.probs.gather(1, out.expert_ids.clamp_min(0))
    full = top / top.sum(-1, keepdim=True)
    torch.testing.assert_close(out.weights[~dropped], full[~dropped])


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 20),
    top_k=st.integers(1, EXPERTS),
    capacity_factor=st.floats(0.05, 3.0),
    seed=st.integers(0, 2**16),
)
def test_topk_capacity_bound_property(
    n: int, top_k: int, capacity_factor: float, seed: int
) -> None:
    torch.manual_seed(seed)
    router = TopKRouter(HIDDEN, EXPERTS, top_k, capacity_factor=capacity_factor)
    out = router(_randn(n, HIDDEN, seed=seed) * 30)
    capacity = math.ceil(capacity_factor * n * top_k / EXPERTS)
    kept = out.expert_ids[out.expert_ids >= 0]
    assert int(torch.bincount(kept, minlength=EXPERTS).max()) <= capacity
    assert int(out.num_dropped) == int((out.expert_ids == -1).sum())
    assert bool((out.weights[out.expert_ids == -1] == 0).all())


# ----------------------------------------------------------------------- RegionHardRouter


@st.composite
def _region_cases(draw):
    num_experts = draw(st.integers(1, 7))
    top_k = draw(st.integers(1, num_experts))
    num_regions = draw(st.integers(1, 5))
    region_experts = [
        draw(
            st.lists(
                st.integers(0, num_experts - 1), min_size=top_k, max_size=num_experts, unique=True
            )
        )
        for _ in range(num_regions)
    ]
    n = draw(st.integers(1, 16))
    region_ids = draw(st.lists(st.integers(-1, num_regions - 1), min_size=n, max_size=n))
    seed = draw(st.integers(0, 2**16))
    # Up to logit gaps far beyond fp32 softmax underflow (~100).
    scale = draw(st.sampled_from([0.01, 1.0, 10.0, 30.0, 1000.0]))
    return num_experts, top_k, num_regions, region_experts, region_ids, seed, scale


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=_region_cases())
def test_region_hard_stays_inside_region(case) -> None:
    num_experts, top_k, num_regions, region_experts, region_ids, seed, scale = case
    torch.manual_seed(seed)
    router = RegionHardRouter(
        HIDDEN, num_experts, top_k, num_regions=num_regions, region_experts=region_experts
    )
    n = len(region_ids)
    x = _randn(n, HIDDEN, seed=seed + 1) * scale
    regions = torch.tensor(region_ids, dtype=torch.long)
    out = router(x, regions)
    base = torch.mm(router.weight, x.t()).float().t()  # the router's own product, bit for bit
    for t in range(n):
        r = region_ids[t]
        chosen = out.expert_ids[t].tolist()
        assert len(set(chosen)) == top_k
        if r >= 0:
            allowed = set(region_experts[r])
            assert set(chosen) <= allowed, (t, r, chosen, allowed)
            outside = [e for e in range(num_experts) if e not in allowed]
            assert bool((out.probs[t, outside] == 0).all())
            assert bool(torch.isinf(out.logits[t, outside]).all())
            # The top-k of the region's own experts, by logit.
            inside = sorted(allowed)
            best = base[t, inside].topk(top_k).indices
            assert set(chosen) == {inside[i] for i in best.tolist()}
        else:
            # Unknown region: plain top-k over all experts.
            torch.testing.assert_close(out.logits[t], base[t], rtol=0, atol=0)
            assert set(chosen) == set(base[t].topk(top_k).indices.tolist())
    torch.testing.assert_close(out.weights.sum(-1), torch.ones(n), rtol=0, atol=1e-5)
    assert torch.isfinite(out.aux_losses["z"])
    assert torch.isfinite(out.aux_losses["balance"])


def test_region_hard_never_leaves_region_with_large_logit_gaps() -> None:
    router = RegionHardRouter(4, EXPERTS, 2, num_regions=2, region_experts=[[0, 1], [2, 3, 4]])
    with torch.no_grad():
        router.weight.zero_()
        router.weight[0, 0] = 1.0
        router.weight[1, 0] = -1.0
    # Logits of region 0's experts: +200 and -200; exp(-400) underflows to 0 in fp32.
    out = router(torch.tensor([[200.0, 0.0, 0.0, 0.0]]), torch.tensor([0]))
    assert set(out.expert_ids[0].tolist()) == {0, 1}


def test_region_hard_without_region_ids_is_topk() -> None:
    torch.manual_seed(0)
    hard = RegionHardRouter(HIDDEN, EXPERTS, 2, num_regions=3)
    plain = TopKRouter(HIDDEN, EXPERTS, 2, num_regions=3)
    plain.load_state_dict({"weight": hard.weight.detach()})
    x = _randn(N_TOKENS, HIDDEN, seed=7)
    a, b = hard(x), plain(x)
    assert torch.equal(a.expert_ids, b.expert_ids)
    torch.testing.assert_close(a.weights, b.weights)


@pytest.mark.parametrize("cls", [RegionHardRouter, RegionSoftRouter])
def test_region_router_default_region_experts(cls) -> None:
    # 7 regions, 5 experts, k=2 -> groups of max(2, 5 // 7) = 2 consecutive experts, wrapping.
    router = cls(HIDDEN, EXPERTS, 2, num_regions=7)
    expected = torch.zeros(7, EXPERTS, dtype=torch.bool)
    for r in range(7):
        expected[r, [(2 * r) % EXPERTS, (2 * r + 1) % EXPERTS]] = True
    assert torch.equal(router.region_mask, expected)


@pytest.mark.parametrize(
    ("region_experts", "match"),
    [
        ([[0, 1], [2, 5], [3, 4]], r"region_experts\[1\].*\[5\].*outside \[0, 5\)"),
        ([[0, 1], [-1, 2], [3, 4]], r"region_experts\[1\].*\[-1\].*outside"),
        ([[0, 1], [2], [3, 4]], r"region_experts\[1\] has 1 distinct.*top_k=2"),
        ([[0, 1], [2, 2], [3, 4]], r"region_experts\[1\] has 1 distinct.*top_k=2"),
        ([[0, 1], [2, 3]], r"lists 2 regions, num_regions=3"),
        ([[0, 1], [2, 3], [3, 4], [0, 4]], r"lists 4 regions, num_regions=3"),
    ],
)
@pytest.mark.parametrize("cls", [RegionHardRouter, RegionSoftRouter])
def test_region_router_bad_region_experts_raise(cls, region_experts, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        cls(HIDDEN, EXPERTS, 2, num_regions=3, region_experts=region_experts)


def test_build_moe_layer_passes_region_experts_through() -> None:
    with pytest.raises(ValueError, match="outside"):
        build_moe_layer(
            HIDDEN,
            WIDTH,
            EXPERTS,
            2,
            router="region_hard",
            num_regions=2,
            region_experts=[[0, 1], [3, 9]],
        )


# ----------------------------------------------------------------------- RegionSoftRouter


def test_region_soft_bias_only_for_known_regions() -> None:
    torch.manual_seed(0)
    router = RegionSoftRouter(HIDDEN, EXPERTS, 2, num_regions=4)
    assert torch.equal(router.region_bias, torch.zeros(4, EXPERTS))  # starts at zero
    with torch.no_grad():
        router.region_bias[2, 3] = 50.0
        router.region_bias[0] = torch.tensor([7.0, -3.0, 0.5, 0.0, 2.0])  # region -1 clamps to 0
    x = _randn(12, HIDDEN, seed=8)
    regions = torch.tensor([2, -1, 0, 2, 1, -1, 3, 2, -1, 0, 1, 2])
    out = router(x, regions)
    base = F.linear(x, router.weight).float()
    bias = router.region_bias.detach()
    for t, r in enumerate(regions.tolist()):
        expected = base[t] + bias[r] if r >= 0 else base[t]
        torch.testing.assert_close(out.logits[t], expected)
    is2 = regions == 2
    assert bool((out.expert_ids[is2, 0] == 3).all())
    # Unknown-region tokens route exactly as without any region information.
    unknown = regions == -1
    ref = router(x)  # no region ids at all
    torch.testing.assert_close(out.logits[unknown], ref.logits[unknown], rtol=0, atol=0)
    assert torch.equal(out.expert_ids[unknown], ref.expert_ids[unknown])
    # Region 1 and 3 have zero bias: unchanged too.
    for r in (1, 3):
        sel = regions == r
        torch.testing.assert_close(out.logits[sel], ref.logits[sel], rtol=0, atol=0)
    # And unknown tokens are not sent to expert 3 just because region 2 is.
    assert not bool((out.expert_ids[unknown, 0] == 3).all())


def test_region_soft_region_loss() -> None:
    torch.manual_seed(1)
    router = RegionSoftRouter(
        HIDDEN, EXPERTS, 2, num_regions=3, region_experts=[[0, 1], [1, 2, 3], [4, 0]]
    )
    with torch.no_grad():
        router.region_bias.normal_(std=2.0)
    regions = torch.tensor([0, 1, 2, -1, 2, 1, 0, -1, 1])
    out = router(_randn(9, HIDDEN, seed=9) * 5, regions)
    assert set(out.aux_losses) == {"balance", "z", "region"}
    expected = region_alignment_loss(out.probs, regions, router.region_mask)
    torch.testing.assert_close(out.aux_losses["region"], expected, rtol=0, atol=0)
    # Independent recomputation: -mean log(mass on own experts) over known tokens.
    mask = torch.tensor([[1, 1, 0, 0, 0], [0, 1, 1, 1, 0], [1, 0, 0, 0, 1]], dtype=torch.float32)
    known = regions >= 0
    mass = (out.probs[known] * mask[regions[known]]).sum(-1)
    torch.testing.assert_close(out.aux_losses["region"], -mass.log().mean())
    assert float(out.aux_losses["region"].detach()) > 0
    # Without region ids the loss is 0.
    assert float(router(_randn(9, HIDDEN, seed=9)).aux_losses["region"].detach()) == 0.0


def test_region_soft_loss_gradient_reaches_bias() -> None:
    torch.manual_seed(2)
    router = RegionSoftRouter(HIDDEN, EXPERTS, 2, num_regions=3)
    out = router(_randn(6, HIDDEN, seed=10), torch.tensor([0, 1, 2, -1, 0, 1]))
    out.aux_losses["region"].backward()
    grad = router.region_bias.grad
    assert grad is not None
    assert bool((grad.abs().sum(-1) > 0).all())  # every region with tokens got a gradient


# --------------------------------------------------------------------- ExpertChoiceRouter


@pytest.mark.parametrize(
    ("n", "capacity_factor"), [(13, 2.0), (13, 1.0), (13, 0.3), (7, 1.7), (4, 10.0), (1, 2.0)]
)
def test_expert_choice_capacity(n: int, capacity_factor: float) -> None:
    torch.manual_seed(0)
    router = ExpertChoiceRouter(HIDDEN, EXPERTS, capacity_factor=capacity_factor)
    out = router(_randn(n, HIDDEN, seed=11))
    capacity = min(n, math.ceil(capacity_factor * n / EXPERTS))
    assert router.capacity(n) == capacity
    assert out.token_ids.shape == (EXPERTS, capacity)
    assert out.weights.shape == (EXPERTS, capacity)
    assert out.token_ids.dtype == torch.int64
    for e in range(EXPERTS):
        ids = out.token_ids[e].tolist()
        assert len(set(ids)) == capacity  # distinct tokens
        assert all(0 <= t < n for t in ids)
        # Expert e picked its `capacity` highest-prob tokens, with those probs as weights.
        torch.testing.assert_close(out.weights[e], out.probs[ids, e])
        top = out.probs[:, e].topk(capacity).values
        torch.testing.assert_close(out.weights[e], top)
    torch.testing.assert_close(out.probs.sum(-1), torch.ones(n))
    assert set(out.aux_losses) == {"z"}


def test_expert_choice_causal_raises() -> None:
    with pytest.raises(ValueError, match="causal"):
        ExpertChoiceRouter(HIDDEN, EXPERTS, causal=True)


@pytest.mark.parametrize("router", ["expert_choice", "soft"])
def test_build_non_causal_router_with_causal_raises(router: str) -> None:
    with pytest.raises(ValueError, match="causal") as err:
        build_moe_layer(HIDDEN, WIDTH, EXPERTS, 2, router=router, causal=True)
    assert router in str(err.value)


def test_soft_moe_causal_raises() -> None:
    experts = GroupedExperts(EXPERTS, HIDDEN, WIDTH)
    with pytest.raises(ValueError, match="causal"):
        SoftMoE(experts=experts, causal=True)


@pytest.mark.parametrize("router", ["topk", "region_hard", "region_soft"])
def test_build_causal_token_choice_router_ok(router: str) -> None:
    torch.manual_seed(0)
    layer = build_moe_layer(HIDDEN, WIDTH, EXPERTS, 2, router=router, causal=True)
    out = layer(_randn(2, 3, HIDDEN, seed=12), torch.tensor([1, -1]))
    assert out.hidden_states.shape == (2, 3, HIDDEN)
    assert out.routing.expert_ids.shape == (6, 2)


# --------------------------------------------------------------------- builder validation


def test_build_unknown_router_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="bogus") as err:
        build_moe_layer(HIDDEN, WIDTH, EXPERTS, 2, router="bogus")
    for name in ROUTERS:
        assert name in str(err.value)


def test_build_unknown_backend_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="nope") as err:
        build_moe_layer(HIDDEN, WIDTH, EXPERTS, 2, backend="nope")
    for name in BACKENDS:
        assert name in str(err.value)


@pytest.mark.parametrize("router", ["topk", "region_hard", "expert_choice"])
def test_moe_layer_wrong_hidden_size(router: str) -> None:
    layer = build_moe_layer(HIDDEN, WIDTH, EXPERTS, 2, router=router)
    with pytest.raises(ValueError) as err:
        layer(torch.zeros(2, 3, HIDDEN - 1))
    msg = str(err.value)
    assert str(HIDDEN) in msg
    assert "(2, 3, 31)" in msg
    with pytest.raises(ValueError, match=str(HIDDEN)):
        layer(torch.zeros(6, HIDDEN))  # 2-D input is refused too


@pytest.mark.parametrize("router", ["topk", "region_hard", "region_soft", "expert_choice", "soft"])
@pytest.mark.parametrize("bad", [7, -2, 100])
def test_region_id_out_of_range(router: str, bad: int) -> None:
    layer = build_moe_layer(HIDDEN, WIDTH, EXPERTS, 2, router=router, num_regions=7)
    x = _randn(3, 2, HIDDEN, seed=13)
    with pytest.raises(ValueError, match="out of range") as err:
        layer(x, torch.tensor([0, bad, -1]))
    assert str(bad) in str(err.value)
    # Boundary values are accepted.
    out = layer(x, torch.tensor([0, 6, -1]))
    assert out.hidden_states.shape == x.shape


@pytest.mark.parametrize("router", ["topk", "region_hard", "region_soft", "expert_choice"])
def test_aux_losses_off_routes_identically_and_returns_none(router: str) -> None:
    layer = build_moe_layer(HIDDEN, WIDTH, 4, 2, router=router, causal=router != "expert_choice")
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = _randn(3, 7, HIDDEN)
    regions = torch.tensor([0, 5, -1])
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1, 4:] = False
    on = layer(x, regions, mask)
    off = layer(x, regions, mask, aux_losses=False)
    assert set(on.aux_losses) >= {"z"} and off.aux_losses == {}
    torch.testing.assert_close(off.hidden_states, on.hidden_states, rtol=0, atol=0)
    assert torch.equal(off.routing.expert_ids, on.routing.expert_ids)
    with pytest.raises(ValueError, match="token_mask must have shape"):
        layer(x, regions, mask[:, :3], aux_losses=False)  # still validated


@pytest.mark.parametrize("router", [
    TopKRouter(12, 4, top_k=2, num_regions=3),
    RegionHardRouter(12, 6, top_k=2, num_regions=3),
    RegionSoftRouter(12, 6, top_k=2, num_regions=3),
    ExpertChoiceRouter(12, 4, num_regions=3),
], ids=lambda r: type(r).__name__)
def test_routers_called_directly_validate_region_ids(router):
    x = torch.randn(5, 12)
    router(x, torch.tensor([0, 2, -1, 1, 0]))  # valid ids, -1 = unknown
    name = type(router).__name__
    # -2 used to wrap to the last region's experts, 3 to the "unknown" row
    for bad in (3, -2):
        with pytest.raises(ValueError, match=f"{name}: region id {bad} out of range"):
            router(x, torch.tensor([0, bad, 0, 0, 0]))
    with pytest.raises(TypeError, match=f"{name}: region_ids must be an integer"):
        router(x, torch.zeros(5))
    shape = rf"{name}: region_ids must have shape \(tokens,\) = \(5,\), got \(2,\)"
    with pytest.raises(ValueError, match=shape):
        router(x, torch.tensor([0, 1]))
