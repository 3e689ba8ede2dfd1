"""The few-token path (decoding steps) equals the loop reference, forward and backward."""

import pytest
import torch

import echomoe.moe.dispatch as dispatch
from echomoe.moe import GroupedExperts, build_moe_layer
from echomoe.moe.dispatch import FEW_TOKENS_MAX_ASSIGNMENTS, few_tokens_forward

ATOL = 1e-5
HIDDEN, WIDTH = 20, 12  # uneven, but multiples of 16 bytes in fp32 (the path's precondition)


@pytest.fixture
def calls(monkeypatch):
    """Count the calls that reach :func:`few_tokens_forward`."""
    seen = []

    def spy(*args, **kwargs):
        seen.append(args[1].shape)
        return few_tokens_forward(*args, **kwargs)

    monkeypatch.setattr(dispatch, "few_tokens_forward", spy)
    return seen


def _layers(router="topk", num_experts=5, top_k=2, **kwargs):
    torch.manual_seed(3)
    ref = build_moe_layer(HIDDEN, WIDTH, num_experts, top_k, router=router, backend="loop",
                          num_regions=3, **kwargs)
    for p in ref.parameters():
        torch.nn.init.normal_(p, std=0.3)
    fast = build_moe_layer(HIDDEN, WIDTH, num_experts, top_k, router=router, num_regions=3,
                           **kwargs)
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def _run(layer, x, region_ids=None, token_mask=None):
    x = x.clone().requires_grad_(True)
    out = layer(x, region_ids, token_mask)
    loss = (out.hidden_states * torch.cos(torch.arange(x.numel()).view_as(x))).sum()
    loss = loss + sum(out.aux_losses.values())
    loss.backward()
    grads = {n: p.grad for n, p in layer.named_parameters()}
    return out, x.grad, grads


def _assert_same(ref, fast):
    (out_a, gx_a, ga), (out_b, gx_b, gb) = ref, fast
    torch.testing.assert_close(out_b.hidden_states, out_a.hidden_states, atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(gx_b, gx_a, atol=ATOL, rtol=1e-4)
    assert torch.equal(out_b.routing.expert_ids, out_a.routing.expert_ids)
    for key in out_a.aux_losses:
        torch.testing.assert_close(out_b.aux_losses[key], out_a.aux_losses[key], msg=key)
    for name, grad in ga.items():
        expected = grad if grad is not None else torch.zeros_like(gb[name])
        got = gb[name] if gb[name] is not None else torch.zeros_like(expected)
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-4, msg=name)


@pytest.mark.parametrize("batch,tokens", [(1, 1), (3, 1), (2, 3), (7, 1)])
def test_topk_decoding_steps_match_loop(calls, batch, tokens):
    ref, fast = _layers()
    x = torch.randn(batch, tokens, HIDDEN)
    _assert_same(_run(ref, x), _run(fast, x))
    assert len(calls) == 1  # the grouped_mm layer took the few-token path


@pytest.mark.parametrize("router", ["region_hard", "region_soft"])
def test_region_routers_with_padding_mask_match_loop(calls, router):
    ref, fast = _layers(router)
    x = torch.randn(4, 2, HIDDEN)
    regions = torch.tensor([2, -1, 0, 2])
    mask = torch.tensor([[1, 1], [0, 1], [1, 0], [1, 1]])
    a, b = _run(ref, x, regions, mask), _run(fast, x, regions, mask)
    _assert_same(a, b)
    assert len(calls) == 1
    # Padding is routed (its output is computed) but left out of the aux losses.
    _, plain, _ = _run(fast, x[mask.bool()].view(1, -1, HIDDEN), regions[[0, 0, 0, 0, 0]][:1])
    assert torch.isfinite(plain).all()


def test_shared_expert_and_dual_path_match_loop(calls):
    for kwargs in ({"shared_expert_size": 8}, {"dense_branch_size": 16}):
        ref, fast = _layers(**kwargs)
        x = torch.randn(3, 1, HIDDEN)
        _assert_same(_run(ref, x), _run(fast, x))
    assert len(calls) == 2


@pytest.mark.parametrize("capacity_factor", [0.5, 0.01])
def test_capacity_drops_match_loop(calls, capacity_factor):
    """Dropped assignments (some, or all but a few) contribute nothing, as in the loop."""
    ref, fast = _layers(capacity_factor=capacity_factor, num_experts=3)
    x = torch.randn(5, 1, HIDDEN)
    a, b = _run(ref, x), _run(fast, x)
    assert b[0].routing.num_dropped > 0
    _assert_same(a, b)


def test_every_assignment_dropped_gives_zeros():
    experts = GroupedExperts(4, HIDDEN, WIDTH)
    x = torch.randn(3, HIDDEN, requires_grad=True)
    ids = torch.full((3, 2), -1)
    y = few_tokens_forward(x, ids, torch.zeros(3, 2), experts.w_in, experts.down_proj, "swiglu")
    assert torch.equal(y, torch.zeros(3, HIDDEN))
    y.sum().backward()  # no gradient reaches anything (None or zeros), and no error
    for grad in (x.grad, experts.gate_up_proj.grad, experts.down_proj.grad):
        assert grad is None or torch.count_nonzero(grad) == 0


@pytest.mark.parametrize("activation", ["geglu", "gelu", "relu"])
def test_other_activations_match_loop(activation):
    ref = GroupedExperts(6, HIDDEN, WIDTH, activation=activation, backend="loop")
    for p in ref.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(5, HIDDEN, requires_grad=True)
    ids = torch.tensor([[0, 5], [5, 2], [2, 0], [3, 5], [5, 0]])
    w = torch.rand(5, 2, requires_grad=True)
    expected = ref(x, ids, w)
    got = few_tokens_forward(x, ids, w, ref.w_in, ref.down_proj, activation)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-4)
    g = torch.randn_like(got)
    grads_ref = torch.autograd.grad(expected, (x, w, ref.w_in, ref.down_proj), g)
    grads = torch.autograd.grad(got, (x, w, ref.w_in, ref.down_proj), g)
    for a, b in zip(grads_ref, grads, strict=True):
        torch.testing.assert_close(b, a, atol=ATOL, rtol=1e-4)


def test_large_batches_biases_and_unaligned_sizes_take_the_general_path(calls):
    layer = build_moe_layer(HIDDEN, WIDTH, 4, 2)
    tokens = FEW_TOKENS_MAX_ASSIGNMENTS // 2 + 1
    layer(torch.randn(1, tokens, HIDDEN))
    assert calls == []
    layer(torch.randn(1, tokens - 1, HIDDEN))
    assert len(calls) == 1
    build_moe_layer(HIDDEN, 13, 4, 2)(torch.randn(1, 3, HIDDEN))  # 13 * 4 bytes: unaligned
    GroupedExperts(4, HIDDEN, WIDTH, activation="gelu", bias=True)(
        torch.randn(3, HIDDEN), torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 2))
    assert len(calls) == 1


def test_sorted_and_every_expert_variants_both_match_loop(monkeypatch):
    """Few assignments per expert: sorted grouped GEMMs; many: every expert on every token."""
    used = []
    every = dispatch._every_expert_forward
    monkeypatch.setattr(dispatch, "_every_expert_forward",
                        lambda *a: used.append(a[1].shape) or every(*a))
    ref, fast = _layers(num_experts=6, top_k=3)
    for tokens in (3, 4):  # 9 < 2 * 6 assignments: sorted; 12: every expert
        x = torch.randn(tokens, 1, HIDDEN)
        _assert_same(_run(ref, x), _run(fast, x))
    assert used == [(4, 3)]
    ids = torch.tensor([[0, -1], [2, 0], [-1, -1], [1, 2]])  # drops on the every-expert variant
    w = torch.rand(4, 2).masked_fill(ids < 0, 0.0)
    x = torch.randn(4, HIDDEN)
    torch.testing.assert_close(
        dispatch._every_expert_forward(x, ids, w, ref.experts.w_in[:3], ref.experts.down_proj[:3]),
        dispatch.grouped_experts_forward(x, ids, w, ref.experts.w_in[:3],
                                         ref.experts.down_proj[:3], None, None, "swiglu",
                                         linear=lambda *a: dispatch.grouped_linear(*a)),
        atol=ATOL, rtol=1e-4)
