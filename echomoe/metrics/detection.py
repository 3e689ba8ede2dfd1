"""Box metrics for single-box grounding: per-sample IoU and Acc@threshold.

Each sample has one predicted and one reference box, so :func:`box_iou` is *element-wise*
(``(N, 4), (N, 4) -> (N,)``), not the ``(N, M)`` pairwise matrix of ``torchvision.ops.box_iou``.

Formats (``fmt=``):

* ``"cxcywh"`` (default): normalised ``(cx, cy, w, h)`` in [0, 1], the convention of
  :class:`echomoe.grounding.heads.BoxHead` and the collator.
* ``"xyxy"``: ``(x0, y0, x1, y1)`` box *edges* in any one unit (normalised or pixels).  The
  schema's inclusive pixel boxes ``[x_min, y_min, x_max, y_max]`` have edges
  ``x_max + 1, y_max + 1``: convert first (``inclusive_to_edges``), or the IoU of small boxes
  comes out too low.

IoU is scale invariant, so normalised and pixel coordinates give the same value as long as
``pred`` and ``target`` use the same unit (and for normalised boxes a non-square image only
stretches both boxes alike).  Degenerate boxes (width or height <= 0, after clipping negative
extents to 0) have area 0; a pair with zero union gets IoU 0.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["box_iou", "box_accuracy", "to_xyxy", "inclusive_to_edges"]

BOX_FORMATS = ("cxcywh", "xyxy")


def _boxes(x: Any, name: str) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ValueError(f"{name} must be (N, 4) or (4,), got shape {arr.shape}")
    return arr


def to_xyxy(boxes: Any, fmt: str = "cxcywh") -> np.ndarray:
    """``(N, 4)`` boxes in ``fmt`` -> ``(N, 4)`` float64 ``(x0, y0, x1, y1)`` edges."""
    b = _boxes(boxes, "boxes")
    if fmt == "xyxy":
        return b
    if fmt == "cxcywh":
        cx, cy, w, h = b.T
        return np.stack((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), axis=1)
    raise ValueError(f"fmt must be one of {BOX_FORMATS}, got {fmt!r}")


def inclusive_to_edges(boxes: Any) -> np.ndarray:
    """Schema pixel boxes ``[x_min, y_min, x_max, y_max]`` (inclusive indices) -> ``xyxy``
    edges ``[x_min, y_min, x_max + 1, y_max + 1]``; ``(N, 4)`` or ``(4,)`` -> ``(N, 4)``."""
    return _boxes(boxes, "boxes") + np.array([0.0, 0.0, 1.0, 1.0])


def box_iou(pred: Any, target: Any, fmt: str = "cxcywh") -> np.ndarray:
    """Element-wise IoU of matching boxes.

    Args:
        pred: ``(N, 4)`` (or ``(4,)``) array / tensor in ``fmt``.
        target: same shape and format.
        fmt: ``"cxcywh"`` (normalised, default) or ``"xyxy"`` (edges).

    Returns:
        ``(N,)`` float64 IoU in [0, 1].
    """
    p, t = to_xyxy(pred, fmt), to_xyxy(target, fmt)
    if p.shape != t.shape:
        raise ValueError(f"pred {p.shape} and target {t.shape} differ in shape")
    area_p = np.clip(p[:, 2] - p[:, 0], 0, None) * np.clip(p[:, 3] - p[:, 1], 0, None)
    area_t = np.clip(t[:, 2] - t[:, 0], 0, None) * np.clip(t[:, 3] - t[:, 1], 0, None)
    iw = np.clip(np.minimum(p[:, 2], t[:, 2]) - np.maximum(p[:, 0], t[:, 0]), 0, None)
    ih = np.clip(np.minimum(p[:, 3], t[:, 3]) - np.maximum(p[:, 1], t[:, 1]), 0, None)
    inter = iw * ih
    union = area_p + area_t - inter
    out = np.zeros(len(p), dtype=np.float64)
    ok = union > 0
    out[ok] = inter[ok] / union[ok]
    return out


def box_accuracy(pred: Any, target: Any, threshold: float = 0.5, fmt: str = "cxcywh") -> float:
    """Acc@threshold: the fraction of samples with ``box_iou >= threshold`` (Acc@0.5 default).

    Args:
        pred: ``(N, 4)`` boxes; target: same; fmt: as in :func:`box_iou`.

    Returns:
        A float in [0, 1]; NaN for ``N = 0``.
    """
    values = box_iou(pred, target, fmt)
    if values.size == 0:
        return float("nan")
    return float((values >= threshold).mean())
