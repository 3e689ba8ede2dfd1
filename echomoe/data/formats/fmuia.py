"""FM_UIA 2026 challenge CSVs -> :class:`UltrasoundSample`.

``root`` holds one or more CSV files (directly or in ``root/csv_files/``; ``root`` may also be a
single CSV file).  Required columns: ``image_path, mask_path, task_id, task_name, num_classes``;
optional: keypoints ``point_{i}_xy`` (``"x,y"``, ``"x y"`` or ``"[x, y]"``), a box
``x_min, y_min, x_max, y_max``, ``region``, ``id``, ``pixel_spacing``.  Any other non-empty
column is copied into ``attributes`` (the classification label column ``mask`` as ``label``).

Paths are relative to ``root`` (falling back to the CSV's folder, as the challenge baseline
does).  ``task_id``, ``task_name`` and ``num_classes`` go into ``attributes``.  A segmentation
mask is a label PNG with values ``0 .. num_classes - 1``: one boolean mask per class value,
``"class_1" ... "class_{n-1}"``, or ``"lesion"`` when ``num_classes <= 2`` (any non-zero
pixel).  Rows with an empty ``mask_path`` (classification, detection, regression) get no mask.
Error locations are CSV line numbers (the header is line 1).
"""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Any

import numpy as np

from echomoe.data.formats.errors import (
    DuplicateIdError,
    FormatError,
    InvalidValueError,
    LoadResult,
    MaskLabelError,
    MissingFieldError,
    MissingMaskError,
    check_box,
    check_mask_shape,
    check_point,
    check_region,
    csv_rows,
    mask_bbox,
    parse_point,
    read_image,
    to_float,
)
from echomoe.data.schema import UltrasoundSample

REQUIRED_COLUMNS = ("image_path", "mask_path", "task_id", "task_name", "num_classes")
BOX_COLUMNS = ("x_min", "y_min", "x_max", "y_max")
_POINT = re.compile(r"^point_(\d+)_xy$")
_SPECIAL = set(REQUIRED_COLUMNS) | set(BOX_COLUMNS) | {"region", "id", "pixel_spacing"}


def _csv_files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    files = sorted(root.glob("*.csv")) + sorted((root / "csv_files").glob("*.csv"))
    if not files:
        raise FormatError("no CSV file found (looked in the folder and in csv_files/)", file=root)
    return files


def _resolve(p: str, root: Path, csv_path: Path) -> Path:
    path = Path(p)
    if path.is_absolute():
        return path
    first = root / path
    if first.exists():
        return first
    second = csv_path.parent / path
    return second if second.exists() else first


def _scalar(value: str) -> Any:
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def _class_masks(label: np.ndarray, num_classes: int, path: Path) -> dict[str, np.ndarray]:
    if num_classes <= 2:
        return {"lesion": label > 0}
    bad = np.setdiff1d(np.unique(label), np.arange(num_classes))
    if bad.size:
        raise MaskLabelError(
            f"mask {str(path)!r} has label values {bad.tolist()} outside 0..{num_classes - 1}"
        )
    return {f"class_{k}": label == k for k in range(1, num_classes)}


def _parse_row(row: dict[str, str], root: Path, csv_path: Path) -> UltrasoundSample:
    for col in ("image_path", "task_id", "task_name", "num_classes"):
        if not row.get(col):
            raise MissingFieldError(f"empty value in required column {col!r}")
    num_classes = to_float(row["num_classes"], "num_classes", positive=True)
    if num_classes != int(num_classes):
        raise InvalidValueError(f"num_classes must be an integer, got {row['num_classes']!r}")
    num_classes = int(num_classes)

    image = read_image(_resolve(row["image_path"], root, csv_path))
    attributes: dict[str, Any] = {
        "task_id": row["task_id"],
        "task_name": row["task_name"],
        "num_classes": num_classes,
    }
    masks, boxes, keypoints = {}, [], {}
    if row.get("mask_path"):
        mask_path = _resolve(row["mask_path"], root, csv_path)
        if not mask_path.is_file():
            raise MissingMaskError(f"mask file {str(mask_path)!r} does not exist")
        label = read_image(mask_path, "mask", mode="label")
        check_mask_shape(label.shape, image.shape, mask_path)
        masks = _class_masks(label, num_classes, mask_path)

    box_values = [row.get(c) or "" for c in BOX_COLUMNS]
    if any(box_values):
        if not all(box_values):
            given = dict(zip(BOX_COLUMNS, box_values, strict=True))
            raise InvalidValueError(f"incomplete box {given}")
        x0, y0, x1, y1 = (to_float(v, c) for v, c in zip(box_values, BOX_COLUMNS, strict=True))
        if x1 < x0 or y1 < y0:
            raise InvalidValueError(f"box has x_max < x_min or y_max < y_min: {box_values}")
        bbox = [int(c) if c.is_integer() else c for c in (x0, y0, x1, y1)]
        check_box(bbox, (image.shape[1], image.shape[0]), "box")
        boxes.append({"label": "lesion", "bbox": bbox})
    elif masks:
        union = np.logical_or.reduce(list(masks.values()))
        bbox = mask_bbox(union)
        if bbox is not None:
            boxes.append({"label": "lesion", "bbox": bbox})

    for col, value in row.items():
        if col is None or not value:
            continue
        m = _POINT.match(col)
        if m:
            keypoints[f"point_{m[1]}"] = parse_point(value, col)
            check_point(keypoints[f"point_{m[1]}"], (image.shape[1], image.shape[0]), col)
        elif col not in _SPECIAL:
            attributes["label" if col == "mask" else col] = _scalar(value)
    keypoints = dict(sorted(keypoints.items(), key=lambda kv: int(kv[0].split("_")[1])))

    spacing = row.get("pixel_spacing")
    return UltrasoundSample(
        id=row.get("id") or f"{row['task_id']}/{row['image_path']}",
        images=[image],
        region=check_region(row.get("region") or None),
        pixel_spacing=to_float(spacing, "pixel_spacing", positive=True) if spacing else None,
        masks=masks,
        boxes=boxes,
        keypoints=keypoints,
        attributes=attributes,
        source="fm_uia",
    )


def _load_csv(csv_path: Path, root: Path, strict: bool, result: LoadResult,
              seen: dict[str, str]) -> None:
    with result.guard(strict, csv_path, line=1):
        try:
            handle = csv_path.open(newline="", encoding="utf-8-sig")
        except OSError as err:
            raise FormatError(f"cannot read CSV ({err})") from err
        with handle:
            reader = csv.DictReader(handle)
            header = [c.strip() for c in (reader.fieldnames or [])]
            missing = [c for c in REQUIRED_COLUMNS if c not in header]
            if missing:
                raise MissingFieldError(
                    f"missing required column(s) {', '.join(map(repr, missing))}"
                    f" (have: {', '.join(header) or 'no header'})"
                )
            reader.fieldnames = header
            for raw in csv_rows(reader, csv_path):
                row = {k: (v.strip() if isinstance(v, str) else v) for k, v in raw.items()}
                name = row.get("id") or row.get("image_path") or None
                with result.guard(strict, csv_path, name, reader.line_num):
                    if None in row:
                        raise InvalidValueError(f"{len(row[None])} more value(s) than columns")
                    sample = _parse_row(row, root, csv_path)
                    first = seen.setdefault(sample.id, f"{csv_path.name}:{reader.line_num}")
                    if first != f"{csv_path.name}:{reader.line_num}":
                        raise DuplicateIdError(f"id {sample.id!r} occurs twice (first at "
                                               f"{first}): conflicting labels for one case")
                    result.samples.append(sample)


def load_fmuia_csv(root: str | Path, strict: bool = True) -> LoadResult:
    """Load every FM_UIA challenge CSV under ``root`` (see the module docstring).

    Args:
        root: the data folder (CSV files in it or in ``csv_files/``), or one CSV file.
        strict: raise on the first bad row; else skip it and list it in ``skipped``.  A CSV
            missing a required column is then skipped whole (one entry, line 1).

    Returns:
        A :class:`LoadResult` with images as uint8 arrays, in CSV and row order.

    Raises:
        FormatError: a subclass naming the CSV file and line (``strict``); whatever ``strict``
            is, when no CSV file is found.
    """
    root = Path(root)
    files = _csv_files(root)
    base = root.parent if root.is_file() else root
    result, seen = LoadResult(), {}
    for csv_path in files:
        _load_csv(csv_path, base, strict, result, seen)
    return result.warn_if_empty(root, "CSV rows")
