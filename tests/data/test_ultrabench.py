"""UltraBench's processed layout (``<name>_v<version>/{train,validation,test}.json`` + PNGs, as
its processing scripts write them) -> samples with regions, masks, boxes, diagnoses and the
dataset's own splits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from echomoe.data.formats import FormatError, MissingImageError
from echomoe.data.formats.convert import convert
from echomoe.data.formats.ultrabench import DATASETS, load_ultrabench, load_ultrabench_splits

H, W = 12, 16


def _png(path: Path, array) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, np.uint8)).save(path)
    return str(path)


def _dataset(root: Path, name: str, splits: dict[str, list[dict]]) -> Path:
    folder = root / f"{name}_v1.0.1"
    for split, records in splits.items():
        for r in records:
            for key, value in list(r.items()):
                if (key == "image" or key.endswith("mask")) and not key.startswith("_"):
                    if not value.startswith("missing"):
                        _png(folder / value, r.pop(f"_{key}", np.full((H, W), 60)))
            r.pop("_image", None)
        (folder / f"{split}.json").parent.mkdir(parents=True, exist_ok=True)
        (folder / f"{split}.json").write_text(json.dumps(
            [{k: v for k, v in r.items() if not k.startswith("_")} for r in records]))
    return folder


def _labels() -> np.ndarray:
    m = np.zeros((H, W), np.uint8)
    m[2:5, 2:6], m[6:9, 3:7], m[9:11, 10:14] = 1, 2, 3
    return m


@pytest.fixture
def root(tmp_path):
    lesion = np.zeros((H, W), np.uint8)
    lesion[3:7, 4:9] = 1
    _dataset(tmp_path, "camus", {
        "train": [{"patient": 1, "view": "2CH", "EF": 55, "image": "images/a.png",
                   "mask": "masks/structures/a.png", "_mask": _labels(),
                   "scan_mask": "masks/scan/a.png", "label": 2}],
        "validation": [{"patient": 2, "view": "4CH", "image": "images/b.png"}],
        "test": [{"patient": 3, "view": "4CH", "image": "images/c.png"}]})
    _dataset(tmp_path, "stanford_thyroid", {
        "train": [{"patient": 7, "image": "images/t.png", "tumor_mask": "masks/t.png",
                   "_tumor_mask": lesion, "pathology": "Malignant", "label": 1,
                   "tirads_level": 5},
                  {"patient": 8, "image": "missing.png", "pathology": "benign"}],
        "validation": [], "test": []})
    _dataset(tmp_path, "butterfly", {
        "train": [{"image": "i/0.png", "class": "carotid", "label": 0},
                  {"image": "i/1.png", "class": "lungs", "label": 2}],
        "validation": [{"image": "i/2.png", "class": "plax", "label": 7}], "test": []})
    _dataset(tmp_path, "gbcu", {
        "train": [{"image": "g.png", "bbox_labels": ["abn", "stn"],
                   "bboxes": [[1, 2, 9, 8], [3, 3, 5, 5]], "pathology": "benign",
                   "label": 1}], "validation": [], "test": []})
    return tmp_path


def test_datasets_map_to_regions_masks_boxes_and_diagnoses(root):
    camus = load_ultrabench_splits(root / "camus_v1.0.1")
    assert {k: len(v) for k, v in camus.items()} == {"train": 1, "validation": 1, "test": 1}
    a = camus["train"][0]
    assert a.id == "camus/train/0" and a.region == "heart" and a.source == "ultrabench:camus"
    assert {n: int(m.sum()) for n, m in a.masks.items()} == {"lv": 12, "myocardium": 12,
                                                             "la": 8, "scan": H * W}
    assert a.attributes == {"patient": 1, "view": "2CH", "EF": 55} and a.diagnosis is None
    every = load_ultrabench(root, strict=False)  # the parent folder: all four datasets
    by_id = {s.id: s for s in every}
    t = by_id["stanford_thyroid/train/0"]
    assert (t.region, t.diagnosis, t.attributes["tirads_level"]) == ("thyroid", "malignant", 5)
    assert t.masks["lesion"].sum() == 20 and t.boxes == [{"label": "lesion",
                                                          "bbox": [4, 3, 8, 6]}]
    assert [by_id[f"butterfly/{s}"].region for s in ("train/0", "train/1", "validation/0")] \
        == ["vessel", "unknown", "heart"]
    g = by_id["gbcu/train/0"]
    assert g.region == "unknown" and g.diagnosis == "benign"
    assert g.boxes == [{"label": "abn", "bbox": [1, 2, 9, 8]},
                       {"label": "stn", "bbox": [3, 3, 5, 5]}]
    assert [(s.file.endswith("stanford_thyroid_v1.0.1/train.json"), s.record, s.error)
            for s in every.skipped] == [(True, "#1", "MissingImageError")]
    assert len(load_ultrabench(root, strict=False, split="validation")) == 2


def test_strictness_and_unknown_datasets(root, tmp_path):
    with pytest.raises(MissingImageError, match="train.json: record '#1'"):
        load_ultrabench(root / "stanford_thyroid_v1.0.1")
    _dataset(tmp_path / "other", "mystery", {"train": [], "validation": [], "test": []})
    with pytest.raises(FormatError, match="unknown UltraBench dataset 'mystery'; known: aul"):
        load_ultrabench(tmp_path / "other")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FormatError, match="holds no UltraBench dataset"):
        load_ultrabench(tmp_path / "empty")
    assert set(DATASETS) >= {"camus", "mmotu", "psfhs", "open_kidney", "pocus"}


def test_convert_keeps_ultrabench_splits(root, tmp_path):
    report = convert("ultrabench", root / "camus_v1.0.1", tmp_path / "out")
    assert report["splits"] == {"train": 1, "validation": 1, "test": 1}
    assert report["regions"] == {"heart": 3}
    assert report["tasks"]["segment"] == 1  # only the train record has its structure mask
