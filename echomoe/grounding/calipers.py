"""Calipers from a mask: the long and short axis a sonographer measures on a structure.

The synthetic benchmark defines its caliper keypoints by :func:`mask_calipers` of the lesion
mask, and a model can measure the same way: segment the structure, then span its outline
(:func:`calipers_near`, used by the evaluation's ``measure="mask"`` protocol).  A soft-argmax
keypoint head, by contrast, hedges between the possible ends of a roundish structure's long axis
and its calipers shrink towards the centre; a mask has no such ambiguity.

Coordinates are ``(x, y)`` in pixel-index units of the mask (pixel ``i`` spans
``[i - 0.5, i + 0.5]``).  Axis legend: ``H, W`` mask rows / columns, ``K`` points.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from echomoe.metrics.segmentation import boundary

CALIPER_NAMES = ("long_axis_start", "long_axis_end", "short_axis_start", "short_axis_end")


def mask_calipers(mask: np.ndarray) -> dict[str, tuple[float, float]]:
    """Long- and short-axis caliper endpoints ``(x, y)`` of a non-empty ``(H, W)`` bool mask.

    Long axis: the two boundary pixels farthest apart (start = smaller ``x``, then ``y``).
    Short axis: over 1-px bins of position along the long axis, the pair of boundary pixels
    with the widest spread perpendicular to it (start = the one nearer the skin).
    Each endpoint then moves half a pixel outwards along its axis, so the calipers sit on the
    outer pixel edges as a sonographer places them: a structure ``n`` pixels across measures
    ``n`` pixels (a one-pixel-thick stone is one pixel thick, not zero).
    Returns the four points keyed by :data:`CALIPER_NAMES`, in that order.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2 or not mask.any():
        raise ValueError(f"mask_calipers needs a non-empty (H, W) mask, got shape "
                         f"{mask.shape} with {int(mask.sum())} pixels set")
    ys, xs = np.nonzero(boundary(mask))
    pts = np.stack([xs, ys], 1).astype(np.float64)
    diff = pts[:, None, :] - pts[None, :, :]
    d2 = np.einsum("ijk,ijk->ij", diff, diff)
    i, j = divmod(int(np.argmax(d2)), len(pts))
    a, b = sorted([(float(pts[i, 0]), float(pts[i, 1])), (float(pts[j, 0]), float(pts[j, 1]))])
    axis = np.subtract(b, a)
    norm = np.hypot(*axis)
    u = axis / norm if norm > 0 else np.array([1.0, 0.0])
    v = np.array([-u[1], u[0]])
    bins = np.round(pts @ u).astype(np.int64)
    pv = pts @ v
    order = np.lexsort((pv, bins))
    sb = bins[order]
    starts = np.flatnonzero(np.r_[True, sb[1:] != sb[:-1]])
    ends = np.r_[starts[1:] - 1, len(sb) - 1]
    spread = pv[order[ends]] - pv[order[starts]]
    k = int(np.argmax(spread))
    p, q = pts[order[starts[k]]] - 0.5 * v, pts[order[ends[k]]] + 0.5 * v
    a, b = np.subtract(a, 0.5 * u), np.add(b, 0.5 * u)
    s0, s1 = sorted([tuple(p.tolist()), tuple(q.tolist())], key=lambda t: (t[1], t[0]))
    points = (tuple(a.tolist()), tuple(b.tolist()), s0, s1)
    return dict(zip(CALIPER_NAMES, points, strict=True))


def nearest_component(mask: np.ndarray, point: np.ndarray) -> np.ndarray | None:
    """The 8-connected component of ``mask (H, W)`` with the pixel nearest ``point (x, y)``;
    ``None`` when the mask is empty."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return None
    labels, _ = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    ys, xs = np.nonzero(mask)
    k = int(np.argmin(np.hypot(xs - point[0], ys - point[1])))
    return labels == labels[ys[k], xs[k]]


def calipers_near(mask: np.ndarray, points: np.ndarray, scale: tuple[float, float] = (1.0, 1.0)
                  ) -> np.ndarray | None:
    """``(4, 2)`` calipers (:data:`CALIPER_NAMES` order) of the component of ``mask (H, W)``
    nearest the centre of ``points (K, 2)``; ``None`` when the mask is empty.

    ``points`` and the result are in the coordinates of an image ``scale = (sy, sx)`` times
    the mask's size (an ``(H0, W0)`` original image: ``(H0 / H, W0 / W)``); the mask of a
    structure the points were meant to span (a keypoint head's calipers) picks the component,
    so a stray blob elsewhere is never measured.
    """
    sy, sx = scale
    points = np.asarray(points, dtype=np.float64)
    centre = np.array([(points[:, 0].mean() + 0.5) / sx - 0.5,
                       (points[:, 1].mean() + 0.5) / sy - 0.5])
    component = nearest_component(mask, centre)
    if component is None:
        return None
    out = np.asarray(list(mask_calipers(component).values()), dtype=np.float64)
    return np.stack([(out[:, 0] + 0.5) * sx - 0.5, (out[:, 1] + 0.5) * sy - 0.5], 1)
