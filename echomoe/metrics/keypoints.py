"""Keypoint and measurement errors: radial error (px and mm) and caliper measurement error.

Coordinate convention (:mod:`echomoe.grounding.heads`): keypoints are normalised ``(x, y)`` in
[0, 1] and ``image_sizes`` are ``(H, W)`` of the original key frame, so a displacement
``(dx, dy)`` is ``hypot(dx * W, dy * H)`` pixels (the half-pixel offset of
``keypoints_to_pixels`` cancels in differences) and ``pixel_spacing`` mm per pixel turns pixels
into mm.  With ``image_sizes=None`` the points are taken to be pixel coordinates already.

Axis legend: ``B`` samples, ``K`` keypoints per sample.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["radial_error", "measurement_error"]


def _np(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _per_sample(value: Any, b: int, width: int, name: str) -> np.ndarray:
    """``(B, width)`` from a scalar, ``(width,)`` (shared), ``(B,)`` (width 1) or ``(B, width)``."""
    v = _np(value)
    if v.ndim == 0:
        return np.full((b, width), float(v))
    if v.ndim == 1 and width > 1 and v.shape[0] == width:
        return np.broadcast_to(v, (b, width)).copy()
    if v.ndim == 1 and width == 1 and v.shape[0] == b:
        return v[:, None]
    if v.shape == (b, width):
        return v
    expected = f"a scalar, ({width},) or ({b}, {width})" if width > 1 else f"a scalar or ({b},)"
    raise ValueError(f"{name} has shape {v.shape}; expected {expected}")


def radial_error(pred_points: Any, true_points: Any, image_sizes: Any = None,
                 pixel_spacing: Any = None) -> dict[str, np.ndarray]:
    """Euclidean distance between predicted and true keypoints, in pixels and mm.

    Args:
        pred_points: ``(B, K, 2)`` (or ``(K, 2)`` for one sample) normalised ``(x, y)``; pixel
            coordinates when ``image_sizes`` is ``None``.
        true_points: same shape.
        image_sizes: ``(B, 2)`` or one ``(H, W)``; ``None`` = points are in pixels.
        pixel_spacing: mm per pixel, a float or ``(B,)``; ``None`` or NaN entries give NaN mm.

    Returns:
        ``{"px": (B, K), "mm": (B, K)}`` float64 arrays.  Average with
        :func:`echomoe.metrics.segmentation.aggregate` (which reports NaN counts).
    """
    p, t = _np(pred_points), _np(true_points)
    if p.ndim == 2 and t.ndim == 2:  # one sample
        p, t = p[None], t[None]
    if p.shape != t.shape or p.ndim != 3 or p.shape[-1] != 2:
        raise ValueError(f"points must both be (B, K, 2); got {p.shape} and {t.shape}")
    b = p.shape[0]
    delta = p - t
    if image_sizes is not None:
        hw = _per_sample(image_sizes, b, 2, "image_sizes")
        delta = delta * hw[:, None, ::-1]  # (dx * W, dy * H)
    px = np.hypot(delta[..., 0], delta[..., 1])
    spacing = _per_sample(np.nan if pixel_spacing is None else pixel_spacing, b, 1,
                          "pixel_spacing")
    return {"px": px, "mm": px * spacing}


def measurement_error(pred_mm: Any, true_mm: Any) -> dict[str, np.ndarray]:
    """Signed and absolute (mm) and relative (%) error of measurements such as caliper lengths.

    Args:
        pred_mm: ``(N,)`` (or any shape) predicted measurements in mm.
        true_mm: same shape, reference measurements in mm.

    Returns:
        ``{"signed_mm": pred - true, "abs_mm": |pred - true|,
        "rel_pct": 100 * |pred - true| / |true|}``, float64 arrays of the input shape
        (``signed_mm < 0``: under-measured); ``rel_pct`` is NaN where ``true == 0`` (undefined).
    """
    p, t = _np(pred_mm), _np(true_mm)
    if p.shape != t.shape:
        raise ValueError(f"pred_mm {p.shape} and true_mm {t.shape} differ in shape")
    signed = p - t
    abs_mm = np.abs(signed)
    rel = np.full(abs_mm.shape, np.nan)
    nz = t != 0
    rel[nz] = 100.0 * abs_mm[nz] / np.abs(t[nz])
    return {"signed_mm": signed, "abs_mm": abs_mm, "rel_pct": rel}
