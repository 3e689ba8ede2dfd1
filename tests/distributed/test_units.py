"""One-process pieces of the scale-out code: sharded batches, expert split checks, MoE
parameter groups, strategy selection and the megablocks mapping (no megablocks import)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _launch import ListBatches

from echomoe.distributed import ShardedBatches, check_expert_split
from echomoe.moe import megablocks as mb
from echomoe.moe.builders import build_moe_layer
from echomoe.train.loop import make_strategy
from echomoe.train.optim import build_optimizer, split_moe_groups
from echomoe.train.strategy import Local


def _batches(n):
    return ListBatches([{"input_ids": torch.full((2, 3), i)} for i in range(n)])


def test_sharded_batches_interleave_ranks_and_drop_incomplete_groups():
    source = _batches(7)
    views = [ShardedBatches(source, rank=r, world_size=2) for r in range(2)]
    seen = [[int(b["input_ids"][0, 0]) for b in v.iterate(0)] for v in views]
    assert seen == [[0, 2, 4], [1, 3, 5]]  # batch 6 has no partner: dropped on both ranks
    assert [int(b["input_ids"][0, 0]) for b in views[1].iterate(0, start=2)] == [5]

    class Stream:  # only iterate(): the generic path
        def iterate(self, epoch, start=0):
            return iter(source.batches[start:])

    stream = [int(b["input_ids"][0, 0]) for b in
              ShardedBatches(Stream(), rank=1, world_size=3).iterate(0)]
    assert stream == [1, 4]
    with pytest.raises(ValueError, match="fewer than the 3 ranks"):
        ShardedBatches(_batches(2), rank=0, world_size=3)


def test_expert_split_errors_name_the_sizes():
    check_expert_split(8, 4, 8)
    with pytest.raises(ValueError, match=r"cannot split 6 experts evenly.*world size 4"):
        check_expert_split(6, 4, 4)
    with pytest.raises(ValueError, match="does not divide the world size 3"):
        check_expert_split(4, 2, 3)


def test_split_moe_groups_follows_deepspeed_semantics():
    net = torch.nn.ModuleDict({"a": torch.nn.Linear(4, 5), "experts": torch.nn.Linear(4, 4)})
    net["experts"].weight.allreduce = False
    net["experts"].weight.group_name = "ep_size_2"
    groups = split_moe_groups(build_optimizer(net, lr=1e-3).param_groups)
    moe = [g for g in groups if g.get("moe")]
    assert [g["name"] for g in moe] == ["ep_size_2"] and moe[0]["weight_decay"] == 0.01
    assert moe[0]["params"] == [net["experts"].weight]
    assert sum(len(g["params"]) for g in groups) == 4
    # echomoe's own layers carry no DeepSpeed marks: groups unchanged
    plain = build_optimizer(build_moe_layer(16, 16, 4, 2), lr=1e-3, moe_groups=True)
    assert not any(g.get("moe") for g in plain.param_groups)


def test_one_process_strategy_is_local_and_ep_needs_processes():
    assert isinstance(make_strategy(), Local)
    with pytest.raises(ValueError, match="needs 2 processes"):
        make_strategy(ep_size=2)


def test_expert_parallel_backend_computes_like_grouped_mm_in_one_process():
    torch.manual_seed(0)
    ep = build_moe_layer(24, 20, 4, 2, backend="expert_parallel")
    ref = build_moe_layer(24, 20, 4, 2)
    ref.load_state_dict(ep.state_dict())
    x = torch.randn(2, 5, 24)
    assert torch.equal(ep(x).hidden_states, ref(x).hidden_states)


# ----------------------------------------------------------------------------- megablocks
def _dmoe_reference(state, x, *, top_k, activation):
    """MegaBlocks' dMoE math on its own weight layout (softmax -> top-k -> L1-normalise ->
    per expert: act(x w1[e]^T) [* x v1[e]^T] @ w2[e]), written from its documented layout."""
    router = state["router.layer.weight"]
    e = router.shape[0]
    w1 = state["experts.mlp.w1"].view(e, -1, x.shape[-1])
    w2 = state["experts.mlp.w2"].view(e, -1, x.shape[-1])
    v1 = state["experts.mlp.v1"].view(e, -1, x.shape[-1]) if "experts.mlp.v1" in state else None
    act = mb._ACTIVATIONS[activation][1]
    probs = (x @ router.t()).softmax(-1)
    weights, ids = probs.topk(top_k, dim=-1)
    weights = weights / weights.norm(p=1, dim=-1, keepdim=True)
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        for j in range(top_k):
            i = ids[n, j]
            h = act(x[n] @ w1[i].t())
            if v1 is not None:
                h = h * (x[n] @ v1[i].t())
            out[n] += weights[n, j] * (h @ w2[i])
    return out


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_megablocks_weight_mapping_round_trip_and_math(activation):
    torch.manual_seed(0)
    layer = build_moe_layer(24, 20, 5, 2, activation=activation)
    state = mb.layer_state(layer)
    converted = mb.to_megablocks(state, activation=activation)
    assert converted["experts.mlp.w1"].shape == (5 * 20, 24)
    assert converted["experts.mlp.w2"].shape == (5 * 20, 24)
    assert ("experts.mlp.v1" in converted) == (activation == "swiglu")
    back = mb.from_megablocks(converted, num_experts=5, activation=activation)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)
    x = torch.randn(7, 24)
    with torch.no_grad():
        ours = layer(x.unsqueeze(0)).hidden_states[0]
        theirs = _dmoe_reference(converted, x, top_k=2, activation=activation)
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_megablocks_arguments_and_refusals():
    layer = build_moe_layer(24, 20, 4, 2, jitter=0.01)
    args = mb.layer_arguments(layer, bf16=True)
    assert args["hidden_size"] == 24 and args["ffn_hidden_size"] == 20
    assert (args["moe_num_experts"], args["moe_top_k"]) == (4, 2)
    assert (args["mlp_type"], args["mlp_impl"]) == ("glu", "grouped")
    assert args["activation_fn"] is F.silu and args["moe_normalize_expert_weights"] == 1.0
    assert args["moe_jitter_eps"] == 0.01 and args["bf16"] is True
    with pytest.raises(ValueError, match="dropless"):
        mb.layer_arguments(build_moe_layer(24, 20, 4, 2, capacity_factor=1.25))
    with pytest.raises(ValueError, match="plain top-k"):
        mb.layer_arguments(build_moe_layer(24, 20, 4, 2, router="region_soft"))
    with pytest.raises(ValueError, match="shared expert"):
        mb.layer_arguments(build_moe_layer(24, 20, 4, 2, shared_expert_size=8))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error")
def test_megablocks_on_cpu_suggests_grouped_mm():
    with pytest.raises(RuntimeError, match="grouped_mm"):
        mb.build_dmoe(build_moe_layer(24, 20, 4, 2))
    with pytest.raises(RuntimeError, match="grouped_mm"):
        build_moe_layer(24, 20, 4, 2, backend="megablocks")
