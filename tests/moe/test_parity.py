"""echomoe's top-k MoE layer equals transformers' Mixtral and Qwen2-MoE blocks, weights copied."""

import pytest
import torch
from transformers import MixtralConfig, Qwen2MoeConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

from echomoe.moe import BACKENDS, build_moe_layer

D, F, E, K = 32, 36, 5, 2
CPU_BACKENDS = [b for b in BACKENDS if b != "megablocks"]


def _grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def _run(module, x, wrap):
    x = x.clone().requires_grad_(True)
    out = wrap(module(x))
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), x.grad


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("intermediate", [F, 37])
def test_matches_mixtral_block(backend, intermediate):
    cfg = MixtralConfig(
        hidden_size=D, intermediate_size=intermediate, num_local_experts=E,
        num_experts_per_tok=K, hidden_act="silu",
    )
    ref = MixtralSparseMoeBlock(cfg)
    for p in ref.parameters():
        torch.nn.init.normal_(p, std=0.2)
    ours = build_moe_layer(D, intermediate, E, K, backend=backend)
    with torch.no_grad():
        ours.router.weight.copy_(ref.gate.weight)
        ours.experts.gate_up_proj.copy_(ref.experts.gate_up_proj)
        ours.experts.down_proj.copy_(ref.experts.down_proj)
    x = torch.randn(3, 11, D)
    y_ref, gx_ref = _run(ref, x, lambda o: o)
    y, gx = _run(ours, x, lambda o: o.hidden_states)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx, gx_ref, atol=1e-5, rtol=1e-5)
    g_ref, g = _grads(ref), _grads(ours)
    torch.testing.assert_close(g["router.weight"], g_ref["gate.weight"], atol=1e-5, rtol=1e-5)
    for name in ("gate_up_proj", "down_proj"):
        torch.testing.assert_close(
            g[f"experts.{name}"], g_ref[f"experts.{name}"], atol=1e-5, rtol=1e-5
        )


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("norm_topk", [True, False])
def test_matches_qwen2_moe_block_with_shared_expert(backend, norm_topk):
    shared = 20
    cfg = Qwen2MoeConfig(
        hidden_size=D, moe_intermediate_size=F, shared_expert_intermediate_size=shared,
        num_experts=E, num_experts_per_tok=K, norm_topk_prob=norm_topk, hidden_act="silu",
    )
    ref = Qwen2MoeSparseMoeBlock(cfg)
    for p in ref.parameters():
        torch.nn.init.normal_(p, std=0.2)
    ours = build_moe_layer(
        D, F, E, K, backend=backend, shared_expert_size=shared, normalize_topk=norm_topk
    )
    with torch.no_grad():
        ours.router.weight.copy_(ref.gate.weight)
        ours.experts.gate_up_proj.copy_(ref.experts.gate_up_proj)
        ours.experts.down_proj.copy_(ref.experts.down_proj)
        ours.shared_expert.mlp.load_state_dict(ref.shared_expert.state_dict())
        ours.shared_expert.gate.weight.copy_(ref.shared_expert_gate.weight)
    x = torch.randn(2, 13, D)
    y_ref, gx_ref = _run(ref, x, lambda o: o)
    y, gx = _run(ours, x, lambda o: o.hidden_states)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx, gx_ref, atol=1e-5, rtol=1e-5)
    g_ref, g = _grads(ref), _grads(ours)
    pairs = {
        "router.weight": "gate.weight",
        "experts.gate_up_proj": "experts.gate_up_proj",
        "experts.down_proj": "experts.down_proj",
        "shared_expert.gate.weight": "shared_expert_gate.weight",
        "shared_expert.mlp.gate_proj.weight": "shared_expert.gate_proj.weight",
        "shared_expert.mlp.down_proj.weight": "shared_expert.down_proj.weight",
    }
    for ours_name, ref_name in pairs.items():
        torch.testing.assert_close(g[ours_name], g_ref[ref_name], atol=1e-5, rtol=1e-5)


def test_weight_layout_is_mixtral_v5():
    layer = build_moe_layer(D, 37, E, K)
    assert layer.router.weight.shape == (E, D)
    assert layer.experts.gate_up_proj.shape == (E, 2 * 37, D)
    assert layer.experts.down_proj.shape == (E, D, 37)
    # gate rows first: expert 0 on one token equals silu(x Wg^T) * (x Wu^T) Wd^T
    x = torch.randn(1, D)
    w = layer.experts.gate_up_proj[0]
    hidden = torch.nn.functional.silu(x @ w[:37].T) * (x @ w[37:].T)
    expected = hidden @ layer.experts.down_proj[0].T
    torch.testing.assert_close(layer.experts.expert(0, x), expected)
