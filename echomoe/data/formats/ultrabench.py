"""UltraBench's processed output -> :class:`UltrasoundSample`, keeping its splits.

UltraBench (``pip install ultrabench``; ``ultrabench <dataset> RAW_DIR OUT_DIR``) writes one
folder per dataset, ``<name>_v<version>/``, holding ``train.json``, ``validation.json`` and
``test.json`` (JSON arrays, one object per image) and the PNG images and masks those objects
point to (paths relative to the folder)::

    camus_v1.0.1/train.json   [{"patient": 1, "view": "2CH", "image": "images/....png",
                                "mask": "masks/structures/....png", "label": 2, ...}, ...]

:func:`load_ultrabench_splits` reads one such folder (or every one below a parent folder) and
maps each dataset to echomoe's regions, masks, boxes, diagnosis and attributes
(:data:`DATASETS`):

================== =========== ==================================================== ============
dataset            region      masks / boxes                                        diagnosis
================== =========== ==================================================== ============
aul_mass           liver       ``mass_mask`` -> lesion, ``liver_mask`` -> organ     pathology
aul_liver          liver       ``liver_mask`` -> organ                              --
butterfly          per view    --                                                   --
camus              heart       labels of ``mask``: 1 lv, 2 myocardium, 3 la         --
fatty_liver        liver       --                                                   pathology
gbcu               unknown     ``bboxes`` (their ``bbox_labels``)                   pathology
mmotu              gynaecology ``tumor_mask_binary`` -> lesion                      tumour class
open_kidney        kidney      ``capsule_mask`` -> organ                            --
pocus              unknown     --                                                   pathology
psfhs              gynaecology labels of ``psfh_mask``: 1 pubic_symphysis,          --
                               2 fetal_head
stanford_thyroid   thyroid     ``tumor_mask`` -> lesion                             pathology
================== =========== ==================================================== ============

Every dataset's ``scan_mask`` (the fan) becomes the ``scan`` mask.  Butterfly views map to
regions (carotid -> vessel, 2ch / 4ch / plax -> heart, thyroid -> thyroid; lungs, ivc,
bladder and Morison's pouch have no echomoe region: unknown).  Scalar fields that are not paths
(``view``, ``EF``, ``tirads_level``, ``age``, ...) are kept in ``attributes``; the ids are
``<dataset>/<split>/<index>``.  A dataset name not in :data:`DATASETS` is an error naming the
folder and the known names; a record missing ``image`` or pointing to a missing file is a
:class:`FormatError` naming the JSON file and the record index.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from echomoe.data.formats.errors import (
    FormatError,
    InvalidValueError,
    LoadResult,
    MalformedRecordError,
    MissingFieldError,
    mask_bbox,
    read_image,
    read_mask,
    verify_image,
)
from echomoe.data.schema import UltrasoundSample

__all__ = ["DATASETS", "SPLITS", "load_ultrabench", "load_ultrabench_splits"]

SPLITS = ("train", "validation", "test")

_MMOTU = ("chocolate cyst", "serous cystadenoma", "teratoma", "theca cell tumor",
          "simple cyst", "normal ovary", "mucinous cystadenoma", "high grade serous")
_BUTTERFLY = {"carotid": "vessel", "2ch": "heart", "4ch": "heart", "plax": "heart",
              "thyroid": "thyroid"}

DATASETS: dict[str, dict[str, Any]] = {
    "aul_mass": {"region": "liver", "masks": {"mass_mask": "lesion", "liver_mask": "organ"},
                 "diagnosis": "pathology"},
    "aul_liver": {"region": "liver", "masks": {"liver_mask": "organ"}},
    "butterfly": {"region": None},
    "camus": {"region": "heart", "labels": {"mask": {1: "lv", 2: "myocardium", 3: "la"}}},
    "fatty_liver": {"region": "liver", "diagnosis": "pathology"},
    "gbcu": {"region": "unknown", "diagnosis": "pathology", "boxes": True},
    "mmotu": {"region": "gynaecology", "masks": {"tumor_mask_binary": "lesion"},
              "diagnosis": "mmotu"},
    "open_kidney": {"region": "kidney", "masks": {"capsule_mask": "organ"}},
    "pocus": {"region": "unknown", "diagnosis": "pathology"},
    "psfhs": {"region": "gynaecology",
              "labels": {"psfh_mask": {1: "pubic_symphysis", 2: "fetal_head"}}},
    "stanford_thyroid": {"region": "thyroid", "masks": {"tumor_mask": "lesion"},
                         "diagnosis": "pathology"},
}
"""UltraBench dataset name -> how its records map (see the module docstring)."""

_VERSION = re.compile(r"_v\d+(?:\.\d+)*$")
_PATH_KEYS = ("image", "mask", "bboxes", "bbox_labels", "dimensions", "label")


def dataset_name(folder: Path) -> str:
    """``camus`` for ``camus_v1.0.1`` (the folder name without its version suffix)."""
    return _VERSION.sub("", folder.name)


def _region(spec: dict, record: dict) -> str:
    if spec["region"] is not None:
        return spec["region"]
    return _BUTTERFLY.get(str(record.get("class", "")).lower(), "unknown")


def _diagnosis(spec: dict, record: dict) -> str | None:
    source = spec.get("diagnosis")
    if source == "pathology":
        value = record.get("pathology")
        return None if value is None else str(value).lower()
    if source == "mmotu":
        label = record.get("label")
        if not isinstance(label, int) or not 0 <= label < len(_MMOTU):
            raise InvalidValueError(f"MMOTU label must be an integer in 0..{len(_MMOTU) - 1}, "
                                    f"got {label!r}")
        return _MMOTU[label]
    return None


def _record(spec: dict, name: str, split: str, index: int, record: Any,
            folder: Path) -> UltrasoundSample:
    if not isinstance(record, dict):
        raise MalformedRecordError(f"record must be a JSON object, got {type(record).__name__}")
    if not isinstance(record.get("image"), str):
        raise MissingFieldError("missing field 'image' (a path)")
    image = folder / record["image"]
    width, height = verify_image(image)
    shape = (height, width)
    masks: dict[str, np.ndarray] = {}
    for key, mask_name in spec.get("masks", {}).items():
        if isinstance(record.get(key), str):
            masks[mask_name] = read_mask(folder / record[key], shape, key)
    for key, labels in spec.get("labels", {}).items():
        if isinstance(record.get(key), str):
            read_mask(folder / record[key], shape, key)  # exists, decodes, has the size
            label_map = read_image(folder / record[key], key, mode="label")
            for value, mask_name in labels.items():
                masks[mask_name] = label_map == value
    if isinstance(record.get("scan_mask"), str):
        masks["scan"] = read_mask(folder / record["scan_mask"], shape, "scan_mask")
    boxes = []
    for mask_name in ("lesion", "organ"):
        if mask_name in masks and (box := mask_bbox(masks[mask_name])) is not None:
            boxes.append({"label": mask_name, "bbox": box})
    if spec.get("boxes"):
        labels, coords = record.get("bbox_labels") or [], record.get("bboxes") or []
        if len(labels) != len(coords):
            raise InvalidValueError(f"{len(labels)} bbox_labels for {len(coords)} bboxes")
        boxes += [{"label": str(lab), "bbox": [int(v) for v in box]}
                  for lab, box in zip(labels, coords, strict=True)]
    attributes = {k: v for k, v in record.items()
                  if k not in _PATH_KEYS and not k.endswith("_mask") and k != "pathology"
                  and isinstance(v, (str, int, float, bool))}
    return UltrasoundSample(
        id=f"{name}/{split}/{index}", images=[str(image)], region=_region(spec, record),
        masks=masks, boxes=boxes, attributes=attributes,
        diagnosis=_diagnosis(spec, record), source=f"ultrabench:{name}")


def _dataset_folders(root: Path) -> list[Path]:
    if (root / "train.json").is_file():
        return [root]
    if not root.is_dir():
        raise FormatError(f"UltraBench folder {str(root)!r} does not exist")
    folders = sorted(p.parent for p in root.glob("*/train.json"))
    if not folders:
        raise FormatError(f"{str(root)!r} holds no UltraBench dataset (a folder with "
                          "train.json / validation.json / test.json)")
    return folders


def load_ultrabench_splits(root: str | Path, strict: bool = True) -> dict[str, LoadResult]:
    """``{"train", "validation", "test": LoadResult}`` of one UltraBench dataset folder, or of
    every dataset folder below ``root`` (their samples pooled per split).

    Raises:
        FormatError: an unknown dataset, a missing or malformed split file (whatever
            ``strict`` is), or with ``strict`` the first bad record.
    """
    results = {split: LoadResult() for split in SPLITS}
    for folder in _dataset_folders(Path(root)):
        name = dataset_name(folder)
        if name not in DATASETS:
            raise FormatError(f"unknown UltraBench dataset {name!r}; known: "
                              f"{', '.join(DATASETS)}", file=folder)
        for split in SPLITS:
            path = folder / f"{split}.json"
            try:
                records = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
                raise MalformedRecordError(f"cannot read the {split} split ({err})",
                                           file=path) from err
            if not isinstance(records, list):
                raise MalformedRecordError("expected a JSON list of records", file=path)
            result = results[split]
            for index, record in enumerate(records):
                with result.guard(strict, path, f"#{index}"):
                    result.samples.append(_record(DATASETS[name], name, split, index, record,
                                                  folder))
    return results


def load_ultrabench(root: str | Path, strict: bool = True, *,
                    split: str | None = None) -> LoadResult:
    """The samples of one split (``split``) or of all three (``None``, in split order) of
    :func:`load_ultrabench_splits`."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)} or None, got {split!r}")
    splits = load_ultrabench_splits(root, strict)
    out = LoadResult()
    for name in SPLITS if split is None else (split,):
        out.samples += splits[name].samples
        out.skipped += splits[name].skipped
    return out
