"""MoELayer composition: dense twin, shared expert, dual path, parameter accounting, context."""

import pytest
import torch

from echomoe.moe import (
    DenseFFN,
    GatedMLP,
    MoEOutput,
    RoutingContext,
    build_dense_ffn,
    build_moe_layer,
    count_parameters,
    equal_active_expert_size,
)


def test_dense_and_moe_return_the_same_type():
    dense = build_dense_ffn(32, 74)
    moe = build_moe_layer(32, 37, 4, 2)
    x = torch.randn(2, 5, 32)
    for layer in (dense, moe):
        out = layer(x, torch.tensor([0, 1]))
        assert isinstance(out, MoEOutput) and out.hidden_states.shape == x.shape
    assert dense(x).aux_losses == {} and dense(x).routing is None
    assert set(moe(x).aux_losses) == {"balance", "z"}


def test_dual_path_is_a_per_token_softmax_mix():
    layer = build_moe_layer(16, 8, 3, 1, dense_branch_size=12)
    x = torch.randn(1, 4, 16)
    out = layer(x).hidden_states
    flat = x.reshape(-1, 16)
    routed = layer.router(flat)
    moe_only = layer.experts(flat, routed.expert_ids, routed.weights)
    mix = torch.softmax(flat @ layer.path_mixer.weight.T, dim=-1)
    expected = mix[:, :1] * layer.dense_branch(flat) + mix[:, 1:] * moe_only
    torch.testing.assert_close(out.reshape(-1, 16), expected)


def test_shared_expert_is_sigmoid_gated():
    layer = build_moe_layer(16, 8, 3, 2, shared_expert_size=10)
    with torch.no_grad():
        layer.shared_expert.gate.weight.fill_(-1e4)  # gate -> 0: only routed experts remain
    x = torch.randn(1, 3, 16).abs()
    flat = x.reshape(-1, 16)
    routed = layer.router(flat)
    torch.testing.assert_close(
        layer(x).hidden_states.reshape(-1, 16),
        layer.experts(flat, routed.expert_ids, routed.weights),
    )


def test_equal_active_parameters():
    hidden, dense_width, k = 32, 96, 2
    dense = build_dense_ffn(hidden, dense_width)
    width = equal_active_expert_size(dense_width, k)
    assert width == 48
    moe = build_moe_layer(hidden, width, 8, k)
    d, m = count_parameters(dense), count_parameters(moe)
    assert m["active"] - m["router"] == d["active"]
    assert m["total"] == 8 * 3 * hidden * width + 8 * hidden
    shared = equal_active_expert_size(dense_width, k, shared_expert_size=32)
    moe_shared = build_moe_layer(hidden, shared, 8, k, shared_expert_size=32)
    c = count_parameters(moe_shared)
    assert c["active"] - c["router"] == d["active"]
    with pytest.raises(ValueError, match="multiple"):
        equal_active_expert_size(97, 2)


def test_layer_validates_its_parts():
    with pytest.raises(ValueError, match="experts"):
        from echomoe.moe import GroupedExperts, MoELayer, TopKRouter

        MoELayer(router=TopKRouter(16, 4, 2), experts=GroupedExperts(5, 16, 8))
    layer = build_moe_layer(16, 8, 4, 2)
    with pytest.raises(TypeError, match="integer"):
        layer(torch.randn(2, 3, 16), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="shape"):
        layer(torch.randn(2, 3, 16), torch.tensor([0, 1, 2]))


def test_routing_context_reduces_over_layers():
    ctx = RoutingContext()
    layers = [build_moe_layer(16, 8, 4, 2) for _ in range(2)]
    x = torch.randn(1, 3, 16)
    with ctx.route(torch.tensor([1])):
        for i, layer in enumerate(layers):
            ctx.record(f"l{i}", layer(x, ctx.region_ids_for(1)))
    per_layer = [r.aux_losses["balance"] for r in ctx.records.values()]
    torch.testing.assert_close(ctx.aux_losses()["balance"], torch.stack(per_layer).mean())
    torch.testing.assert_close(ctx.aux_losses("sum")["z"],
                               sum(r.aux_losses["z"] for r in ctx.records.values()))
    assert ctx.region_ids is None  # restored after the block
    with pytest.raises(ValueError, match="reduce"):
        ctx.aux_losses("max")
    ctx.region_ids = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="region ids"):
        ctx.region_ids_for(3)


def test_dense_ffn_wraps_any_mlp():
    mlp = GatedMLP(8, 5)
    x = torch.randn(2, 3, 8)
    torch.testing.assert_close(DenseFFN(mlp)(x).hidden_states, mlp(x))


def test_router_jitter_only_in_training():
    layer = build_moe_layer(16, 8, 4, 2, jitter=0.5)
    x = torch.randn(1, 20, 16)
    layer.train()
    a, b = layer.router(x[0]).logits, layer.router(x[0]).logits
    assert not torch.allclose(a, b)
    layer.eval()
    torch.testing.assert_close(layer.router(x[0]).logits, layer.router(x[0]).logits)


@pytest.mark.parametrize("router", ["topk", "region_soft", "region_hard", "expert_choice"])
@pytest.mark.parametrize("aux_losses", [True, False])
def test_padding_goes_to_no_expert_and_is_left_out_of_aux_losses(router, aux_losses):
    layer = build_moe_layer(16, 8, 4, 2, router=router, num_regions=3)
    x = torch.randn(2, 5, 16)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    regions = torch.tensor([2, 0])
    masked = layer(x, regions, token_mask=mask, aux_losses=aux_losses)
    padding = ~mask.bool().reshape(-1)
    if aux_losses:
        valid = x[mask.bool()].unsqueeze(0)  # the 8 real tokens as one sequence
        valid_regions = torch.tensor([2] * 3 + [0] * 5)
        routed = layer.router(valid[0], valid_regions)
        assert set(masked.aux_losses) == set(routed.aux_losses)
        for name, value in masked.aux_losses.items():
            torch.testing.assert_close(value, routed.aux_losses[name], msg=name)
    else:
        assert masked.aux_losses == {}
    # padding reaches no expert: zero output, no assignment, not counted as dropped
    assert torch.count_nonzero(masked.hidden_states.reshape(10, 16)[padding]) == 0
    assert (masked.routing.expert_ids[padding] < 0).all()
    assert not masked.routing.weights[padding].any()
    plain = layer(x, regions)
    if router != "expert_choice":  # expert choice mixes tokens, so only check token choice
        assert masked.routing.num_dropped == 0
        torch.testing.assert_close(masked.hidden_states.reshape(10, 16)[~padding],
                                   plain.hidden_states.reshape(10, 16)[~padding])
        assert torch.equal(masked.routing.expert_ids[~padding], plain.routing.expert_ids[~padding])
    with pytest.raises(ValueError, match="token_mask"):
        layer(x, regions, token_mask=torch.ones(2, 4))


def test_padding_takes_no_capacity():
    """Capacity counts real tokens only, and padding never displaces a real token."""
    layer = build_moe_layer(8, 4, 4, 1, capacity_factor=1.0)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, 0] = 10.0  # every token with x[0] > 0 prefers expert 0
    x = torch.randn(1, 12, 8)
    x[..., 0] = 1.0
    mask = torch.zeros(1, 12, dtype=torch.bool)
    mask[0, 4:] = True  # 4 padding tokens first, then 8 real ones
    out = layer(x, token_mask=mask)
    ids = out.routing.expert_ids[:, 0]
    # capacity = ceil(1.0 * 8 real tokens * k=1 / 4 experts) = 2: the first two real tokens
    assert ids.tolist() == [-1] * 4 + [0, 0] + [-1] * 6
    assert out.routing.num_dropped == 6  # the 4 padding tokens are not drops
    unmasked = layer(x)  # capacity 3 of 12, taken by the first three (here: padding) tokens
    assert unmasked.routing.expert_ids[:, 0].tolist() == [0] * 3 + [-1] * 9
    assert unmasked.routing.num_dropped == 9


def test_expert_choice_picks_padding_last_with_zero_weight():
    layer = build_moe_layer(8, 4, 2, 1, router="expert_choice", capacity_factor=2.0)
    x = torch.randn(1, 6, 8)
    mask = torch.tensor([[1, 1, 0, 1, 0, 0]]).bool()
    routed = layer.router(x[0], token_mask=mask[0])
    capacity = layer.router.capacity(6)  # min(6, ceil(2 * 6 / 2)) = 6: every token fits
    assert routed.token_ids.shape == (2, capacity)
    for e in range(2):
        real_first = mask[0][routed.token_ids[e]]
        assert real_first[:3].all() and not real_first[3:].any()  # 3 real tokens, then padding
        assert not routed.weights[e][~real_first].any()
    out = layer(x, token_mask=mask)
    padding = ~mask[0]
    assert (out.routing.expert_ids[padding] < 0).all()
    assert out.routing.num_dropped == 0  # every real token was picked; padding is not a drop
    assert torch.count_nonzero(out.hidden_states[0, padding]) == 0


def test_routing_context_slices_the_attention_mask_for_cached_steps():
    ctx = RoutingContext()
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    with ctx.route(None, token_mask=mask):
        assert torch.equal(ctx.token_mask_for(2, 4), mask)
        assert torch.equal(ctx.token_mask_for(2, 1), mask[:, -1:])
        assert ctx.token_mask_for(4, 1).shape == (4, 1)  # beams: rows repeated per sample
        with pytest.raises(ValueError, match="positions"):
            ctx.token_mask_for(2, 5)
    assert ctx.token_mask is None
