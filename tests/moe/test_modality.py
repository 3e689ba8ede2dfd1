"""Modality routing: image and text tokens reach disjoint expert groups, in a layer and in the
assembled VLM (forward, generate with a cache, the model variants, bad input)."""

from __future__ import annotations

import pytest
import torch

from echomoe.models.builders import build_model, count_parameters
from echomoe.models.configuration import EchoMoEConfig
from echomoe.models.modeling import EchoMoEForConditionalGeneration
from echomoe.moe import ROUTERS, ModalityRouter, build_moe_layer, split_experts
from echomoe.moe.modality import IMAGE, TEXT

D, E = 24, 6


def _tokens(n=37, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=gen)
    types = torch.randint(0, 2, (n,), generator=gen)
    return x, types


def test_split_experts():
    assert split_experts(4, 2) == ([0, 1], [2, 3])
    assert split_experts(7, 1) == ([0, 1, 2, 3], [4, 5, 6])
    assert split_experts(6, 2, image_experts=4) == ([0, 1], [2, 3, 4, 5])
    assert split_experts(5, 1, image_experts=[4, 0, 0]) == ([1, 2, 3], [0, 4])
    with pytest.raises(ValueError, match="text expert group has 1 experts.*top_k=2"):
        split_experts(6, 2, image_experts=5)
    with pytest.raises(ValueError, match=r"outside \[0, 4\)"):
        split_experts(4, 1, image_experts=[1, 4])
    with pytest.raises(ValueError, match=r"image_experts must be in \[1, num_experts=4\)"):
        split_experts(4, 1, image_experts=0)


def test_tokens_reach_only_their_groups_top_k_and_match_a_reference():
    router = ModalityRouter(D, E, 2, image_experts=[1, 3, 4]).eval()
    x, types = _tokens()
    types[:3] = -1  # unknown: all experts
    out = router(x, token_types=types)
    text, image = [0, 2, 5], [1, 3, 4]
    logits = x @ router.weight.t()
    for i, t in enumerate(types.tolist()):
        group = list(range(E)) if t == -1 else (text if t == TEXT else image)
        probs = logits[i, group].softmax(-1)  # the group's softmax = the masked softmax
        top = probs.topk(2)
        expected_ids = torch.tensor(group)[top.indices]
        assert torch.equal(out.expert_ids[i], expected_ids)
        torch.testing.assert_close(out.weights[i], top.values / top.values.sum())
        outside = [e for e in range(E) if e not in group]
        assert (out.probs[i, outside] == 0).all()


def test_region_routing_inside_the_image_group_only():
    region_experts = [[2, 3], [3, 4], [4, 5], [2, 5]]
    router = ModalityRouter(D, E, 2, image_experts=[2, 3, 4, 5], route_regions=True,
                            region_experts=region_experts, num_regions=4).eval()
    x, types = _tokens(n=40)
    regions = torch.arange(40) % 5 - 1  # -1 .. 3
    out = router(x, regions, token_types=types)
    for i in range(40):
        chosen = set(out.expert_ids[i].tolist())
        if types[i] == TEXT:
            assert chosen == {0, 1}  # top-2 of a 2-expert group, whatever the region
        elif regions[i] < 0:
            assert chosen <= {2, 3, 4, 5}
        else:
            assert chosen == set(region_experts[int(regions[i])])
    default = ModalityRouter(D, 8, 2, route_regions=True, num_regions=7)
    groups = default.route_mask[2:].nonzero()[:, 1].view(7, 2)
    assert set(groups.flatten().tolist()) == {4, 5, 6, 7}


def test_no_gradient_crosses_between_the_groups():
    layer = build_moe_layer(D, 16, num_experts=4, top_k=2, router="modality")
    x = torch.randn(2, 9, D)
    types = torch.zeros(2, 9, dtype=torch.long)
    types[:, :4] = IMAGE
    out = layer(x, token_types=types)
    out.hidden_states[:, 4:].sum().backward()  # text tokens only
    grad = layer.experts.gate_up_proj.grad
    assert grad[:2].abs().sum() > 0 and torch.equal(grad[2:], torch.zeros_like(grad[2:]))
    ids = out.routing.expert_ids.view(2, 9, 2)
    assert set(ids[:, :4].unique().tolist()) == {2, 3}
    assert set(ids[:, 4:].unique().tolist()) == {0, 1}


def test_without_token_types_every_expert_is_reachable():
    router = ModalityRouter(D, 4, 1).eval()
    x, _ = _tokens(n=200)
    assert set(router(x).expert_ids.unique().tolist()) == {0, 1, 2, 3}


def test_bad_input_is_named():
    router = ModalityRouter(D, 4, 2)
    x, types = _tokens(n=5)
    with pytest.raises(ValueError, match=r"token_types must have shape \(N,\) = \(5,\)"):
        router(x, token_types=types[:4])
    with pytest.raises(ValueError, match="token type 2 is not -1"):
        router(x, token_types=types + 1)
    with pytest.raises(TypeError, match="integer or bool"):
        router(x, token_types=types.float())
    with pytest.raises(ValueError, match="region_experts\\[0\\] names experts \\[0\\] outside "
                                         "the image group"):
        ModalityRouter(D, 4, 1, route_regions=True, region_experts=[[0], [2]], num_regions=2)
    with pytest.raises(ValueError, match="needs route_regions=True"):
        ModalityRouter(D, 4, 1, region_experts=[[2], [3]], num_regions=2)
    with pytest.raises(ValueError, match="image_experts applies to the modality routers"):
        build_moe_layer(D, 8, num_experts=4, top_k=2, router="topk", image_experts=2)
    layer = build_moe_layer(D, 8, num_experts=4, top_k=2, router="modality")
    with pytest.raises(ValueError, match=r"token_types must have shape \(batch, tokens\)"):
        layer(torch.randn(2, 3, D), token_types=torch.zeros(2, 4, dtype=torch.long))
    assert ROUTERS["modality"].causal and ROUTERS["modality_region"].modality


# -- in the VLM ---------------------------------------------------------------------------
IMAGE_ID = 3


def _vlm(router="modality", num_experts=4, **moe):
    torch.manual_seed(0)
    cfg = EchoMoEConfig(image_size=32, vision_config={"kind": "native", "patch_size": 8,
                                                      "hidden_size": 48, "depth": 2,
                                                      "num_heads": 4},
                        moe_config={"num_experts": num_experts, "top_k": 2, "router": router,
                                    "upcycle": False, "intermediate_size": 32, **moe})
    return EchoMoEForConditionalGeneration(cfg).eval()


def test_the_vlm_routes_image_positions_to_image_experts():
    model = _vlm(image_experts=[0, 3])
    p = model.tokens_per_image
    text = torch.randint(10, 500, (2, 7))
    ids = torch.cat([text[:, :2], torch.full((2, p), IMAGE_ID), text[:, 2:]], dim=1)
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=torch.rand(2, 1, 1, 32, 32))
    is_image = (ids == IMAGE_ID).reshape(-1)
    assert len(out.routing) == model.config.text_config.num_hidden_layers
    for info in out.routing.values():
        assert set(info.expert_ids[is_image].unique().tolist()) == {0, 3}
        assert set(info.expert_ids[~is_image].unique().tolist()) == {1, 2}


def test_generate_with_a_cache_routes_new_tokens_as_text():
    model = _vlm("modality_region", num_experts=8)
    assert model.routes_by_region
    p = model.tokens_per_image
    prompt = torch.cat([torch.full((2, p), IMAGE_ID), torch.randint(10, 500, (2, 4))], dim=1)
    kwargs = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0,
              "pixel_values": torch.rand(2, 1, 1, 32, 32), "region_ids": torch.tensor([1, 4])}
    with torch.no_grad():
        cached = model.generate(input_ids=prompt, use_cache=True, **kwargs)
        plain = model.generate(input_ids=prompt, use_cache=False, **kwargs)
        assert torch.equal(cached, plain)
        step = model(input_ids=cached[:, -1:], use_cache=False)
    for info in step.routing.values():  # a lone new token: text experts 0-3
        assert set(info.expert_ids.unique().tolist()) <= {0, 1, 2, 3}


@pytest.mark.parametrize("variant", ["moe_modality", "moe_modality_region"])
def test_the_variants_have_the_dense_models_active_parameters(variant):
    dense, moe = build_model("tiny", "dense"), build_model("tiny", variant)
    a, b = count_parameters(dense), count_parameters(moe)
    assert a["active"] - a["router"] == b["active"] - b["router"]
    routers = [m for m in moe.modules() if isinstance(m, ModalityRouter)]
    assert routers and all(r.route_regions == (variant == "moe_modality_region")
                           for r in routers)
