"""The grouped_mm backend equals the loop reference, forward and backward, in every corner."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from echomoe.moe import GroupedExperts, build_moe_layer
from echomoe.moe.dispatch import grouped_linear, sort_assignments

ATOL = 1e-5


def _pair(num_experts, hidden, width, activation="swiglu", bias=False):
    ref = GroupedExperts(
        num_experts, hidden, width, activation=activation, backend="loop", bias=bias
    )
    for p in ref.parameters():
        torch.nn.init.normal_(p, std=0.3)
    fast = GroupedExperts(
        num_experts, hidden, width, activation=activation, backend="grouped_mm", bias=bias
    )
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def _fwd_bwd(experts, x, ids, w):
    x = x.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    y = experts(x, ids, w)
    y.backward(torch.cos(torch.arange(y.numel(), dtype=y.dtype)).view_as(y))
    grads = {n: p.grad for n, p in experts.named_parameters()}
    return y.detach(), x.grad, w.grad, grads


def _assert_same(a, b):
    ya, gxa, gwa, pa = a
    yb, gxb, gwb, pb = b
    torch.testing.assert_close(yb, ya, atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(gxb, gxa, atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(gwb, gwa, atol=ATOL, rtol=1e-4)
    for name in pa:
        ga = pa[name] if pa[name] is not None else torch.zeros_like(pb[name])
        torch.testing.assert_close(pb[name], ga, atol=ATOL, rtol=1e-4, msg=name)


@pytest.mark.parametrize(
    "activation,bias", [("swiglu", False), ("geglu", False), ("gelu", True), ("relu", False)]
)
def test_backends_agree_with_idle_experts(activation, bias):
    ref, fast = _pair(6, 20, 13, activation, bias)
    x = torch.randn(17, 20)
    ids = torch.randint(0, 3, (17, 2))  # experts 3, 4, 5 get no tokens
    ids[:, 1] = (ids[:, 0] + 1) % 3
    w = torch.rand(17, 2)
    a, b = _fwd_bwd(ref, x, ids, w), _fwd_bwd(fast, x, ids, w)
    _assert_same(a, b)
    assert torch.count_nonzero(b[3]["down_proj"][3:]) == 0  # idle experts: zero gradient


@pytest.mark.parametrize("chunk_bytes", [1, 600, 2**30])
def test_chunked_cpu_dispatch_matches_loop(monkeypatch, chunk_bytes):
    """Large CPU batches run expert-chunk by expert-chunk; the result must not change."""
    import echomoe.moe.dispatch as dispatch

    monkeypatch.setattr(dispatch, "_CPU_CHUNK_BYTES", chunk_bytes)
    offsets = torch.tensor([3, 3, 9, 14], dtype=torch.int32)
    chunks = list(dispatch._chunks(offsets, 80, torch.device("cpu")))
    rows = [(c.start, c.stop) for _, c in chunks]
    assert rows[0][0] == 0 and rows[-1][1] == 14  # chunks tile all rows
    assert all(a[1] == b[0] for a, b in zip(rows, rows[1:], strict=False))
    ref, fast = _pair(4, 20, 13)
    x = torch.randn(7, 20)
    ids = torch.tensor([[0, 2], [2, 3], [3, 0], [2, 0], [3, 2], [2, 3], [0, 3]])
    w = torch.rand(7, 2)
    _assert_same(_fwd_bwd(ref, x, ids, w), _fwd_bwd(fast, x, ids, w))


def test_dropped_assignments_contribute_nothing():
    ref, fast = _pair(4, 16, 8)
    x = torch.randn(9, 16)
    ids = torch.randint(0, 4, (9, 2))
    ids[::3, 1] = -1
    w = torch.rand(9, 2).masked_fill(ids < 0, 0.0)
    a, b = _fwd_bwd(ref, x, ids, w), _fwd_bwd(fast, x, ids, w)
    _assert_same(a, b)


def test_stride_zero_upstream_gradient():
    """`y.sum().backward()` hands grouped GEMM an expanded (stride-0) gradient."""
    _, fast = _pair(4, 16, 8)
    x = torch.randn(10, 16, requires_grad=True)
    fast(x, torch.randint(0, 4, (10, 2)), torch.rand(10, 2)).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("n_in,n_out,groups", [(16, 8, 1), (13, 7, 1), (13, 14, 2), (3, 5, 1)])
def test_grouped_linear_pads_unaligned_sizes(n_in, n_out, groups):
    weight = torch.randn(3, n_out, n_in, requires_grad=True)
    x = torch.randn(10, n_in, requires_grad=True)
    offsets = torch.tensor([4, 4, 10], dtype=torch.int32)
    y = grouped_linear(x, weight, offsets, out_groups=groups)
    expected = torch.cat([x[:4] @ weight[0].T, x[4:] @ weight[2].T])
    torch.testing.assert_close(y, expected)
    y.sum().backward()
    torch.testing.assert_close(x.grad[:4], weight[0].sum(0).expand(4, -1))
    assert torch.count_nonzero(weight.grad[1]) == 0


def test_sort_assignments_orders_by_expert():
    ids = torch.tensor([[2, 0], [1, 2], [-1, 0]])
    order, offsets = sort_assignments(ids, 3)
    flat = ids.reshape(-1)
    assert flat[order][:5].tolist() == [0, 0, 1, 2, 2]
    assert flat[order][-1].item() == -1
    assert order[:2].tolist() == [1, 5]  # stable: token order kept within an expert
    assert offsets.tolist() == [2, 3, 5]


@settings(max_examples=40, deadline=None)
@given(
    num_tokens=st.integers(0, 40),
    num_experts=st.integers(1, 7),
    data=st.data(),
    hidden=st.sampled_from([8, 12, 13]),
    width=st.sampled_from([4, 7, 16]),
    one_expert=st.booleans(),
)
def test_layer_properties(num_tokens, num_experts, data, hidden, width, one_expert):
    top_k = data.draw(st.integers(1, num_experts))
    torch.manual_seed(num_tokens * 31 + num_experts)
    layers = {
        b: build_moe_layer(hidden, width, num_experts, top_k, backend=b)
        for b in ("loop", "grouped_mm")
    }
    layers["grouped_mm"].load_state_dict(layers["loop"].state_dict())
    if one_expert:  # a router that sends every token to expert 0 first
        with torch.no_grad():
            for layer in layers.values():
                layer.router.weight.zero_()
                layer.router.weight[0] = 10.0
    x = torch.randn(1, num_tokens, hidden).abs() + 0.1
    outs = {b: layer(x) for b, layer in layers.items()}
    ref, fast = outs["loop"], outs["grouped_mm"]
    assert fast.hidden_states.shape == (1, num_tokens, hidden)
    assert torch.isfinite(fast.hidden_states).all()
    torch.testing.assert_close(fast.hidden_states, ref.hidden_states, atol=ATOL, rtol=1e-4)
    weights = fast.routing.weights
    assert weights.shape == (num_tokens, top_k)
    # Normalised top-k: each token's combine weights sum to 1.
    torch.testing.assert_close(weights.sum(-1), torch.ones(num_tokens), atol=1e-5, rtol=0)
    if one_expert and num_tokens:
        assert (fast.routing.expert_ids[:, 0] == 0).all()
    for value in fast.aux_losses.values():
        assert math.isfinite(float(value.detach()))


def test_empty_batch_backward():
    layer = build_moe_layer(16, 8, 4, 2)
    x = torch.randn(2, 0, 16, requires_grad=True)
    out = layer(x)
    out.hidden_states.sum().backward()
    assert out.hidden_states.shape == (2, 0, 16)


def test_megablocks_without_cuda_names_grouped_mm():
    if torch.cuda.is_available():
        pytest.skip("this check is for machines without a GPU")
    with pytest.raises(RuntimeError, match="grouped_mm"):
        build_moe_layer(16, 8, 4, 2, backend="megablocks")
