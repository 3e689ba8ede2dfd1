"""Overlap and boundary metrics for binary masks: Dice, IoU, HD95 — per sample, then aggregated.

Inputs are boolean masks ``(N, H, W)`` (numpy arrays or torch tensors, any device; a single
``(H, W)`` mask is treated as ``N = 1``).  Integer masks must hold only 0/1; floating masks are
accepted only if every value is exactly 0 or 1 (threshold probabilities yourself: a silent
``> 0.5`` here would hide a calibration choice).  :func:`dice` and :func:`iou` also accept any
number of spatial axes ``(N, *spatial)``.

Every function returns a float64 numpy array ``(N,)`` of per-sample values; :func:`aggregate`
turns such an array (optionally with a region label per sample) into summary numbers.

Empty-mask convention (documented, and the same in every function):

============================  ==========  ==========  ===================================
case                          Dice        IoU         HD95
============================  ==========  ==========  ===================================
both masks empty              1.0         1.0         0.0
exactly one mask empty        0.0         0.0         NaN (undefined; or ``empty_penalty``)
============================  ==========  ==========  ===================================

``dice(..., empty="nan")`` / ``iou(..., empty="nan")`` instead return NaN when both masks are
empty (e.g. to score only studies that contain a lesion), ``empty="zero"`` returns 0.
:func:`aggregate` never averages NaN or inf silently: it reports the mean over finite values
*and* how many values were NaN / inf, so an undefined HD95 is visible rather than dropped.
(MONAI returns inf/NaN with a warning for the one-empty HD case; torchmetrics' ``dice_score``
has its own zero-division rules.)

HD95 (``percentile = 95``) is the symmetric 95th-percentile Hausdorff distance between mask
*boundaries*, in millimetres: boundary pixels are ``mask & ~erode(mask)`` with the 4-connected
(cross) structuring element and pixels outside the image counted as background (so a mask
touching the border has boundary there) — the definition of MONAI's ``get_mask_edges``.  For
each boundary pixel of one mask the exact Euclidean distance (scaled by the per-axis pixel
spacing) to the nearest boundary pixel of the other is taken; HD95 is
``max(P95(d(pred -> true)), P95(d(true -> pred)))`` with numpy's linear-interpolation
percentile, matching MONAI's ``compute_hausdorff_distance(percentile=95)``.  Distances are
computed exactly by brute force on boundary pixels (chunked numpy), no scipy needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["dice", "iou", "hd95", "hausdorff", "boundary", "aggregate", "EMPTY_CONVENTIONS"]

EMPTY_CONVENTIONS = ("one", "nan", "zero")
"""Values of ``empty=`` for Dice / IoU when both masks are empty: 1.0, NaN or 0.0."""

_CHUNK = 1 << 22  # max pairwise distances held in memory at once (32 MiB of float64)


# ----------------------------------------------------------------------------- input handling
def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor (any device)
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def as_masks(masks: Any, name: str = "masks") -> np.ndarray:
    """``(N, *spatial)`` boolean numpy array from an array / tensor of 0/1 values.

    A 2-D ``(H, W)`` input becomes ``(1, H, W)``.  Raises ``ValueError`` for 0-D/1-D input or
    non-binary values.
    """
    arr = _to_numpy(masks)
    if arr.ndim < 2:
        raise ValueError(f"{name} must be (N, H, W) or (H, W), got shape {arr.shape}")
    if arr.ndim == 2:
        arr = arr[None]
    if arr.dtype == bool:
        return arr
    if not (np.issubdtype(arr.dtype, np.number)):
        raise ValueError(f"{name} must be boolean or 0/1 numeric, got dtype {arr.dtype}")
    if arr.size and not np.isin(arr, (0, 1)).all():
        raise ValueError(f"{name} must contain only 0/1 (threshold probabilities first), "
                         f"got values in [{arr.min()}, {arr.max()}]")
    return arr.astype(bool)


def _pair(pred_masks: Any, true_masks: Any) -> tuple[np.ndarray, np.ndarray]:
    pred = as_masks(pred_masks, "pred_masks")
    true = as_masks(true_masks, "true_masks")
    if pred.shape != true.shape:
        raise ValueError(f"pred_masks {pred.shape} and true_masks {true.shape} differ in shape")
    return pred, true


def _empty_value(empty: str) -> float:
    if empty not in EMPTY_CONVENTIONS:
        raise ValueError(f"empty must be one of {EMPTY_CONVENTIONS}, got {empty!r}")
    return {"one": 1.0, "nan": float("nan"), "zero": 0.0}[empty]


# ----------------------------------------------------------------------------- overlap
def _counts(pred: np.ndarray, true: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    axes = tuple(range(1, pred.ndim))
    inter = np.logical_and(pred, true).sum(axis=axes, dtype=np.int64)
    return inter, pred.sum(axis=axes, dtype=np.int64), true.sum(axis=axes, dtype=np.int64)


def dice(pred_masks: Any, true_masks: Any, empty: str = "one") -> np.ndarray:
    """Per-sample Dice ``2|P∩T| / (|P| + |T|)``.

    Args:
        pred_masks: ``(N, *spatial)`` (or ``(H, W)``) boolean / 0-1 array or tensor.
        true_masks: same shape.
        empty: value when *both* masks are empty: ``"one"`` (1.0, default), ``"nan"``, or
            ``"zero"``.  One empty mask always gives 0.0.

    Returns:
        ``(N,)`` float64.
    """
    pred, true = _pair(pred_masks, true_masks)
    inter, p, t = _counts(pred, true)
    denom = p + t
    out = np.full(pred.shape[0], _empty_value(empty), dtype=np.float64)
    ok = denom > 0
    out[ok] = 2.0 * inter[ok] / denom[ok]
    return out


def iou(pred_masks: Any, true_masks: Any, empty: str = "one") -> np.ndarray:
    """Per-sample IoU (Jaccard) ``|P∩T| / |P∪T|``; shapes and ``empty`` as in :func:`dice`.

    Returns:
        ``(N,)`` float64.
    """
    pred, true = _pair(pred_masks, true_masks)
    inter, p, t = _counts(pred, true)
    union = p + t - inter
    out = np.full(pred.shape[0], _empty_value(empty), dtype=np.float64)
    ok = union > 0
    out[ok] = inter[ok] / union[ok]
    return out


# ----------------------------------------------------------------------------- boundaries
def boundary(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels of one mask ``(*spatial)``: ``mask & ~erode(mask)``.

    Erosion uses the cross (face-connected) structuring element with background outside the
    array, like ``scipy.ndimage.binary_erosion`` defaults (hence MONAI's edges).
    """
    mask = np.asarray(mask, dtype=bool)
    padded = np.pad(mask, 1, constant_values=False)
    eroded = mask.copy()
    centre = tuple(slice(1, -1) for _ in range(mask.ndim))
    for axis in range(mask.ndim):
        for shift in (0, 2):
            idx = list(centre)
            idx[axis] = slice(shift, shift + mask.shape[axis])
            eroded &= padded[tuple(idx)]
    return mask & ~eroded


def _nearest(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """For each row of ``src`` ``(A, D)`` the Euclidean distance to the nearest row of ``dst``
    ``(B, D)`` (exact; chunked so at most ``_CHUNK`` pairs are held)."""
    out = np.empty(len(src), dtype=np.float64)
    step = max(1, _CHUNK // max(1, len(dst)))
    for start in range(0, len(src), step):
        block = src[start:start + step]
        d2 = ((block[:, None, :] - dst[None, :, :]) ** 2).sum(-1)
        out[start:start + step] = np.sqrt(d2.min(axis=1))
    return out


def surface_distances(pred: np.ndarray, true: np.ndarray,
                      spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Directed boundary distances (mm) ``pred -> true`` and ``true -> pred`` of one sample.

    ``pred``/``true``: ``(*spatial)`` boolean, both non-empty; ``spacing``: mm per pixel along
    each spatial axis (``(row, col)`` for 2-D).
    """
    scale = np.asarray(spacing, dtype=np.float64)
    bp = np.argwhere(boundary(pred)) * scale
    bt = np.argwhere(boundary(true)) * scale
    return _nearest(bp, bt), _nearest(bt, bp)


def _spacings(spacing_mm: Any, n: int, ndim: int) -> np.ndarray:
    """``(N, ndim)`` per-sample per-axis spacing from a scalar, ``(N,)`` or ``(N, ndim)``."""
    s = _to_numpy(spacing_mm if spacing_mm is not None else 1.0).astype(np.float64)
    if s.ndim == 0:
        return np.full((n, ndim), float(s))
    if s.ndim == 1 and s.shape[0] == n:
        return np.repeat(s[:, None], ndim, axis=1)
    if s.shape == (n, ndim):
        return s
    raise ValueError(f"spacing_mm must be a float, ({n},) per sample, or ({n}, {ndim}) per "
                     f"sample and axis; got shape {s.shape}")


def hausdorff(pred_masks: Any, true_masks: Any, spacing_mm: Any = 1.0, percentile: float = 95.0,
              empty_penalty: float | None = None) -> np.ndarray:
    """Per-sample symmetric percentile Hausdorff distance between mask boundaries, in mm.

    Args:
        pred_masks: ``(N, *spatial)`` (or ``(H, W)``) boolean / 0-1 array or tensor.
        true_masks: same shape.
        spacing_mm: mm per pixel: a float (all samples, isotropic), ``(N,)`` (per sample,
            isotropic, e.g. ``UltrasoundSample.pixel_spacing``), or ``(N, ndim)`` (per sample and
            axis, ``(row, col)`` order).  ``1.0`` gives pixels.
        percentile: 95 for HD95, 100 for the classic Hausdorff distance.
        empty_penalty: value when exactly one mask is empty; ``None`` (default) gives NaN.
            Both empty gives 0.0.

    Returns:
        ``(N,)`` float64.
    """
    pred, true = _pair(pred_masks, true_masks)
    if not 0 <= percentile <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {percentile}")
    n = pred.shape[0]
    spacing = _spacings(spacing_mm, n, pred.ndim - 1)
    out = np.empty(n, dtype=np.float64)
    for i in range(n):
        p_any, t_any = pred[i].any(), true[i].any()
        if not p_any and not t_any:
            out[i] = 0.0
        elif not (p_any and t_any):
            out[i] = float("nan") if empty_penalty is None else float(empty_penalty)
        else:
            d_pt, d_tp = surface_distances(pred[i], true[i], spacing[i])
            out[i] = max(np.percentile(d_pt, percentile), np.percentile(d_tp, percentile))
    return out


def hd95(pred_masks: Any, true_masks: Any, spacing_mm: Any = 1.0,
         empty_penalty: float | None = None) -> np.ndarray:
    """Per-sample HD95 in mm: :func:`hausdorff` with ``percentile=95``.

    Args:
        pred_masks: ``(N, H, W)`` (or ``(H, W)``, or ``(N, *spatial)``) boolean / 0-1.
        true_masks: same shape.
        spacing_mm: float, ``(N,)`` or ``(N, ndim)`` mm per pixel (see :func:`hausdorff`).
        empty_penalty: value for exactly one empty mask (default NaN); both empty -> 0.0.

    Returns:
        ``(N,)`` float64.
    """
    return hausdorff(pred_masks, true_masks, spacing_mm=spacing_mm, percentile=95.0,
                     empty_penalty=empty_penalty)


# ----------------------------------------------------------------------------- aggregation
def _summary(values: np.ndarray) -> dict[str, float | int]:
    finite = values[np.isfinite(values)]
    return {
        "mean": float(finite.mean()) if finite.size else float("nan"),
        "std": float(finite.std()) if finite.size else float("nan"),
        "median": float(np.median(finite)) if finite.size else float("nan"),
        "n": int(values.size),
        "n_finite": int(finite.size),
        "n_nan": int(np.isnan(values).sum()),
        "n_inf": int(np.isinf(values).sum()),
    }


def aggregate(values: Any, regions: Sequence[str] | None = None) -> dict[str, Any]:
    """Summary of per-sample metric values, overall and per region.

    Args:
        values: ``(N,)`` per-sample values (e.g. from :func:`dice` or :func:`hd95`).
        regions: optional ``N`` group labels (e.g. ``UltrasoundSample.region``).

    Returns:
        ``{"mean", "std", "median", "n", "n_finite", "n_nan", "n_inf"}`` where the statistics
        are over *finite* values only and the counts say how many were left out (never a
        silent drop); with ``regions``, also ``"per_region": {region: same dict}`` in sorted
        region order.  With no finite values the statistics are NaN.
    """
    v = _to_numpy(values).astype(np.float64).reshape(-1)
    out: dict[str, Any] = _summary(v)
    if regions is not None:
        regions = list(regions)
        if len(regions) != v.size:
            raise ValueError(f"{len(regions)} regions for {v.size} values")
        labels = np.asarray(regions, dtype=object)
        out["per_region"] = {r: _summary(v[labels == r]) for r in sorted(set(regions))}
    return out
