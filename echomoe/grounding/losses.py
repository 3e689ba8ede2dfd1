"""Grounding losses, each returned as a dict of named scalar tensors (the total is their sum).

* :func:`mask_loss` -> ``{"seg_bce", "seg_dice"}`` (LISA: ``2.0 * BCE + 0.5 * Dice``)
* :func:`box_loss` -> ``{"box_l1", "box_giou"}``
* :func:`keypoint_loss` -> ``{"keypoint"}``
* :func:`keypoint_heatmap_loss` -> ``{"keypoint_heatmap"}`` (heatmap keypoint heads; optional)
* :func:`match_point_pairs` (no loss): the target order of unordered point pairs (calipers)
  that is nearer the prediction, applied before the keypoint losses

The weights are applied inside (so ``sum(losses.values())`` is the grounding total); with the
weights at 1 the values are the plain criteria.  Samples whose ``has_*`` flag is False are
removed by boolean indexing *before* any arithmetic, so their labels (zeros, or even NaN) and
their predictions contribute nothing, not even to gradients.  With no valid sample every entry
is an exact zero that is still connected to the prediction (its gradient is zero), so a
backward pass and DDP see the same graph on every rank.

Axis legend: ``B`` batch, ``(H, W)`` mask size, ``K`` keypoints, ``N`` valid samples.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from echomoe.grounding.heads import boxes_to_xyxy
from echomoe.grounding.spatial_heads import cell_centres


def _valid(name: str, has: Tensor | None, batch: int, device) -> Tensor:
    if has is None:
        return torch.ones(batch, dtype=torch.bool, device=device)
    if has.shape != (batch,):
        raise ValueError(f"{name} must be ({batch},), got {tuple(has.shape)}")
    return has.to(device=device, dtype=torch.bool)


def _point_mask(has: Tensor | None, batch: int, points: int, device) -> Tensor:
    """``(B, K)`` bool of the supervised points from ``(B,)`` sample or ``(B, K)`` point flags."""
    if has is not None and has.dim() == 2:
        if has.shape != (batch, points):
            raise ValueError(f"has_keypoints must be ({batch},) or ({batch}, {points}), got "
                             f"{tuple(has.shape)}")
        return has.to(device=device, dtype=torch.bool)
    return _valid("has_keypoints", has, batch, device)[:, None].expand(batch, points)


def _check_same(pred: Tensor, target: Tensor, what: str) -> None:
    if pred.shape != target.shape:
        raise ValueError(f"{what}: prediction {tuple(pred.shape)} and target "
                         f"{tuple(target.shape)} differ")


def dice_loss(probs: Tensor, targets: Tensor, smooth: float = 1.0) -> Tensor:
    """Per-sample soft Dice loss: ``(N, ...)`` probabilities and targets -> ``(N,)``.

    ``1 - (2 * sum(p * t) + smooth) / (sum(p) + sum(t) + smooth)``.  Empty-target convention:
    an empty target and an (almost) empty prediction give ~0 (nothing to find, nothing found);
    an empty target with predicted mass ``m`` gives ``m / (m + smooth)``, so false positives
    on empty images are still penalised.  Identical binary masks give exactly 0; disjoint
    ones give ``1 - smooth / (|p| + |t| + smooth)``.
    """
    if smooth <= 0:
        raise ValueError(f"smooth must be > 0 (empty masks would divide by zero), got {smooth}")
    p, t = probs.flatten(1), targets.flatten(1)
    return 1 - (2 * (p * t).sum(1) + smooth) / (p.sum(1) + t.sum(1) + smooth)


def mask_loss(
    logits: Tensor,
    targets: Tensor,
    has_mask: Tensor | None,
    bce_weight: float = 2.0,
    dice_weight: float = 0.5,
    *,
    smooth: float = 1.0,
) -> dict[str, Tensor]:
    """Weighted BCE + Dice over the samples with a mask.

    Args:
        logits: ``(B, H, W)`` mask logits.
        targets: ``(B, H, W)`` in [0, 1].
        has_mask: ``(B,)`` bool (``None``: all valid).
        bce_weight, dice_weight: multipliers (LISA's 2.0 and 0.5 by default).
        smooth: Dice smoothing (see :func:`dice_loss`).

    Returns:
        ``{"seg_bce": bce_weight * mean_pixels_and_samples(BCE),
        "seg_dice": dice_weight * mean_samples(dice_loss)}``, computed in float32.
    """
    _check_same(logits, targets, "mask_loss")
    if logits.dim() != 3:
        raise ValueError(f"mask_loss expects (B, H, W) logits, got {tuple(logits.shape)}")
    keep = _valid("has_mask", has_mask, logits.shape[0], logits.device)
    x, t = logits[keep].float(), targets[keep].float()
    if x.shape[0] == 0:
        zero = x.sum() * 0.0
        return {"seg_bce": zero, "seg_dice": zero.clone()}
    bce = F.binary_cross_entropy_with_logits(x, t)
    dice = dice_loss(x.sigmoid(), t, smooth).mean()
    return {"seg_bce": bce_weight * bce, "seg_dice": dice_weight * dice}


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-7) -> Tensor:
    """Element-wise GIoU of ``(N, 4)`` ``(x0, y0, x1, y1)`` box pairs -> ``(N,)`` in [-1, 1].

    ``GIoU = IoU - (|C| - |U|) / |C|`` with ``C`` the smallest enclosing box.  Areas come from
    the corners (so identical boxes give exactly 1); the union and ``|C|`` are clamped at
    ``eps`` so degenerate (zero-area) boxes give finite values.
    """
    area1 = (boxes1[:, 2] - boxes1[:, 0]).clamp_min(0) * (boxes1[:, 3] - boxes1[:, 1]).clamp_min(0)
    area2 = (boxes2[:, 2] - boxes2[:, 0]).clamp_min(0) * (boxes2[:, 3] - boxes2[:, 1]).clamp_min(0)
    lt = torch.maximum(boxes1[:, :2], boxes2[:, :2])
    rb = torch.minimum(boxes1[:, 2:], boxes2[:, 2:])
    inter = (rb - lt).clamp_min(0).prod(-1)
    union = (area1 + area2 - inter).clamp_min(eps)
    enclose_lt = torch.minimum(boxes1[:, :2], boxes2[:, :2])
    enclose_rb = torch.maximum(boxes1[:, 2:], boxes2[:, 2:])
    enclose = (enclose_rb - enclose_lt).clamp_min(0).prod(-1).clamp_min(eps)
    return inter / union - (enclose - union) / enclose


def box_loss(
    pred: Tensor,
    target: Tensor,
    has_box: Tensor | None,
    *,
    l1_weight: float = 1.0,
    giou_weight: float = 1.0,
) -> dict[str, Tensor]:
    """L1 + GIoU loss on normalised ``(cx, cy, w, h)`` boxes.

    Args:
        pred, target: ``(B, 4)`` normalised ``(cx, cy, w, h)``.
        has_box: ``(B,)`` bool (``None``: all valid).
        l1_weight, giou_weight: multipliers (DETR uses 5 and 2).

    Returns:
        ``{"box_l1": l1_weight * mean |pred - target|`` (over valid boxes and the 4 values),
        ``"box_giou": giou_weight * mean(1 - GIoU)}`` (GIoU on the normalised xyxy corners).
    """
    _check_same(pred, target, "box_loss")
    if pred.dim() != 2 or pred.shape[1] != 4:
        raise ValueError(f"box_loss expects (B, 4) boxes, got {tuple(pred.shape)}")
    keep = _valid("has_box", has_box, pred.shape[0], pred.device)
    p, t = pred[keep].float(), target[keep].float()
    if p.shape[0] == 0:
        zero = p.sum() * 0.0
        return {"box_l1": zero, "box_giou": zero.clone()}
    l1 = (p - t).abs().mean()
    giou = (1 - generalized_box_iou(boxes_to_xyxy(p), boxes_to_xyxy(t))).mean()
    return {"box_l1": l1_weight * l1, "box_giou": giou_weight * giou}


def keypoint_loss(
    pred: Tensor, target: Tensor, has_keypoints: Tensor | None, *, weight: float = 1.0
) -> dict[str, Tensor]:
    """L1 on normalised keypoints.

    Args:
        pred, target: ``(B, K, 2)`` normalised ``(x, y)``.
        has_keypoints: ``(B,)`` bool per sample or ``(B, K)`` per point (a sample with fewer
            reference points than ``K``); ``None``: all valid.
        weight: multiplier.

    Returns:
        ``{"keypoint": weight * mean |pred - target|}`` over the valid points and ``(x, y)``.
    """
    _check_same(pred, target, "keypoint_loss")
    if pred.dim() != 3 or pred.shape[-1] != 2:
        raise ValueError(f"keypoint_loss expects (B, K, 2) points, got {tuple(pred.shape)}")
    keep = _point_mask(has_keypoints, pred.shape[0], pred.shape[1], pred.device)
    p, t = pred[keep].float(), target[keep].float()  # (valid points, 2)
    if p.shape[0] == 0:
        return {"keypoint": pred.sum() * 0.0}
    return {"keypoint": weight * (p - t).abs().mean()}


def match_point_pairs(pred: Tensor, target: Tensor, pairs, valid: Tensor | None = None) -> Tensor:
    """``target`` with the two points of each pair swapped wherever the swapped order is nearer
    ``pred``: the targets of *unordered* point pairs such as caliper endpoints.

    A caliper measures a length; which end is "start" is a naming convention (the synthetic
    benchmark: the smaller ``x``), and a convention that flips when a lesion turns past vertical
    asks a head to tell two nearly equal configurations apart.  Trained on the fixed order, a
    soft-argmax head hedges between both ends and its calipers shrink towards the centre.
    Matching each pair to the prediction first (DETR-style assignment, over the 2 orders of each
    pair) lets every query settle on one end.

    Args:
        pred, target: ``(B, K, 2)`` points (any common coordinates).
        pairs: ``(a, b)`` index pairs into ``K`` (e.g. ``grounding_config["measure_pairs"]``);
            pairs with an index ``>= K`` are ignored.
        valid: ``(B, K)`` bool, the points that exist; a pair is swapped only where both of its
            points do (``None``: all).

    Returns:
        ``(B, K, 2)`` target, a new tensor (the choice carries no gradient; ``target`` is
        unchanged).  L1 distance decides; a tie keeps the given order.
    """
    _check_same(pred, target, "match_point_pairs")
    if pred.dim() != 3 or pred.shape[-1] != 2:
        raise ValueError(f"match_point_pairs expects (B, K, 2) points, got {tuple(pred.shape)}")
    b, k, _ = pred.shape
    keep = torch.ones(b, k, dtype=torch.bool, device=pred.device) if valid is None \
        else _point_mask(valid, b, k, pred.device)
    out = target.clone()
    p = pred.detach()
    for a, c in pairs:
        a, c = int(a), int(c)
        if not (0 <= a < k and 0 <= c < k) or a == c:
            continue
        kept = (p[:, a] - out[:, a]).abs().sum(-1) + (p[:, c] - out[:, c]).abs().sum(-1)
        swapped = (p[:, a] - out[:, c]).abs().sum(-1) + (p[:, c] - out[:, a]).abs().sum(-1)
        swap = (swapped < kept) & keep[:, a] & keep[:, c]  # (B,)
        out[swap, a], out[swap, c] = out[swap, c].clone(), out[swap, a].clone()
    return out


def keypoint_heatmap_loss(
    scores: Tensor, target: Tensor, has_keypoints: Tensor | None, *, sigma: float = 1.0,
    weight: float = 1.0,
) -> dict[str, Tensor]:
    """Heatmap supervision for soft-argmax keypoint heads: ``KL(target || softmax(scores))``.

    The target map of each keypoint is a Gaussian of ``sigma`` cells around it, normalised over
    the map (CenterNet-style).  The soft-argmax L1 of :func:`keypoint_loss` only sees the
    *mean* of the predicted map, so a broad or two-peaked map with the right mean costs
    nothing; this loss makes the mass sit at the point.  0 when the predicted map equals the
    target map.

    Args:
        scores: ``(B, K, h, w)`` heatmap logits (the head's ``return_scores=True`` output).
        target: ``(B, K, 2)`` normalised ``(x, y)``; cell ``j`` of a ``w``-wide map is centred
            at ``(j + 0.5) / w``.
        has_keypoints: ``(B,)`` or ``(B, K)`` bool, as :func:`keypoint_loss` (``None``: all
            valid).
        sigma: target width in cells, > 0.
        weight: multiplier.

    Returns:
        ``{"keypoint_heatmap": weight * mean KL}`` over the valid keypoints.
    """
    if scores.dim() != 4 or target.dim() != 3 or scores.shape[:2] != target.shape[:2] \
            or target.shape[-1] != 2:
        raise ValueError(f"keypoint_heatmap_loss expects (B, K, h, w) scores and (B, K, 2) "
                         f"points, got {tuple(scores.shape)} and {tuple(target.shape)}")
    if sigma <= 0:
        raise ValueError(f"keypoint_heatmap_loss needs sigma > 0, got {sigma}")
    keep = _point_mask(has_keypoints, scores.shape[0], scores.shape[1], scores.device)
    s, t = scores[keep].float(), target[keep].float()  # (N, h, w), (N, 2): the valid points
    if s.shape[0] == 0:
        return {"keypoint_heatmap": scores.sum() * 0.0}
    h, w = s.shape[-2:]
    centres = cell_centres(h, w, device=s.device, dtype=s.dtype)  # (h*w, 2)
    offset = (centres - t.unsqueeze(-2)) * torch.tensor([w, h], device=s.device, dtype=s.dtype)
    goal = (-offset.pow(2).sum(-1) / (2 * sigma**2)).softmax(dim=-1)  # (N, h*w)
    kl = F.kl_div(s.flatten(1).log_softmax(dim=-1), goal, reduction="none").sum(-1)
    return {"keypoint_heatmap": weight * kl.mean()}
