"""Upcycling dense FFNs and converting whole HF causal LMs with `moefy`."""

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from echomoe.moe import GatedMLP, MoEAdapter, MoELayer, moefy, upcycle_ffn
from echomoe.moe.upcycle import describe_mlp, select_layers


def tiny_qwen2(layers=3):
    cfg = Qwen2Config(
        vocab_size=99, hidden_size=32, intermediate_size=36, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    return Qwen2ForCausalLM(cfg).eval()


def test_upcycled_gated_mlp_equals_dense_per_expert():
    dense = GatedMLP(24, 20)
    experts = upcycle_ffn(dense, 3)
    x = torch.randn(5, 24)
    for e in range(3):
        torch.testing.assert_close(experts.expert(e, x), dense(x))


@pytest.mark.parametrize(
    "mlp",
    [
        torch.nn.Sequential(torch.nn.Linear(12, 20), torch.nn.GELU(), torch.nn.Linear(20, 12)),
        torch.nn.Sequential(torch.nn.Linear(12, 20), torch.nn.ReLU(), torch.nn.Dropout(0.0),
                            torch.nn.Linear(20, 12)),
    ],
)
def test_upcycled_plain_mlp_keeps_biases(mlp):
    experts = upcycle_ffn(mlp, 2)
    assert experts.activation in ("gelu", "relu") and experts.in_bias is not None
    x = torch.randn(4, 12)
    torch.testing.assert_close(experts.expert(1, x), mlp(x))


def test_upcycle_noise_makes_experts_differ():
    dense = GatedMLP(16, 8)
    gen = torch.Generator().manual_seed(0)
    experts = upcycle_ffn(dense, 2, noise_std=0.01, generator=gen)
    diff = (experts.gate_up_proj[0] - experts.gate_up_proj[1]).abs().max()
    assert 0 < diff < 0.1


def test_unsupported_mlps_raise():
    with pytest.raises(TypeError, match="cannot upcycle"):
        upcycle_ffn(torch.nn.Linear(4, 4), 2)
    tanh_mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))
    with pytest.raises(ValueError, match="activation"):
        describe_mlp(tanh_mlp)


def test_select_layers():
    assert select_layers(6, "all") == [0, 1, 2, 3, 4, 5]
    assert select_layers(6, 2) == [1, 3, 5]
    assert select_layers(6, [4, 0, 4]) == [0, 4]
    with pytest.raises(ValueError, match="out of range"):
        select_layers(6, [6])
    with pytest.raises(ValueError):
        select_layers(6, "odd")


@pytest.mark.parametrize("router", ["topk", "region_hard", "region_soft"])
def test_moefy_with_zero_noise_keeps_logits(router):
    model = tiny_qwen2()
    ids = torch.randint(0, 99, (2, 9))
    with torch.no_grad():
        before = model(ids).logits
    ctx = moefy(model, layers="all", num_experts=4, top_k=2, router=router, num_regions=3)
    assert all(isinstance(layer.mlp, MoEAdapter) for layer in model.model.layers)
    with torch.no_grad(), ctx.route(torch.tensor([0, 2])):
        after = model(ids).logits
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    assert set(ctx.routing()) == {"layers.0", "layers.1", "layers.2"}
    assert set(ctx.aux_losses()) >= {"balance", "z"}


def test_moefy_every_second_layer_and_dual_path():
    model = tiny_qwen2(layers=4)
    original = model.model.layers[1].mlp
    ctx = moefy(model, layers=2, num_experts=3, top_k=1, dense_branch_size=36)
    kinds = [isinstance(layer.mlp, MoEAdapter) for layer in model.model.layers]
    assert kinds == [False, True, False, True]
    moe = model.model.layers[1].mlp.moe
    assert isinstance(moe, MoELayer) and moe.dense_branch is not None
    # the dense branch starts as a copy of the original MLP
    x = torch.randn(1, 3, 32)
    torch.testing.assert_close(moe.dense_branch(x), original(x))
    with ctx.route(None):
        model(torch.randint(0, 99, (1, 5)))
    assert set(ctx.routing()) == {"layers.1", "layers.3"}


def test_moefy_refuses_non_causal_routers_and_bad_kwargs():
    with pytest.raises(ValueError, match="causal"):
        moefy(tiny_qwen2(), num_experts=4, top_k=2, router="expert_choice")
    with pytest.raises(TypeError, match="hidden_size"):
        moefy(tiny_qwen2(), num_experts=4, top_k=2, hidden_size=32)
    with pytest.raises(ValueError, match="does not divide"):
        moefy(tiny_qwen2(), num_experts=4, top_k=2, intermediate_size=17)
    with pytest.raises(ValueError, match="do not fit in 4 experts"):
        moefy(tiny_qwen2(), num_experts=4, top_k=2, intermediate_size=6)


def test_region_hard_routing_inside_the_lm():
    model = tiny_qwen2(layers=2)
    region_experts = [[0, 1], [2, 3], [4, 5]]
    ctx = moefy(model, num_experts=6, top_k=2, router="region_hard", num_regions=3,
                region_experts=region_experts, noise_std=0.02)
    regions = torch.tensor([2, 0, 1])
    with torch.no_grad(), ctx.route(regions):
        model(torch.randint(0, 99, (3, 7)))
    for info in ctx.routing().values():
        per_token = info.region_ids
        for r, allowed in enumerate(region_experts):
            chosen = info.expert_ids[per_token == r]
            assert set(chosen.unique().tolist()) <= set(allowed)


def test_region_ids_reach_generate_with_beams():
    model = tiny_qwen2(layers=2)
    ctx = moefy(model, num_experts=4, top_k=2, router="region_hard", num_regions=2,
                region_experts=[[0, 1], [2, 3]])
    prompt = torch.randint(0, 99, (2, 4))
    with torch.no_grad(), ctx.route(torch.tensor([0, 1])):
        out = model.generate(prompt, max_new_tokens=3, num_beams=2, do_sample=False,
                             pad_token_id=0)
    assert out.shape[0] == 2
    info = ctx.routing()["layers.0"]
    assert info.region_ids.shape[0] == info.expert_ids.shape[0]
    # beams of sample 0 (region 0) only use experts {0, 1}
    assert set(info.expert_ids[info.region_ids == 0].unique().tolist()) <= {0, 1}


def test_routing_context_can_skip_the_aux_losses():
    model = tiny_qwen2(layers=2)
    ctx = moefy(model, num_experts=4, top_k=2, router="region_soft", num_regions=3)
    ids, regions = torch.randint(0, 99, (2, 5)), torch.tensor([2, 0])
    with torch.no_grad():
        with ctx.route(regions, compute_aux_losses=False):
            skipped = model(ids).logits
            assert ctx.aux_losses() == {} and len(ctx.routing()) == 2
            with ctx.route(regions):  # nested blocks restore the outer setting
                model(ids)
                assert set(ctx.aux_losses()) == {"balance", "z", "region"}
            assert ctx.compute_aux_losses is False
        with ctx.route(regions):
            full = model(ids).logits
    torch.testing.assert_close(skipped, full, rtol=0, atol=0)
    assert ctx.compute_aux_losses is True


@pytest.mark.slow
def test_moefied_qwen2_trains_with_aux_losses():
    torch.manual_seed(0)
    model = tiny_qwen2(layers=2).train()
    ctx = moefy(model, num_experts=4, top_k=2, router="region_soft", num_regions=2, noise_std=0.01)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.randint(0, 99, (4, 16))
    regions = torch.tensor([0, 1, 0, 1])
    losses = []
    for _ in range(30):
        with ctx.route(regions):
            out = model(data, labels=data)
        aux = ctx.aux_losses()
        loss = out.loss + 0.01 * aux["balance"] + 1e-3 * aux["z"] + 0.01 * aux["region"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    router = model.model.layers[0].mlp.moe.router
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0
    assert router.region_bias.grad.abs().sum() > 0


# --------------------------------------------------------------- narrower experts (slices)
@pytest.mark.parametrize("mlp", [
    GatedMLP(12, 20),
    torch.nn.Sequential(torch.nn.Linear(12, 20), torch.nn.GELU(), torch.nn.Linear(20, 12)),
])
def test_slices_add_up_to_the_dense_mlp(mlp):
    x = torch.randn(5, 12)
    with torch.no_grad():
        dense = mlp(x)
        halves = upcycle_ffn(mlp, 4, intermediate_size=10)  # F/k slices, k = 2
        assert halves.intermediate_size == 10
        torch.testing.assert_close(halves.expert(0, x) + halves.expert(1, x), dense)
        torch.testing.assert_close(halves.expert(2, x), halves.expert(0, x))  # slice 0 again
        parts = upcycle_ffn(mlp, 4, intermediate_size=5)  # MoEfication: a partition
        torch.testing.assert_close(sum(parts.expert(e, x) for e in range(4)), dense)
        doubled = upcycle_ffn(mlp, 4, intermediate_size=10, output_scale=2.0)
        torch.testing.assert_close(doubled.expert(0, x) + doubled.expert(1, x), 2 * dense)


@pytest.mark.parametrize("extra", [{}, {"shared_expert_size": 8}, {"dense_branch_size": 16}],
                         ids=["routed", "shared", "dual_path"])
def test_equal_active_region_hard_upcycling_keeps_logits(extra):
    """Experts of the equal-active width (F/k slices, here after a narrow shared expert or
    dense branch) reproduce the dense LM exactly under region-hard routing: each region's group
    is k consecutive experts, i.e. every slice once, with uniform weights."""
    model = tiny_qwen2()
    ids = torch.randint(0, 99, (3, 9))
    with torch.no_grad():
        before = model(ids).logits
    width = (36 - sum(extra.values())) // 2
    ctx = moefy(model, num_experts=4, top_k=2, router="region_hard", num_regions=3,
                intermediate_size=width, **extra)
    moe = model.model.layers[0].mlp.moe
    assert moe.experts.intermediate_size == width
    assert torch.count_nonzero(moe.router.weight) == 0  # slices start from a uniform router
    with torch.no_grad(), ctx.route(torch.tensor([0, 1, 2])):
        after = model(ids).logits
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


def test_upcycle_fidelity_measures_copies_exact_and_a_partition_not():
    from echomoe.utils.benchmark import upcycle_fidelity

    model = tiny_qwen2()
    ids = torch.randint(0, 99, (2, 8))
    copies = upcycle_fidelity(model, ids, None, num_experts=4, top_k=2)
    assert copies["ffn_rel_err_max"] < 1e-6 and copies["top1_agreement"] == 1.0
    parts = upcycle_fidelity(model, ids, None, num_experts=4, top_k=2, intermediate_size=9)
    assert parts["ffn_rel_err_mean"] > 0.5 and parts["logits_rel_err"] > 0
    assert all(isinstance(layer.mlp, torch.nn.Module) and not isinstance(layer.mlp, MoEAdapter)
               for layer in model.model.layers)  # the measured model itself is untouched


def test_upcycling_refuses_a_shared_expert_leaving_no_units():
    with pytest.raises(ValueError, match="leaves no dense units"):
        moefy(tiny_qwen2(), num_experts=4, top_k=2, shared_expert_size=36, intermediate_size=18)
