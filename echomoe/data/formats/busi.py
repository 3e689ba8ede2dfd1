"""BUSI (Breast Ultrasound Images) folder layout -> :class:`UltrasoundSample`.

Layout::

    root/benign/benign (1).png        root/benign/benign (1)_mask.png
                                      root/benign/benign (1)_mask_1.png   (extra lesion, OR-ed)
    root/malignant/...   root/normal/...

Each case: region ``"breast"``, ``diagnosis`` = folder name, the image as a uint8 ``(H, W)``
array, ``masks["lesion"]`` = OR of its mask files, and a ``"lesion"`` box = the mask's bounding
box when it is non-empty.  Normal cases always get an all-False mask (their mask file, which
BUSI ships filled with zeros, may be absent).  A benign/malignant case without a mask raises
:class:`MissingMaskError`; a mask of another size :class:`MaskSizeMismatchError`; mask files
whose image is absent are reported as :class:`MissingImageError`.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from echomoe.data.formats.errors import (
    FormatError,
    LoadResult,
    MissingImageError,
    MissingMaskError,
    mask_bbox,
    read_image,
    read_mask,
)
from echomoe.data.schema import UltrasoundSample

CLASSES = ("benign", "malignant", "normal")
_MASK = re.compile(r"^(?P<case>.+)_mask(?:_(?P<k>\d+))?$")


def _natural_key(name: str) -> list:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def _case_files(folder: Path) -> tuple[dict[str, Path], dict[str, list[Path]]]:
    """Images by case name, and each case's mask files (``_mask`` first, then ``_mask_k``)."""
    images, masks = {}, {}
    for f in folder.iterdir():
        if f.suffix.lower() != ".png" or f.is_dir():
            continue  # a broken symlink is kept: loading it reports it, nothing is dropped
        m = _MASK.match(f.stem)
        if m:
            k = int(m["k"]) if m["k"] is not None else -1
            masks.setdefault(m["case"], []).append((k, f))
        else:
            images[f.stem] = f
    ordered = {case: [f for _, f in sorted(fs)] for case, fs in masks.items()}
    return images, ordered


def _load_case(label: str, image_path: Path, mask_paths: list[Path]) -> UltrasoundSample:
    image = read_image(image_path)
    if not mask_paths and label != "normal":
        raise MissingMaskError(
            f"no mask for image {image_path.name!r} (expected {image_path.stem}_mask.png)"
        )
    merged = np.zeros(image.shape, dtype=bool)
    for mp in mask_paths:
        merged |= read_mask(mp, image.shape)  # checks readability and size, also for normal
    if label == "normal":
        merged[:] = False
    boxes = []
    bbox = mask_bbox(merged)
    if bbox is not None:
        boxes.append({"label": "lesion", "bbox": bbox})
    return UltrasoundSample(
        id=f"{label}/{image_path.stem}",
        images=[image],
        region="breast",
        masks={"lesion": merged},
        boxes=boxes,
        attributes={"lesion_present": bbox is not None, "num_mask_files": len(mask_paths)},
        diagnosis=label,
        source="busi",
    )


def load_busi(root: str | Path, strict: bool = True) -> LoadResult:
    """Load the BUSI dataset from ``root`` (see the module docstring).

    Args:
        root: folder holding ``benign/``, ``malignant/`` and/or ``normal/``.
        strict: raise on the first bad case; else skip it and list it in ``skipped``.

    Returns:
        A :class:`LoadResult`; cases sorted by class, then by case number.

    Raises:
        FormatError: a subclass naming the image file and case id (``strict``); whatever
            ``strict`` is, when ``root`` has none of the class folders.
    """
    root = Path(root)
    folders = [(label, root / label) for label in CLASSES if (root / label).is_dir()]
    if not folders:
        raise FormatError(f"no BUSI class folder ({', '.join(CLASSES)}) found", file=root)
    result = LoadResult()
    for label, folder in folders:
        images, masks = _case_files(folder)
        for case in sorted(images, key=_natural_key):
            with result.guard(strict, images[case], f"{label}/{case}"):
                result.samples.append(_load_case(label, images[case], masks.get(case, [])))
        for case in sorted(set(masks) - set(images), key=_natural_key):
            with result.guard(strict, masks[case][0], f"{label}/{case}"):
                raise MissingImageError(f"mask file(s) without an image {case + '.png'!r}")
    return result.warn_if_empty(root, "cases")
