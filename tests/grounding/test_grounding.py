"""echomoe.grounding: pixel decoder, mask decoders, heads, measurements and losses."""

import math

import pytest
import torch
from torch.nn import functional as F

from echomoe.data.collate import normalise_box, normalise_point
from echomoe.grounding import (
    MASK_DECODERS,
    BoxHead,
    DotProductMaskHead,
    DynamicConvMaskDecoder,
    KeypointHead,
    PixelDecoder,
    box_loss,
    boxes_to_xyxy,
    keypoint_loss,
    keypoints_to_pixels,
    mask_loss,
    match_point_pairs,
    measure_mm,
)

PATCH, WIDTH, LM = 8, 24, 37  # ViT patch size and width, LM hidden size (uneven on purpose)


def vit_features(batch, height, width, n=3, channels=WIDTH):
    return [torch.randn(batch, channels, height // PATCH, width // PATCH) for _ in range(n)]


def assert_all_params_get_grad(*modules):
    for module in modules:
        for name, p in module.named_parameters():
            assert p.grad is not None, f"{type(module).__name__}.{name} got no gradient"
            assert p.grad.abs().sum() > 0, f"{type(module).__name__}.{name} got a zero gradient"


# ----------------------------------------------------------------------------- pixel decoder
@pytest.mark.parametrize(
    ("size", "stride", "upsample"),
    [((64, 64), 4, "transposed"), ((64, 64), 8, "bilinear"), ((48, 40), 4, "bilinear"),
     ((48, 40), 2, "transposed")],
)
def test_pixel_decoder_shapes_and_coordinates(size, stride, upsample):
    h, w = size
    dec = PixelDecoder(in_channels=[WIDTH] * 3, dim=16, input_stride=PATCH,
                       output_stride=stride, upsample=upsample)
    out = dec(vit_features(2, h, w))
    assert out.shape == (2, 18, h // stride, w // stride) and dec.out_channels == 18
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0, -2, 0], torch.linspace(-1, 1, w // stride))  # x
    torch.testing.assert_close(out[1, -1, :, 0], torch.linspace(-1, 1, h // stride))  # y


def test_pixel_decoder_hierarchical_features_and_no_coords():
    dec = PixelDecoder(in_channels=[8, 16], dim=12, input_stride=8, output_stride=8,
                       add_coords=False)
    out = dec([torch.randn(2, 8, 6, 5), torch.randn(2, 16, 3, 3)])
    assert out.shape == (2, 12, 6, 5) and dec.out_channels == 12


def test_pixel_decoder_errors():
    with pytest.raises(ValueError, match="power of two"):
        PixelDecoder(in_channels=[4], dim=8, input_stride=12, output_stride=4)
    with pytest.raises(ValueError, match="must divide"):
        PixelDecoder(in_channels=[4], dim=8, input_stride=8, output_stride=3)
    dec = PixelDecoder(in_channels=[4, 4], dim=8, input_stride=8)
    with pytest.raises(ValueError, match="expects 2 feature maps"):
        dec([torch.randn(1, 4, 2, 2)])
    with pytest.raises(ValueError, match=r"feature map 1: expected \(B, 4, h, w\)"):
        dec([torch.randn(1, 4, 2, 2), torch.randn(1, 5, 2, 2)])


# ----------------------------------------------------------------------------- mask decoders
@pytest.mark.parametrize("name", sorted(MASK_DECODERS))
def test_mask_decoders_shapes_and_gradients(name):
    pixel = PixelDecoder(in_channels=[WIDTH] * 2, dim=16, input_stride=PATCH, output_stride=4)
    head = MASK_DECODERS[name](hidden_size=LM, in_channels=pixel.out_channels)
    hidden = torch.randn(3, LM)
    logits = head(hidden, pixel(vit_features(3, 64, 64, n=2)), 64)
    assert logits.shape == (3, 64, 64) and torch.isfinite(logits).all()
    logits = head(hidden, pixel(vit_features(3, 48, 40, n=2)), (48, 40))
    assert logits.shape == (3, 48, 40)
    # a non-trivial loss so that no gradient cancels out by symmetry
    sum(mask_loss(logits, (torch.rand(3, 48, 40) > 0.5).float(), None).values()).backward()
    assert_all_params_get_grad(pixel, head)
    with pytest.raises(ValueError, match="seg_hidden must be"):
        head(torch.randn(3, LM + 1), torch.randn(3, pixel.out_channels, 4, 4), 16)
    with pytest.raises(ValueError, match="2 hidden states but 3 feature maps"):
        head(torch.randn(2, LM), torch.randn(3, pixel.out_channels, 4, 4), 16)


@pytest.mark.parametrize(("kernel_size", "num_layers"), [(1, 3), (3, 3), (3, 1)])
def test_dynamic_conv_equals_per_sample_reference_loop(kernel_size, num_layers):
    dec = DynamicConvMaskDecoder(hidden_size=LM, in_channels=11, conv_channels=8,
                                 num_layers=num_layers, kernel_size=kernel_size)
    hidden, feats = torch.randn(4, LM), torch.randn(4, 11, 6, 5)
    kernels = dec.generate_kernels(hidden)
    assert [w.shape[1:3] for w, _ in kernels] == [s for s in dec.layer_shapes]
    assert sum(w[0].numel() + b[0].numel() for w, b in kernels) == dec.num_dynamic_params
    rows = []
    for b in range(4):
        x = feats[b : b + 1]
        for n, (weight, bias) in enumerate(kernels):
            x = F.conv2d(x, weight[b], bias[b], padding=kernel_size // 2)
            x = F.relu(x) if n < len(kernels) - 1 else x
        rows.append(F.interpolate(x, size=(12, 10), mode="bilinear", align_corners=False)[0, 0])
    torch.testing.assert_close(dec(hidden, feats, (12, 10)), torch.stack(rows))


def test_dot_product_head_hand_built_case():
    head = DotProductMaskHead(hidden_size=2, in_channels=3)
    with torch.no_grad():
        head.proj[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        head.proj[0].bias.copy_(torch.tensor([0.0, 0.0, 1.0]))
    hidden = torch.tensor([[1.0, 2.0]])  # query = (1, 2, 4)
    feats = torch.tensor([[[1.0, 0.0], [0.0, 1.0]],    # channel 0 at (y, x)
                          [[0.0, 1.0], [0.0, 1.0]],    # channel 1
                          [[0.0, 0.0], [1.0, 1.0]]])[None]  # channel 2
    expected = torch.tensor([[[1.0, 2.0], [4.0, 7.0]]])
    torch.testing.assert_close(head(hidden, feats, 2), expected)
    torch.testing.assert_close(
        head(hidden, feats, (4, 6)),
        F.interpolate(expected[None], size=(4, 6), mode="bilinear", align_corners=False)[0],
    )


def test_decoders_overfit_four_masks():
    torch.manual_seed(0)
    b, size = 4, 32
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    centre, radius = torch.rand(b, 2, 1, 1) * 16 + 8, torch.rand(b, 2, 1, 1) * 5 + 5
    masks = (((xx - centre[:, 0]) / radius[:, 0]) ** 2
             + ((yy - centre[:, 1]) / radius[:, 1]) ** 2 <= 1).float()  # random ellipses
    feats, hidden = vit_features(b, size, size), torch.randn(b, LM)
    pixel = PixelDecoder(in_channels=[WIDTH] * 3, dim=16, input_stride=PATCH, output_stride=4)
    dec = DynamicConvMaskDecoder(hidden_size=LM, in_channels=pixel.out_channels)
    opt = torch.optim.Adam([*pixel.parameters(), *dec.parameters()], lr=5e-3)
    for _ in range(200):
        loss = sum(mask_loss(dec(hidden, pixel(feats), size), masks, None).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        pred = (dec(hidden, pixel(feats), size) > 0).float()
    dice = 2 * (pred * masks).sum((1, 2)) / (pred.sum((1, 2)) + masks.sum((1, 2)))
    assert (dice > 0.9).all(), dice


# ----------------------------------------------------------------------------- heads
def test_box_and_keypoint_heads():
    box_head, kpt_head = BoxHead(hidden_size=LM), KeypointHead(hidden_size=LM, num_keypoints=3)
    hidden = torch.randn(5, LM)
    boxes, points = box_head(hidden), kpt_head(hidden)
    assert boxes.shape == (5, 4) and points.shape == (5, 3, 2)
    assert ((boxes > 0) & (boxes < 1)).all() and ((points > 0) & (points < 1)).all()
    total = sum(box_loss(boxes, torch.rand(5, 4) * 0.5 + 0.25, None).values())
    total = total + sum(keypoint_loss(points, torch.rand(5, 3, 2), None).values())
    total.backward()
    assert_all_params_get_grad(box_head, kpt_head)
    with pytest.raises(ValueError, match=r"\(B, 37\)"):
        box_head(torch.randn(5, 36))


def test_coordinate_helpers_invert_the_collator():
    (h0, w0), (h1, w1) = (30, 50), (64, 40)
    pixel_boxes = [(3, 4, 10, 20), (0, 0, 39, 63)]  # inclusive (x_min, y_min, x_max, y_max)
    boxes = torch.tensor([normalise_box(pixel_boxes[0], h0, w0),
                          normalise_box(pixel_boxes[1], h1, w1)])
    sizes = torch.tensor([[h0, w0], [h1, w1]])
    torch.testing.assert_close(boxes_to_xyxy(boxes, sizes, inclusive=True),
                               torch.tensor(pixel_boxes, dtype=torch.float32))
    torch.testing.assert_close(boxes_to_xyxy(boxes, sizes),  # pixel edges
                               torch.tensor([[3.0, 4, 11, 21], [0, 0, 40, 64]]))
    torch.testing.assert_close(boxes_to_xyxy(torch.tensor([0.5, 0.5, 0.2, 0.4])),
                               torch.tensor([0.4, 0.3, 0.6, 0.7]))
    pixels = [[(0, 0), (49, 29), (7, 12)], [(39, 63), (5, 6), (0, 10)]]
    points = torch.tensor([[normalise_point(p, h0, w0) for p in pixels[0]],
                           [normalise_point(p, h1, w1) for p in pixels[1]]])
    torch.testing.assert_close(keypoints_to_pixels(points, sizes),
                               torch.tensor(pixels, dtype=torch.float32))


def test_measure_mm_on_3_4_5_triangles():
    sizes = torch.tensor([[20, 40], [100, 60]])  # (H, W), non-square on purpose
    pixels = [[(2, 3), (5, 7)], [(10, 10), (16, 18)]]  # (dx, dy) = (3, 4) and (6, 8)
    points = torch.tensor([[normalise_point(p, 20, 40) for p in pixels[0]],
                           [normalise_point(p, 100, 60) for p in pixels[1]]])
    mm = measure_mm(points, [(0, 1), (1, 0), (0, 0)], sizes, torch.tensor([0.5, 0.2]))
    torch.testing.assert_close(mm, torch.tensor([[2.5, 2.5, 0.0], [2.0, 2.0, 0.0]]))
    unknown = measure_mm(points, [(0, 1)], sizes, torch.tensor([math.nan, 1.0]))
    assert unknown[0].isnan().all() and unknown[1].item() == pytest.approx(10.0, abs=1e-5)
    one_size = measure_mm(points[:1], [(0, 1)], (20, 40), 0.5)  # one (H, W), float spacing
    assert one_size.shape == (1, 1) and one_size.item() == pytest.approx(2.5, abs=1e-6)
    with pytest.raises(ValueError, match="outside the 2 keypoints"):
        measure_mm(points, [(0, 2)], sizes, 1.0)


# ----------------------------------------------------------------------------- losses
def test_mask_loss_known_values():
    left = torch.zeros(8, 8)
    left[:, :4] = 1
    right, empty = 1 - left, torch.zeros(8, 8)
    logit = lambda m: (m * 2 - 1) * 40.0  # noqa: E731  (saturated: sigmoid is 0 or 1)
    targets = torch.stack([left, left, empty, empty])
    logits = torch.stack([logit(left), logit(right), logit(empty), logit(1 - empty)])
    per_sample = []
    for i in range(4):
        out = mask_loss(logits[i : i + 1], targets[i : i + 1], None, 1.0, 1.0)
        per_sample.append(out["seg_dice"].item())
    # identical -> 0; disjoint -> 1 - s/(|p|+|t|+s); empty/empty -> 0; empty target, full pred
    expected = [0.0, 1 - 1 / 65, 0.0, 64 / 65]
    assert per_sample == pytest.approx(expected, abs=1e-6)

    x, t = torch.randn(3, 5, 7), (torch.rand(3, 5, 7) > 0.5).float()
    out = mask_loss(x, t, None)  # LISA weights
    reference_bce = F.binary_cross_entropy(torch.sigmoid(x), t)
    p = torch.sigmoid(x).flatten(1)
    reference_dice = (1 - (2 * (p * t.flatten(1)).sum(1) + 1) / (p.sum(1) + t.flatten(1).sum(1)
                                                                  + 1)).mean()
    torch.testing.assert_close(out["seg_bce"], 2.0 * reference_bce)
    torch.testing.assert_close(out["seg_dice"], 0.5 * reference_dice)


def test_losses_ignore_masked_samples_and_never_nan():
    has = torch.tensor([True, False, True])
    logits = torch.randn(3, 6, 6, requires_grad=True)
    targets = (torch.rand(3, 6, 6) > 0.5).float()
    targets[1] = math.nan  # garbage where has_mask is False
    out = mask_loss(logits, targets, has)
    ref = mask_loss(logits[[0, 2]], targets[[0, 2]], None)
    for key in ("seg_bce", "seg_dice"):
        torch.testing.assert_close(out[key], ref[key])
    sum(out.values()).backward()
    assert torch.isfinite(logits.grad).all() and (logits.grad[1] == 0).all()

    pred_box = torch.rand(3, 4, requires_grad=True)
    target_box = torch.tensor([[0.5, 0.5, 0.2, 0.2], [math.nan] * 4, [0.3, 0.6, 0.1, 0.4]])
    out = box_loss(pred_box, target_box, has)
    ref = box_loss(pred_box[[0, 2]], target_box[[0, 2]], None)
    for key in ("box_l1", "box_giou"):
        torch.testing.assert_close(out[key], ref[key])
    pred_kpt, target_kpt = torch.rand(3, 4, 2), torch.rand(3, 4, 2)
    target_kpt[1] = math.nan
    torch.testing.assert_close(keypoint_loss(pred_kpt, target_kpt, has)["keypoint"],
                               (pred_kpt[[0, 2]] - target_kpt[[0, 2]]).abs().mean())

    none = torch.zeros(3, dtype=torch.bool)
    results = {**mask_loss(logits, targets, none), **box_loss(pred_box, target_box, none),
               **keypoint_loss(pred_kpt.requires_grad_(), target_kpt, none)}
    assert set(results) == {"seg_bce", "seg_dice", "box_l1", "box_giou", "keypoint"}
    assert all(v.item() == 0.0 for v in results.values())
    sum(results.values()).backward()  # still connected to the predictions, gradient 0
    assert (pred_box.grad.isfinite()).all() and (pred_kpt.grad == 0).all()


def _giou_reference(a, b):
    """GIoU of two (cx, cy, w, h) boxes from the formula, in Python floats."""
    ax0, ay0, ax1, ay1 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
    bx0, by0, bx1, by1 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    union = (ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter
    hull = (max(ax1, bx1) - min(ax0, bx0)) * (max(ay1, by1) - min(ay0, by0))
    return inter / union - (hull - union) / hull


def test_box_loss_giou_values():
    pred, target = torch.rand(6, 4) * 0.5 + 0.25, torch.rand(6, 4) * 0.5 + 0.25
    out = box_loss(pred, target, None, l1_weight=5.0, giou_weight=2.0)
    ref = [1 - _giou_reference(p.tolist(), t.tolist()) for p, t in zip(pred, target, strict=True)]
    assert out["box_giou"].item() == pytest.approx(2.0 * sum(ref) / 6, abs=1e-5)
    torch.testing.assert_close(out["box_l1"], 5.0 * (pred - target).abs().mean())

    same = box_loss(target, target.clone(), None)
    assert same["box_giou"].item() == 0.0 and same["box_l1"].item() == 0.0
    # disjoint: [.1, .2]^2 and [.7, .8]^2: IoU 0, union .02, hull .49 -> loss 1 + .47 / .49
    a, b = torch.tensor([[0.15, 0.15, 0.1, 0.1]]), torch.tensor([[0.75, 0.75, 0.1, 0.1]])
    assert box_loss(a, b, None)["box_giou"].item() == pytest.approx(1 + 0.47 / 0.49, abs=1e-5)
    # overlapping: [0, .4]^2 and [.2, .6]^2: IoU .04/.28, hull .36 -> 1 - (1/7 - .08/.36)
    a, b = torch.tensor([[0.2, 0.2, 0.4, 0.4]]), torch.tensor([[0.4, 0.4, 0.4, 0.4]])
    out = box_loss(a, b, None)
    assert out["box_giou"].item() == pytest.approx(1 - (1 / 7 - 0.08 / 0.36), abs=1e-5)
    assert out["box_l1"].item() == pytest.approx(0.1, abs=1e-6)


def test_match_point_pairs_swaps_only_where_the_swapped_order_is_nearer():
    target = torch.tensor([[[0.1, 0.1], [0.9, 0.9], [0.2, 0.8], [0.8, 0.2], [0.5, 0.5]]] * 3)
    pred = target.clone()
    pred[0] = target[0, [1, 0, 2, 3, 4]]      # long axis predicted the other way round
    pred[1] = target[1, [0, 1, 3, 2, 4]] + 0.05  # short axis swapped (and off by 0.05)
    before = target.clone()
    out = match_point_pairs(pred, target, [(0, 1), (2, 3)])
    torch.testing.assert_close(out[0], target[0, [1, 0, 2, 3, 4]])
    torch.testing.assert_close(out[1], target[1, [0, 1, 3, 2, 4]])
    torch.testing.assert_close(out[2], target[2])  # already in the nearer order
    torch.testing.assert_close(target, before)     # the input is not modified
    # A pair with a missing point, an index past K, or a tie keeps the given order.
    valid = torch.ones(3, 5, dtype=torch.bool)
    valid[0, 1] = False
    kept = match_point_pairs(pred, target, [(0, 1), (2, 3), (4, 7)], valid)
    torch.testing.assert_close(kept[0], target[0])
    tie = torch.full((1, 2, 2), 0.5)
    torch.testing.assert_close(match_point_pairs(tie, torch.rand(1, 2, 2).sort(1).values,
                                                 [(0, 1)]).shape, torch.Size([1, 2, 2]))
    same = torch.tensor([[[0.2, 0.2], [0.6, 0.6]]])
    torch.testing.assert_close(match_point_pairs(torch.full((1, 2, 2), 0.4), same, [(0, 1)]),
                               same)
    # The matched target trains the head like the true order: gradients reach the prediction.
    p = pred.clone().requires_grad_(True)
    loss = keypoint_loss(p, match_point_pairs(p, target, [(0, 1), (2, 3)]), None)["keypoint"]
    loss.backward()
    assert float(loss.detach()) < 0.03 and p.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"expects \(B, K, 2\)"):
        match_point_pairs(pred[..., :1], target[..., :1], [(0, 1)])
