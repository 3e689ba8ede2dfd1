"""HC18 (fetal head circumference) -> :class:`UltrasoundSample`.

Layout::

    root/training_set/000_HC.png               the image
    root/training_set/000_HC_Annotation.png    the head's ellipse, drawn as an outline
    root/training_set_pixel_size_and_HC.csv    filename, pixel size(mm), head circumference (mm)

(the CSV may also sit inside ``training_set/``).  Each CSV row becomes a sample: region
``"gynaecology"``, the image as a uint8 array, ``pixel_spacing`` and
``attributes["head_circumference_mm"]`` from the CSV, ``masks["head"]`` = the outline filled
row by row (between the outermost outline pixels, exact for a convex outline), a ``"head"``
box from that mask, and keypoints ``major_axis_1/2`` and ``minor_axis_1/2``: the ends of the
ellipse axes estimated from the mask's second moments (semi-axis = 2 sqrt(eigenvalue)), each pair
ordered by x (then y).  Images in the folder without a CSV row are reported as bad records.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from echomoe.data.formats.errors import (
    DuplicateIdError,
    FormatError,
    LoadResult,
    MaskLabelError,
    MissingFieldError,
    MissingMaskError,
    check_mask_shape,
    csv_rows,
    mask_bbox,
    read_image,
    to_float,
)
from echomoe.data.schema import UltrasoundSample

CSV_NAME = "training_set_pixel_size_and_HC.csv"
_COLUMNS = {  # normalised header -> key
    "filename": "filename",
    "pixelsize(mm)": "pixel_size",
    "headcircumference(mm)": "hc",
}
_HEADERS = {"filename": "filename", "pixel_size": "pixel size(mm)", "hc": "head circumference (mm)"}


def fill_outline(outline: np.ndarray) -> np.ndarray:
    """Fill a closed convex ``(H, W)`` bool outline: per row, every pixel between its outermost
    outline pixels; returns an ``(H, W)`` bool mask."""
    mask = np.zeros_like(outline, dtype=bool)
    rows = np.flatnonzero(outline.any(axis=1))
    for y in rows:
        xs = np.flatnonzero(outline[y])
        mask[y, xs[0]: xs[-1] + 1] = True
    return mask


def ellipse_axes(mask: np.ndarray) -> dict[str, tuple[float, float]]:
    """Endpoints of the major and minor axes of the ellipse that has ``mask``'s moments.

    ``mask`` is a non-empty ``(H, W)`` bool array.  Returns ``major_axis_1``, ``major_axis_2``,
    ``minor_axis_1``, ``minor_axis_2``: ``(x, y)`` pixel endpoints, each pair sorted by ``x``.

    For a filled ellipse with semi-axes ``a >= b`` the coordinate covariance has eigenvalues
    ``a^2/4`` and ``b^2/4``, so ``a = 2 sqrt(lambda_max)`` along its eigenvector.
    """
    ys, xs = np.nonzero(mask)
    centre = np.array([xs.mean(), ys.mean()])
    cov = np.cov(np.stack([xs, ys]).astype(np.float64), bias=True)
    eigvals, eigvecs = np.linalg.eigh(cov)  # ascending
    out = {}
    for name, k in (("major_axis", 1), ("minor_axis", 0)):
        half = 2.0 * np.sqrt(max(eigvals[k], 0.0)) * eigvecs[:, k]
        ends = sorted([tuple(centre - half), tuple(centre + half)])
        for i, (x, y) in enumerate(ends, start=1):
            out[f"{name}_{i}"] = (round(float(x), 3), round(float(y), 3))
    return out


def _find_csv(root: Path) -> Path:
    for candidate in (root / CSV_NAME, root / "training_set" / CSV_NAME):
        if candidate.is_file():
            return candidate
    raise FormatError(f"{CSV_NAME} not found (looked in the folder and in training_set/)",
                      file=root)


def _load_case(folder: Path, row: dict[str, str]) -> UltrasoundSample:
    filename = row.get("filename") or ""
    if not filename:
        raise MissingFieldError("empty 'filename'")
    spacing = to_float(row.get("pixel_size"), "pixel size(mm)", positive=True)
    hc = to_float(row.get("hc"), "head circumference (mm)", positive=True)
    image_path = folder / filename
    image = read_image(image_path)
    ann_path = image_path.with_name(f"{image_path.stem}_Annotation{image_path.suffix}")
    if not ann_path.is_file():
        raise MissingMaskError(f"annotation file {str(ann_path)!r} does not exist")
    outline = read_image(ann_path, "annotation") > 127
    check_mask_shape(outline.shape, image.shape, ann_path)
    mask = fill_outline(outline)
    if mask.sum() < 5:
        raise MaskLabelError(f"annotation {str(ann_path)!r} has no ellipse outline")
    return UltrasoundSample(
        id=image_path.stem,
        images=[image],
        region="gynaecology",
        pixel_spacing=spacing,
        masks={"head": mask},
        boxes=[{"label": "head", "bbox": mask_bbox(mask)}],
        keypoints=ellipse_axes(mask),
        attributes={"head_circumference_mm": hc},
        source="hc18",
    )


def load_hc18(root: str | Path, strict: bool = True) -> LoadResult:
    """Load the HC18 training set from ``root`` (see the module docstring).

    Args:
        root: folder holding ``training_set/`` and the pixel-size/HC CSV.
        strict: raise on the first bad case; else skip it and list it in ``skipped``.  A CSV
            missing a column is then reported as one skipped entry (line 1).

    Returns:
        A :class:`LoadResult` in CSV row order.

    Raises:
        FormatError: a subclass naming the file and the CSV line / image (``strict``); whatever
            ``strict`` is, when the folder or the CSV is missing.
    """
    root = Path(root)
    folder = root / "training_set"
    if not folder.is_dir():
        raise FormatError("no training_set/ folder", file=root)
    csv_path = _find_csv(root)
    result, listed, header_ok = LoadResult(), set(), False
    lines: dict[str, int] = {}  # filename -> the CSV line that lists it first
    guard = result.guard(strict, csv_path, line=1)
    with guard, csv_path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = next(csv_rows(reader, csv_path), [])
        keys = [_COLUMNS.get("".join(h.split()).lower()) for h in header]
        missing = [_HEADERS[k] for k in _HEADERS if k not in keys]
        if missing:
            raise MissingFieldError(
                f"missing column(s) {', '.join(map(repr, missing))} (have: {', '.join(header)})"
            )
        header_ok = True
        for values in csv_rows(reader, csv_path):
            if not any(v.strip() for v in values):
                continue
            row = {k: v.strip() for k, v in zip(keys, values, strict=False) if k is not None}
            name = Path(row.get("filename") or "?").stem
            with result.guard(strict, csv_path, name, reader.line_num):
                first = lines.setdefault(row.get("filename", ""), reader.line_num)
                if first != reader.line_num:
                    raise DuplicateIdError(f"{row.get('filename')!r} is listed twice (lines "
                                           f"{first} and {reader.line_num})")
                listed.add(row.get("filename", ""))
                result.samples.append(_load_case(folder, row))
    for image in sorted(folder.glob("*HC.png")) if header_ok else []:
        if image.name not in listed:
            with result.guard(strict, image, image.stem):
                raise MissingFieldError(f"image has no row in {csv_path.name}")
    return result.warn_if_empty(root, "cases")
