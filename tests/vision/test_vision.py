"""echomoe.vision: every encoder kind through the same checks (timm style), projector, classifier.

Tiny uneven configs (hidden 32, FFN 37, 2 blocks, 32x32 images, patch 8 -> a 4x4 grid; the
ConvNets: stages 12-20-32 wide, output stride 8, FFN 48).
"""

from __future__ import annotations

import pytest
import torch

from echomoe.moe import DenseFFN, MoELayer, SoftMoE
from echomoe.vision import (
    ConvNet,
    HFVisionEncoder,
    ImageEncoder,
    Projector,
    RegionClassifier,
    VisionTransformer,
    pool_tokens_2x2,
)

B, C, IMG, PATCH, DEPTH = 2, 32, 32, 8, 2
GRID = IMG // PATCH
NATIVE = ("native_dense", "native_expert_choice", "native_soft", "native_conv_stem")
CONVNET = ("convnet_dense", "convnet_expert_choice", "convnet_soft")
HF = ("hf_siglip", "hf_clip", "hf_dinov2", "hf_dinov2_registers")
KINDS = NATIVE + CONVNET + HF

# Parameters that legitimately get no gradient from patch tokens: CLIP's post_layernorm only
# normalises the pooled cls output, DINOv2's mask_token is for masked image modelling.
NO_GRAD = {"hf_clip": {"model.post_layernorm.weight", "model.post_layernorm.bias"},
           "hf_dinov2": {"model.embeddings.mask_token"},
           "hf_dinov2_registers": {"model.embeddings.mask_token"}}


def hf_config(kind: str, in_channels: int = 3):
    from transformers import (
        CLIPVisionConfig,
        Dinov2Config,
        Dinov2WithRegistersConfig,
        SiglipVisionConfig,
    )

    common = dict(hidden_size=C, num_hidden_layers=DEPTH, num_attention_heads=4,
                  image_size=IMG, patch_size=PATCH, num_channels=in_channels)
    if kind == "hf_siglip":
        return SiglipVisionConfig(intermediate_size=37, **common)
    if kind == "hf_clip":
        return CLIPVisionConfig(intermediate_size=37, **common)
    if kind == "hf_dinov2":
        return Dinov2Config(mlp_ratio=2, **common)
    return Dinov2WithRegistersConfig(mlp_ratio=2, num_register_tokens=2, **common)


def make(kind: str, in_channels: int = 3) -> ImageEncoder:
    if kind in HF:
        return HFVisionEncoder.from_config(hf_config(kind, in_channels))
    if kind in CONVNET:
        moe = {"convnet_dense": {},
               "convnet_expert_choice": dict(moe_layers="all", router="expert_choice",
                                             num_experts=3),
               "convnet_soft": dict(moe_layers=[1], router="soft", num_experts=3)}[kind]
        return ConvNet(image_size=IMG, in_channels=in_channels, widths=(12, 20, C),
                       depths=(1, 0, DEPTH), kernel_size=3, mlp_ratio=1.5, **moe)
    moe = {"native_dense": {},
           "native_expert_choice": dict(moe_layers="all", router="expert_choice", num_experts=3),
           "native_soft": dict(moe_layers=[1], router="soft", num_experts=3),
           "native_conv_stem": dict(stem="conv")}[kind]
    return VisionTransformer(image_size=IMG, patch_size=PATCH, in_channels=in_channels,
                             hidden_size=C, depth=DEPTH, num_heads=4, intermediate_size=37, **moe)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny ops on a shared 2-core box: a second intra-op thread costs ~8 ms per op."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=KINDS)
def kind(request):
    return request.param


def test_face(kind):
    enc = make(kind)
    assert isinstance(enc, ImageEncoder)
    assert (enc.hidden_size, enc.patch_size, enc.in_channels, enc.depth) == (C, PATCH, 3, DEPTH)
    assert enc.num_patches(IMG) == GRID * GRID
    assert enc.num_patches((32, 48)) == 4 * 6
    assert enc.num_patches() == GRID * GRID


def test_shapes_no_nan_and_aux_losses(kind):
    enc = make(kind)
    x = torch.randn(B, 3, IMG, IMG)
    feats = enc.forward_features(x)
    assert feats.shape == (B, GRID * GRID, C)
    tokens, maps = enc.forward_intermediates(x, [0, -1])
    assert len(maps) == 2 and all(m.shape == (B, C, GRID, GRID) for m in maps)
    assert torch.isfinite(tokens).all() and all(torch.isfinite(m).all() for m in maps)
    if kind in ("native_expert_choice", "convnet_expert_choice"):
        assert set(enc.aux_losses) == {"z"} and enc.aux_losses["z"].requires_grad
        assert set(enc.routing) == {"blocks.0", "blocks.1"}
    elif kind in ("native_soft", "convnet_soft"):
        assert set(enc.routing) == {"blocks.1"}
    else:
        assert enc.aux_losses == {} and enc.routing == {}
    enc.eval()
    with torch.no_grad():
        tokens, maps = enc.forward_intermediates(x, 1)
        assert torch.allclose(tokens, enc.forward_features(x), atol=1e-6)
        only = enc.forward_intermediates(x, 1, intermediates_only=True)
        normed = enc.forward_intermediates(x, 1, norm=True, intermediates_only=True)
    assert len(maps) == 1 and torch.allclose(only[0], maps[0], atol=1e-6)
    if kind != "hf_clip":  # the last block's map, normalised, is the final token grid
        grid_tokens = normed[0].flatten(2).transpose(1, 2)
        assert torch.allclose(grid_tokens, tokens, atol=1e-5)


@pytest.mark.parametrize("kinds", [NATIVE[:3], CONVNET])
def test_ffns_are_the_moe_library_blocks(kinds):
    dense, ec, soft = (make(k) for k in kinds)
    assert all(isinstance(b.ffn, DenseFFN) for b in dense.blocks)
    assert all(isinstance(b.ffn, MoELayer) for b in ec.blocks)
    assert isinstance(soft.blocks[0].ffn, DenseFFN) and isinstance(soft.blocks[1].ffn, SoftMoE)
    with pytest.raises(ValueError, match="expert_choice, soft"):
        VisionTransformer(image_size=IMG, patch_size=PATCH, hidden_size=C, depth=1, num_heads=4,
                          moe_layers="all", router="topk")
    with pytest.raises(ValueError, match="expert_choice, soft"):
        ConvNet(image_size=IMG, widths=(8, C), depths=(0, 1), moe_layers="all", router="topk")


def test_gradients_reach_every_parameter(kind):
    enc = make(kind)
    x = torch.randn(B, 3, IMG, IMG)
    tokens, maps = enc.forward_intermediates(x, [0])
    weights = torch.randn_like(tokens)  # a plain sum through a LayerNorm has zero gradient
    loss = (tokens * weights).sum() + maps[0].pow(2).mean() + sum(enc.aux_losses.values())
    loss.backward()
    missing = [n for n, p in enc.named_parameters()
               if p.grad is None or not torch.isfinite(p.grad).all() or not p.grad.any()]
    assert set(missing) == NO_GRAD.get(kind, set())


def test_grayscale_and_channel_errors(kind):
    enc = make(kind).eval()
    gray = torch.randn(B, 1, IMG, IMG)
    with torch.no_grad():
        assert torch.allclose(enc(gray), enc(gray.repeat(1, 3, 1, 1)), atol=1e-6)
    with pytest.raises(ValueError, match=r"expected 3 channels .*got 2"):
        enc(torch.randn(B, 2, IMG, IMG))
    with pytest.raises(ValueError, match=r"expected a 4-D .*got \(3, 32, 32\)"):
        enc(torch.randn(3, IMG, IMG))
    with pytest.raises(ValueError, match="multiple of the patch size"):
        enc(torch.randn(B, 3, IMG + 4, IMG))
    with pytest.raises(ValueError, match="out of range"):
        enc.forward_intermediates(gray, [DEPTH])


@pytest.mark.parametrize("kind", ["native_dense", "hf_siglip"])
def test_single_channel_encoder(kind):
    enc = make(kind, in_channels=1)
    assert enc(torch.randn(B, 1, IMG, IMG)).shape == (B, GRID * GRID, C)
    with pytest.raises(ValueError, match=r"expected 1 channels .*got 3"):
        enc(torch.randn(B, 3, IMG, IMG))


def test_other_image_sizes(kind):
    enc = make(kind).eval()
    with torch.no_grad():
        assert enc(torch.randn(B, 1, 48, 48)).shape == (B, 36, C)
        _, maps = enc.forward_intermediates(torch.randn(B, 1, 48, 48), [0])
        assert maps[0].shape == (B, C, 6, 6)
        if kind in NATIVE + CONVNET or kind in ("hf_siglip", "hf_clip"):  # non-square input
            assert enc(torch.randn(B, 1, 32, 48)).shape == (B, 24, C)


def test_conv_stem_sees_across_patch_borders():
    """A pixel on a patch border moves only its own patch's embedding with the ViT stem and
    its neighbour's as well with the conv stem (overlapping 3x3 windows)."""
    torch.manual_seed(0)
    x = torch.randn(1, 1, IMG, IMG)
    y = x.clone()
    y[0, 0, 0, PATCH - 1] += 5.0  # top-right pixel of patch (0, 0)
    for stem, moved in (("patch", [0]), ("conv", [0, 1])):
        embed = VisionTransformer(image_size=IMG, patch_size=PATCH, hidden_size=C, depth=1,
                                  num_heads=4, stem=stem).patch_embed
        with torch.no_grad():
            delta = (embed(y) - embed(x)).abs().amax(dim=1)[0]  # (h, w)
        assert torch.nonzero(delta.flatten() > 1e-6).flatten().tolist() == moved


def test_conv_stem_shapes_and_errors():
    enc = VisionTransformer(image_size=IMG, patch_size=PATCH, hidden_size=C, depth=1,
                            num_heads=4, stem="conv")
    convs = [m for m in enc.patch_embed.modules() if isinstance(m, torch.nn.Conv2d)]
    # log2(8) = 3 stride-2 convolutions with 8, 16, 32 channels, then a 1x1 projection
    assert [(m.out_channels, m.stride[0]) for m in convs] == [(8, 2), (16, 2), (32, 2), (C, 1)]
    with pytest.raises(ValueError, match="power-of-two patch_size"):
        VisionTransformer(image_size=36, patch_size=6, hidden_size=C, depth=1, num_heads=4,
                          stem="conv")
    with pytest.raises(ValueError, match="stem must be"):
        VisionTransformer(image_size=IMG, patch_size=PATCH, hidden_size=C, depth=1,
                          num_heads=4, stem="hybrid")
    wide = VisionTransformer(image_size=IMG, patch_size=PATCH, hidden_size=C, depth=1,
                             num_heads=4, stem="conv", stem_channels=[12, 20, 40])
    convs = [m for m in wide.patch_embed.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [m.out_channels for m in convs] == [12, 20, 40, C]
    assert wide(torch.randn(2, 1, IMG, IMG)).shape == (2, GRID * GRID, C)
    with pytest.raises(ValueError, match="stem_channels must be 3 positive ints"):
        VisionTransformer(image_size=IMG, patch_size=PATCH, hidden_size=C, depth=1,
                          num_heads=4, stem="conv", stem_channels=[8, 16])
    with pytest.raises(ValueError, match="stem_channels needs stem='conv'"):
        VisionTransformer(image_size=IMG, patch_size=PATCH, hidden_size=C, depth=1,
                          num_heads=4, stem_channels=[8, 16, 32])


def test_convnet_layout():
    enc = make("convnet_dense", in_channels=1)
    downs = [m for m in enc.stem.modules() if isinstance(m, torch.nn.Conv2d) and m.stride[0] == 2]
    # three stride-2 stages 12 -> 20 -> 32 wide; one block after the first, none after the second
    assert [(m.in_channels, m.out_channels) for m in downs] == [(1, 12), (12, 20), (20, C)]
    assert [type(m).__name__ for m in enc.stem] == ["Sequential", "ConvBlock", "Sequential",
                                                    "Sequential"]
    mixer = enc.blocks[0].mixer
    assert (mixer.groups, mixer.kernel_size, mixer.padding) == (C, (3, 3), (1, 1))
    assert enc.blocks[0].ffn.mlp.fc1.out_features == 48  # mlp_ratio 1.5 x 32
    assert enc.num_prefix_tokens == 0 and not hasattr(enc, "pos_embed")


def test_convnet_is_local_and_shift_equivariant():
    """No position embedding and no attention: a pixel moves only the tokens within the
    receptive field, and a shift by the output stride shifts the token grid (interior)."""
    torch.manual_seed(0)
    enc = ConvNet(image_size=64, widths=(8, 12, 16), depths=(1, 1, 1), kernel_size=3).eval()
    x = torch.rand(1, 1, 64, 64)
    y = x.clone()
    y[0, 0, 0, 0] += 5.0
    with torch.no_grad():
        base = enc.forward_intermediates(x, 1, intermediates_only=True)[0][0]  # (C, 8, 8)
        delta = (enc.forward_intermediates(y, 1, intermediates_only=True)[0][0] - base).abs()
        shifted = enc.forward_intermediates(torch.roll(x, (8, 8), dims=(2, 3)), 1,
                                            intermediates_only=True)[0][0]
    moved = delta.amax(0) > 1e-6
    assert moved[0, 0] and not moved[3:, :].any() and not moved[:, 3:].any()
    assert torch.allclose(shifted[:, 3:6, 3:6], base[:, 2:5, 2:5], atol=1e-4)


@pytest.mark.parametrize("kwargs, match", [
    (dict(widths=()), "widths must be positive ints"),
    (dict(widths=(8, 0)), "widths must be positive ints"),
    (dict(widths=(8, 16), depths=(1,)), r"depths must be 2 ints >= 0 .*got \[1\]"),
    (dict(widths=(8, 16), depths=(1, 0)), "the last >= 1"),
    (dict(widths=(8, 16), depths=(1, 1), kernel_size=4), "positive odd int, got 4"),
    (dict(widths=(8, 16), depths=(1, 1), in_channels=2), "in_channels must be 1 or 3"),
    (dict(image_size=36, widths=(8, 16, 32), depths=(0, 0, 1)), "multiple of the patch size 8"),
])
def test_convnet_refuses_bad_layouts(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ConvNet(**{"image_size": IMG, **kwargs})


def test_pos_embed_interpolation_native():
    enc = make("native_dense")
    assert enc.interpolate_pos_embed((GRID, GRID)) is enc.pos_embed
    bigger = enc.interpolate_pos_embed((6, 6))
    assert bigger.shape == (1, 36, C) and torch.isfinite(bigger).all()
    # bicubic interpolation of a constant table is that constant
    with torch.no_grad():
        enc.pos_embed.fill_(0.5)
    assert torch.allclose(enc.interpolate_pos_embed((6, 4)), torch.full((1, 24, C), 0.5))


@pytest.mark.parametrize("kind", HF)
def test_hf_save_load_roundtrip(kind, tmp_path):
    enc = make(kind).eval()
    enc.save_pretrained(tmp_path)
    loaded = HFVisionEncoder.from_pretrained(tmp_path).eval()
    x = torch.randn(B, 1, IMG, IMG)
    with torch.no_grad():
        assert torch.equal(enc(x), loaded(x))
        a = enc.forward_intermediates(x, [0], intermediates_only=True)[0]
        assert torch.equal(a, loaded.forward_intermediates(x, [0], intermediates_only=True)[0])


def test_hf_hub_name_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="not a local directory.*never downloads"):
        HFVisionEncoder.from_pretrained("google/siglip-base-patch16-224")


def test_hf_full_config_and_unsupported_type():
    from transformers import BertConfig, SiglipConfig

    full = SiglipConfig(vision_config=hf_config("hf_siglip").to_dict())
    enc = HFVisionEncoder.from_config(full)
    assert enc.hidden_size == C and not hasattr(enc.model, "head")
    with pytest.raises(ValueError, match="unsupported vision model type 'bert'"):
        HFVisionEncoder.from_config(BertConfig())


def test_pool_tokens_hand_built():
    x = torch.arange(16.0).view(1, 16, 1)  # 4x4 grid, token value = its row-major index
    pooled = pool_tokens_2x2(x)
    expected = torch.tensor([[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15.0]])
    assert torch.equal(pooled, expected.unsqueeze(0))
    two = torch.stack([torch.arange(8.0), -torch.arange(8.0)], dim=-1).view(1, 8, 2)  # 2x4 grid
    assert pool_tokens_2x2(two, (2, 4))[0, 1].tolist() == [2, -2, 3, -3, 6, -6, 7, -7]
    with pytest.raises(ValueError, match="even patch grid, got 3x3"):
        pool_tokens_2x2(torch.randn(1, 9, 2))
    with pytest.raises(ValueError, match="not a square"):
        pool_tokens_2x2(torch.randn(1, 8, 2))


def test_projector_shapes():
    x = torch.randn(B, 16, C)
    assert Projector(C, 24)(x).shape == (B, 16, 24)
    pooled = Projector(C, 24, hidden_dim=40, pool=True)
    assert pooled.fc1.in_features == 4 * C and pooled.num_output_tokens(16) == 4
    assert pooled(x).shape == (B, 4, 24)
    assert pooled(torch.randn(B, 24, C), grid_size=(4, 6)).shape == (B, 6, 24)
    with pytest.raises(ValueError, match="expected tokens"):
        pooled(torch.randn(B, 16, C + 1))


def test_region_classifier_shapes_and_overfit():
    clf = RegionClassifier(C, num_regions=7)
    feats = torch.randn(4, 16, C)
    assert clf(feats).shape == (4, 7) and clf(feats.mean(1)).shape == (4, 7)
    labels = torch.tensor([0, 3, 5, 6])
    opt = torch.optim.Adam(clf.parameters(), lr=1e-2)
    for _ in range(60):
        opt.zero_grad()
        loss = clf.loss(clf(feats), labels)
        loss.backward()
        opt.step()
    assert torch.equal(clf.predict(feats), labels) and loss.item() < 0.1
    partial = clf.loss(clf(feats), torch.tensor([0, -1, -1, 6]))
    assert torch.allclose(partial, clf.loss(clf(feats[[0, 3]]), torch.tensor([0, 6])))
    assert clf.loss(clf(feats), torch.full((4,), -1)).item() == 0.0
    with pytest.raises(ValueError, match="RegionClassifier expected"):
        clf(torch.randn(4, 16, C + 1))
