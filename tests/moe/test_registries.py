"""Every registered router and expert backend, tested from the registries themselves (an entry
registered later is tested the same way), plus registering new ones."""

from __future__ import annotations

import pytest
import torch

from echomoe.moe import (
    EXPERT_BACKENDS,
    ROUTERS,
    ExpertBackend,
    MoELayer,
    Registry,
    RouterEntry,
    TopKRouter,
    build_moe_layer,
    causal_routers,
)

D, F, E, K, R = 12, 10, 5, 2, 7


def _regions(n: int) -> torch.Tensor:
    return torch.arange(n) % R


@pytest.mark.parametrize("router", list(ROUTERS))
def test_every_router_builds_a_layer_that_trains(router):
    torch.manual_seed(0)
    layer = build_moe_layer(D, F, E, K, router=router, num_regions=R)
    x = torch.randn(3, 7, D, requires_grad=True)  # 21 tokens: uneven per expert
    out = layer(x, _regions(3))
    assert out.hidden_states.shape == x.shape and out.hidden_states.dtype == x.dtype
    (out.hidden_states.pow(2).sum() + sum(out.aux_losses.values(), torch.tensor(0.0))).backward()
    assert x.grad.abs().sum() > 0
    assert layer.experts.gate_up_proj.grad.abs().sum() > 0
    entry = ROUTERS[router]
    assert isinstance(layer, MoELayer) != entry.layer
    if not entry.causal:
        with pytest.raises(ValueError, match="not causal"):
            build_moe_layer(D, F, E, K, router=router, causal=True)
    if not entry.bias_balancing:
        with pytest.raises(ValueError, match="bias_update_rate applies to"):
            build_moe_layer(D, F, E, K, router=router, bias_update_rate=0.01)


def _backends():
    for name in EXPERT_BACKENDS:
        marks = []
        if name == "megablocks" and not torch.cuda.is_available():
            marks = [pytest.mark.skip(reason="megablocks runs on CUDA only")]
        yield pytest.param(name, marks=marks)


@pytest.mark.parametrize("backend", list(_backends()))
def test_every_backend_computes_like_the_loop_reference(backend):
    torch.manual_seed(1)
    ref = build_moe_layer(D, F, E, K, backend="loop")
    layer = build_moe_layer(D, F, E, K, backend=backend)
    layer.load_state_dict(ref.state_dict())
    device = "cuda" if backend == "megablocks" else "cpu"
    ref, layer = ref.to(device), layer.to(device)
    x = torch.randn(2, 9, D, device=device)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    a, b = ref(x1).hidden_states, layer(x2).hidden_states
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    a.sum().backward()
    b.sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.experts.down_proj.grad, ref.experts.down_proj.grad,
                               atol=1e-5, rtol=1e-5)


def test_a_registered_backend_is_usable_and_checked_at_construction():
    calls = []

    def doubled(experts, x, expert_ids, weights):
        calls.append(x.shape)
        return 2 * EXPERT_BACKENDS["loop"].forward(experts, x, expert_ids, weights)

    def refuse():
        raise RuntimeError("no such device here")

    EXPERT_BACKENDS.register("doubled", ExpertBackend(doubled))
    EXPERT_BACKENDS.register("refusing", ExpertBackend(doubled, check=refuse))
    try:
        torch.manual_seed(2)
        ref = build_moe_layer(D, F, E, K, backend="loop")
        layer = build_moe_layer(D, F, E, K, backend="doubled")
        layer.load_state_dict(ref.state_dict())
        x = torch.randn(1, 5, D)
        torch.testing.assert_close(layer(x).hidden_states, 2 * ref(x).hidden_states)
        assert calls == [(5, D)]
        with pytest.raises(RuntimeError, match="no such device here"):
            build_moe_layer(D, F, E, K, backend="refusing")
        with pytest.raises(ValueError, match="'doubled' is already registered"):
            EXPERT_BACKENDS.register("doubled", ExpertBackend(doubled))
    finally:
        EXPERT_BACKENDS.unregister("doubled")
        EXPERT_BACKENDS.unregister("refusing")
    assert "doubled" not in EXPERT_BACKENDS
    with pytest.raises(ValueError, match=r"unknown backend 'doubled'; valid: grouped_mm, loop"):
        build_moe_layer(D, F, E, K, backend="doubled")


def test_a_registered_router_is_usable_by_name():
    ROUTERS.register("top1", RouterEntry(
        lambda spec, experts: TopKRouter(spec.hidden_size, spec.num_experts, 1,
                                         num_regions=spec.num_regions), causal=True),
        replace=True)
    try:
        layer = build_moe_layer(D, F, E, K, router="top1", causal=True)
        assert layer.router.top_k == 1
        assert "top1" in causal_routers()
    finally:
        ROUTERS.unregister("top1")
    with pytest.raises(ValueError, match=r"unknown router 'top1'; valid: topk, region_hard"):
        build_moe_layer(D, F, E, K, router="top1")


def test_registry_errors():
    reg = Registry("thing")
    with pytest.raises(ValueError, match="non-empty string"):
        reg.register("", 1)
    reg.register("a", 1)
    assert dict(reg) == {"a": 1} and len(reg) == 1 and "Registry('thing': a)" == repr(reg)
    with pytest.raises(ValueError, match="unknown thing 'b'; valid: a"):
        reg["b"]
