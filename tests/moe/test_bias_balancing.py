"""Auxiliary-loss-free load balancing: a selection-only expert bias (``bias_update_rate``)."""

from __future__ import annotations

import pytest
import torch

from echomoe.moe import RegionHardRouter, RegionSoftRouter, TopKRouter, build_moe_layer

HIDDEN, EXPERTS = 24, 5


def skewed_router(cls=TopKRouter, rate: float = 0.05, top_k: int = 2, **kwargs) -> TopKRouter:
    """A router whose logits favour expert 0 for every token, then expert 1."""
    router = cls(HIDDEN, EXPERTS, top_k, bias_update_rate=rate, **kwargs)
    with torch.no_grad():
        router.weight.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(0))
        router.weight[0] += 0.05
        router.weight[1] += 0.025
    return router


def tokens(n: int = 37, seed: int = 1) -> torch.Tensor:
    """Tokens with a positive mean, so that the skewed rows win for every one of them."""
    return torch.rand(n, HIDDEN, generator=torch.Generator().manual_seed(seed))


def test_off_by_default_adds_no_buffer():
    router = TopKRouter(HIDDEN, EXPERTS, 2)
    assert "expert_bias" not in router.state_dict()
    assert "router.expert_bias" in build_moe_layer(HIDDEN, 8, EXPERTS, 2,
                                                   bias_update_rate=1e-3).state_dict()


def test_bias_steers_selection_but_not_the_combine_weights():
    router = skewed_router().eval()
    x = tokens()
    before = router(x)
    assert (before.expert_ids == 0).any(1).all()  # the skew: everyone picks expert 0
    router.expert_bias[4] = 100.0  # expert 4 now wins every selection
    out = router(x)
    assert (out.expert_ids == 4).any(1).all()
    # the weights are the unbiased probabilities of the chosen experts, renormalised
    chosen = out.probs.gather(1, out.expert_ids)
    torch.testing.assert_close(out.weights, chosen / chosen.sum(1, keepdim=True))
    torch.testing.assert_close(out.probs, before.probs)


def test_one_training_forward_moves_the_bias_by_the_sign_of_the_load_error():
    router = skewed_router(rate=0.1)
    x = tokens(20)
    mask = torch.ones(20, dtype=torch.bool)
    mask[-6:] = False  # padding counts for no expert
    out = router(x, token_mask=mask)
    real = out.expert_ids[:14]
    load = torch.stack([(real == e).sum() for e in range(EXPERTS)]).float()
    assert load.sum() == 14 * 2 and load[0] == 14  # padding left out; expert 0 overloaded
    torch.testing.assert_close(router.expert_bias, 0.1 * torch.sign(load.mean() - load))
    assert router.expert_bias[0] < 0 < router.expert_bias[4]


def test_evaluation_does_not_move_the_bias():
    router = skewed_router().eval()
    router(tokens())
    assert torch.equal(router.expert_bias, torch.zeros(EXPERTS))


@pytest.mark.parametrize("cls", [TopKRouter, RegionSoftRouter])
def test_repeated_training_forwards_balance_a_skewed_router(cls):
    router = skewed_router(cls, rate=0.02)
    x = tokens(64)
    regions = torch.arange(64) % 7 if cls is RegionSoftRouter else None
    def load() -> torch.Tensor:
        return torch.bincount(router(x, regions).expert_ids.flatten(), minlength=EXPERTS)

    first = load()
    assert first.max() == 64 and first.min() == 0  # everyone on experts 0 and 1 at first
    for _ in range(100):
        load()
    # sign updates circle around balance: the average load of the next forwards is even
    late = torch.stack([load() for _ in range(50)]).float().mean(0)
    assert late.max() <= 1.25 * late.mean() and late.min() >= 0.75 * late.mean()


def test_bias_is_refused_where_it_does_not_apply():
    with pytest.raises(ValueError, match="RegionHardRouter fixes which experts"):
        RegionHardRouter(HIDDEN, EXPERTS, 2, bias_update_rate=0.01)
    with pytest.raises(ValueError, match="region_hard|RegionHardRouter"):
        build_moe_layer(HIDDEN, 8, EXPERTS, 2, router="region_hard", bias_update_rate=0.01)
    for router in ("expert_choice", "soft"):
        with pytest.raises(ValueError, match="token-choice routers"):
            build_moe_layer(HIDDEN, 8, EXPERTS, 2, router=router, bias_update_rate=0.01)
    with pytest.raises(ValueError, match="bias_update_rate must be >= 0"):
        TopKRouter(HIDDEN, EXPERTS, 2, bias_update_rate=-1.0)
    with pytest.raises(ValueError, match="bias_update_rate must be >= 0"):
        TopKRouter(HIDDEN, EXPERTS, 2, bias_update_rate=float("nan"))


def test_model_config_passes_the_rate_to_every_moe_layer():
    from echomoe.models import build_model

    model = build_model("tiny", "moe_topk", moe_config={"bias_update_rate": 1e-3})
    routers = [m for m in model.modules() if isinstance(m, TopKRouter)]
    assert routers and all(r.bias_update_rate == 1e-3 for r in routers)
    assert any(k.endswith("expert_bias") for k in model.state_dict())


def test_the_bias_stays_fp32_when_the_model_is_cast_to_16_bits():
    router = skewed_router(rate=1e-3).to(torch.bfloat16)
    assert router.weight.dtype == torch.bfloat16 and router.expert_bias.dtype == torch.float32
    router.expert_bias.fill_(1.0)
    router(tokens().bfloat16())
    # a 1e-3 step survives next to 1.0 (in bf16 it would round back to 1.0)
    assert (router.expert_bias - 1.0).abs().min() == pytest.approx(1e-3, rel=1e-3)
    assert "expert_bias" in dict(router.half().named_buffers())
    assert router.expert_bias.dtype == torch.float32
