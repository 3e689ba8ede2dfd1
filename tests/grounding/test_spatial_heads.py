"""Heatmap (soft-argmax) box / keypoint heads and the pixel decoder's image stem."""

import pytest
import torch

from echomoe.grounding import HeatmapBoxHead, HeatmapKeypointHead, PixelDecoder, soft_argmax
from echomoe.grounding.spatial_heads import cell_centres

LM, D = 37, 19  # uneven on purpose


def test_cell_centres_follow_the_pixel_centre_convention():
    centres = cell_centres(2, 4)
    # row-major: (x, y) = ((j + 0.5) / w, (i + 0.5) / h)
    torch.testing.assert_close(centres[0], torch.tensor([0.125, 0.25]))
    torch.testing.assert_close(centres[5], torch.tensor([0.375, 0.75]))


def test_soft_argmax_of_a_peak_is_its_cell_centre_and_of_a_flat_map_the_middle():
    scores = torch.zeros(2, 3, 8, 10)
    scores[0, 1, 2, 7] = 100.0
    points, weights = soft_argmax(scores)
    assert points.shape == (2, 3, 2) and weights.shape == (2, 3, 80)
    torch.testing.assert_close(points[0, 1], torch.tensor([7.5 / 10, 2.5 / 8]))
    torch.testing.assert_close(points[1, 0], torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 3))


def test_keypoint_head_shapes_range_and_gradients():
    head = HeatmapKeypointHead(hidden_size=LM, in_channels=D, num_keypoints=3)
    hidden = torch.randn(4, LM, requires_grad=True)
    feats = torch.randn(4, D, 5, 7, requires_grad=True)
    points = head(hidden, feats)
    assert points.shape == (4, 3, 2)
    assert points[..., 0].min() >= 0.5 / 7 and points[..., 0].max() <= 6.5 / 7
    points.sum().backward()
    assert hidden.grad.abs().sum() > 0 and feats.grad.abs().sum() > 0
    assert head.heatmaps.log_scale.grad is not None


def test_box_head_centre_is_the_soft_argmax_and_size_is_in_unit_range():
    torch.manual_seed(0)
    head = HeatmapBoxHead(hidden_size=LM, in_channels=D)
    hidden, feats = torch.randn(3, LM), torch.randn(3, D, 6, 6)
    boxes = head(hidden, feats)
    assert boxes.shape == (3, 4) and ((boxes > 0) & (boxes < 1)).all()
    centre, _ = soft_argmax(head.heatmaps(hidden, feats))
    torch.testing.assert_close(boxes[:, :2], centre[:, 0])


def test_heads_reject_mismatched_inputs():
    head = HeatmapKeypointHead(hidden_size=LM, in_channels=D, num_keypoints=2)
    with pytest.raises(ValueError, match=r"\(B, 37\) hidden state"):
        head(torch.randn(2, LM + 1), torch.randn(2, D, 4, 4))
    with pytest.raises(ValueError, match="pixel features"):
        head(torch.randn(2, LM), torch.randn(3, D, 4, 4))
    with pytest.raises(ValueError, match="num_keypoints"):
        HeatmapKeypointHead(hidden_size=LM, in_channels=D, num_keypoints=0)


def test_keypoint_head_learns_to_find_a_bright_dot():
    """A pixel decoder with an image stem + heatmap head locate a noisy dot in 200 steps."""
    torch.manual_seed(0)
    size, patch = 32, 8
    decoder = PixelDecoder(in_channels=[16], dim=16, input_stride=patch, output_stride=4,
                           image_channels=1)
    head = HeatmapKeypointHead(hidden_size=8, in_channels=decoder.out_channels, num_keypoints=1)
    embed = torch.nn.Conv2d(1, 16, patch, stride=patch)
    params = [*decoder.parameters(), *head.parameters(), *embed.parameters()]
    opt = torch.optim.Adam(params, lr=3e-3)

    def sample(b):
        xy = torch.randint(2, size - 2, (b, 2))
        images = 0.3 * torch.randn(b, 1, size, size)
        for i, (x, y) in enumerate(xy.tolist()):
            images[i, 0, y - 1:y + 2, x - 1:x + 2] += 1.0
        return images, (xy.float() + 0.5) / size

    for _ in range(200):
        images, target = sample(16)
        pred = head(torch.ones(16, 8), decoder([embed(images)], images))[:, 0]
        loss = (pred - target).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    images, target = sample(64)
    with torch.no_grad():
        pred = head(torch.ones(64, 8), decoder([embed(images)], images))[:, 0]
    error_px = ((pred - target) * size).norm(dim=-1).mean()
    assert error_px < 1.0, f"mean localisation error {error_px:.2f} px"


def test_pixel_decoder_image_stem_shapes_and_errors():
    torch.manual_seed(0)
    feats = [torch.randn(2, 12, 4, 5)]
    image = torch.randn(2, 1, 32, 40)
    for stride, expect in ((4, (8, 10)), (2, (16, 20)), (8, (4, 5))):
        dec = PixelDecoder(in_channels=[12], dim=10, input_stride=8, output_stride=stride,
                           image_channels=1)
        out = dec(feats, image)
        assert out.shape == (2, 12, *expect)
        changed = dec(feats, image + torch.randn_like(image))
        assert not torch.allclose(out, changed), "the stem output does not depend on the image"
    dec = PixelDecoder(in_channels=[12], dim=10, input_stride=8, output_stride=4,
                       image_channels=1)
    with pytest.raises(ValueError, match="image stem"):
        dec(feats)
    with pytest.raises(ValueError, match="output_stride=4"):
        dec(feats, torch.randn(2, 1, 16, 20))
    plain = PixelDecoder(in_channels=[12], dim=10, input_stride=8, output_stride=4)
    torch.testing.assert_close(plain(feats, image), plain(feats))  # ignored without a stem


def test_keypoint_loss_per_point_flags_average_only_the_points_that_exist():
    from echomoe.grounding import keypoint_loss

    pred = torch.zeros(2, 3, 2)
    target = torch.tensor([[[0.1, 0.2], [0.3, 0.4], [9.0, 9.0]],
                           [[0.5, 0.5], [9.0, 9.0], [9.0, 9.0]]])  # 9: padding, not a point
    points = torch.tensor([[True, True, False], [True, False, False]])
    got = keypoint_loss(pred, target, points, weight=2.0)["keypoint"]
    assert float(got) == pytest.approx(2.0 * (0.1 + 0.2 + 0.3 + 0.4 + 0.5 + 0.5) / 6)
    per_sample = keypoint_loss(pred, target, torch.tensor([True, False]))["keypoint"]
    assert float(per_sample) == pytest.approx((0.1 + 0.2 + 0.3 + 0.4 + 18.0) / 6)
    assert float(keypoint_loss(pred, target, torch.zeros(2, 3, dtype=torch.bool))["keypoint"]) \
        == 0.0


def test_keypoint_heatmap_loss_matches_kl_div_and_is_zero_at_the_target_map():
    from echomoe.grounding import keypoint_heatmap_loss

    torch.manual_seed(0)
    h, w, sigma = 5, 7, 1.3
    target = torch.tensor([[[0.2, 0.9], [0.55, 0.1]], [[0.5, 0.5], [float("nan"), 0.0]]])
    valid = torch.tensor([True, False])  # the NaN label belongs to an invalid sample
    # reference: torch's KL divergence against a Gaussian over cell-unit distances
    centres = cell_centres(h, w)
    dx = (centres[:, 0] - target[0, :, :1]) * w
    dy = (centres[:, 1] - target[0, :, 1:]) * h
    goal = torch.softmax(-(dx**2 + dy**2) / (2 * sigma**2), dim=-1)  # (K, h*w)
    scores = torch.randn(2, 2, h, w, requires_grad=True)
    got = keypoint_heatmap_loss(scores, target, valid, sigma=sigma, weight=2.0)["keypoint_heatmap"]
    log_pred = scores[0].flatten(1).log_softmax(-1)
    want = torch.nn.functional.kl_div(log_pred, goal, reduction="none").sum(-1).mean()
    torch.testing.assert_close(got, 2.0 * want)
    got.backward()
    assert torch.isfinite(scores.grad).all() and not scores.grad[1].any()
    # the target map itself (as logits) costs nothing; the same mass one cell off costs more
    exact = goal.log().view(1, 2, h, w)
    zero = keypoint_heatmap_loss(exact, target[:1], None, sigma=sigma)["keypoint_heatmap"]
    assert abs(float(zero)) < 1e-5
    shifted = keypoint_heatmap_loss(exact.roll(1, dims=-1), target[:1], None, sigma=sigma)
    assert float(shifted["keypoint_heatmap"]) > 0.1
    none = keypoint_heatmap_loss(scores, target, torch.tensor([False, False]))
    assert float(none["keypoint_heatmap"].detach()) == 0.0
    # per-point flags: sample 0's second point only -> the mean over that one point
    points = torch.tensor([[False, True], [False, False]])
    one = keypoint_heatmap_loss(scores, target, points, sigma=sigma)["keypoint_heatmap"]
    one_want = torch.nn.functional.kl_div(log_pred[1:], goal[1:], reduction="none").sum()
    torch.testing.assert_close(one, one_want)
    with pytest.raises(ValueError, match=r"has_keypoints must be \(2,\) or \(2, 2\)"):
        keypoint_heatmap_loss(scores, target, torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\(B, K, h, w\) scores"):
        keypoint_heatmap_loss(torch.randn(2, 3, h, w), target, None)
    with pytest.raises(ValueError, match="sigma"):
        keypoint_heatmap_loss(scores, target, None, sigma=0.0)


def test_keypoint_head_returns_the_scores_its_points_come_from():
    head = HeatmapKeypointHead(hidden_size=LM, in_channels=D, num_keypoints=3)
    hidden, feats = torch.randn(2, LM), torch.randn(2, D, 4, 6)
    points, scores = head(hidden, feats, return_scores=True)
    assert scores.shape == (2, 3, 4, 6)
    torch.testing.assert_close(points, soft_argmax(scores)[0])
    torch.testing.assert_close(points, head(hidden, feats))
