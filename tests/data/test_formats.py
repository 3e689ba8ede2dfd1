"""Real-format loaders on tiny fixtures written to ``tmp_path``: valid data and every bad input,
strict (specific exception naming file + record) and non-strict (skipped AND reported)."""

from __future__ import annotations

import csv
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from echomoe.data.formats import (
    CorruptImageError,
    DuplicateIdError,
    FormatError,
    ImageTagMismatchError,
    InvalidValueError,
    LoadResult,
    MalformedRecordError,
    MaskLabelError,
    MaskSizeMismatchError,
    MissingFieldError,
    MissingImageError,
    MissingMaskError,
    UnknownFieldError,
    load_busi,
    load_echovlm_json,
    load_fmuia_csv,
    load_hc18,
    load_jsonl,
    split_report,
)
from echomoe.data.schema import UltrasoundSample, UnknownRegionError


def png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8), mode="L").save(path)
    return path


def image(h: int = 20, w: int = 24, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8)


def rect_mask(h, w, y0, y1, x0, x1, value=255) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    m[y0:y1, x0:x1] = value
    return m


def corrupt(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n definitely not a png")
    return path


def check_bad(load, exc, file_name, record, n_good):
    """strict raises ``exc`` naming file and record; non-strict skips one and keeps the rest."""
    with pytest.raises(exc) as info:
        load(True)
    err = info.value
    assert isinstance(err, FormatError)
    assert file_name in str(err), str(err)
    assert record in str(err), str(err)
    result = load(False)
    assert isinstance(result, LoadResult)
    assert len(result) == n_good
    assert len(result.skipped) == 1, result.summary()
    skipped = result.skipped[0]
    assert skipped.error == type(err).__name__
    assert file_name in str(skipped) and record in str(skipped)
    assert skipped.file == err.file and skipped.line == err.line
    assert skipped.reason and skipped.reason in str(err)
    return err, result


# ---------------------------------------------------------------------------- EchoVLM JSON


def _echo_records(root: Path) -> list[dict]:
    png(root / "img" / "a1.png", image(seed=1))
    png(root / "img" / "a2.png", image(seed=2))
    png(root / "img" / "b1.png", image(seed=3))
    return [
        {
            "id": "case_a",
            "image": ["img/a1.png", "img/a2.png"],
            "region": "thyroid",
            "conversations": [
                {"from": "system", "value": "You are a sonographer."},
                {"from": "human", "value": "<image>\n<image>\nWrite the report."},
                {"from": "gpt", "value": "Findings: A 5 mm hypoechoic nodule. "
                                         "Impression: TI-RADS 4."},
                {"from": "human", "value": "Is the margin smooth?"},
                {"from": "gpt", "value": "Yes."},
            ],
        },
        {
            "id": "case_b",
            "image": "img/b1.png",
            "anatomy": "Breast",
            "diagnosis": "benign",
            "conversations": [
                {"from": "human", "value": "<image>请描述"},
                {"from": "gpt", "value": "超声所见：左乳低回声结节。超声提示：BI-RADS 3类。"},
            ],
        },
    ]


def _write_json(path: Path, records) -> Path:
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return path


def test_echovlm_valid(tmp_path):
    path = _write_json(tmp_path / "echo.json", _echo_records(tmp_path))
    result = load_echovlm_json(path)
    assert [s.id for s in result] == ["case_a", "case_b"]
    a, b = result
    assert isinstance(a, UltrasoundSample) and a.source == "echovlm"
    assert a.region == "thyroid" and b.region == "breast"
    assert a.images == [str((tmp_path / "img" / f"a{i}.png").resolve()) for i in (1, 2)]
    np.testing.assert_array_equal(a.image_array(1), image(seed=2))
    assert a.qa == [
        {"question": "Write the report.", "answer": "Findings: A 5 mm hypoechoic nodule. "
                                                    "Impression: TI-RADS 4.", "type": "open"},
        {"question": "Is the margin smooth?", "answer": "Yes.", "type": "open"},
    ]
    assert a.findings == "A 5 mm hypoechoic nodule." and a.impression == "TI-RADS 4."
    assert b.findings == "左乳低回声结节。" and b.impression == "BI-RADS 3类。"
    assert b.qa[0]["question"] == "请描述" and b.diagnosis == "benign"
    assert result.skipped == []


def test_echovlm_image_root_and_no_region(tmp_path):
    png(tmp_path / "frames" / "x.png", image())
    rec = {"id": 7, "image": "x.png", "conversations": [
        {"from": "human", "value": "<image> organ?"}, {"from": "gpt", "value": "liver"}]}
    path = _write_json(tmp_path / "d.json", [rec])
    (sample,) = load_echovlm_json(path, image_root=tmp_path / "frames")
    assert sample.id == "7" and sample.region == "unknown"
    assert sample.findings == "" and sample.impression == ""
    assert sample.qa == [{"question": "organ?", "answer": "liver", "type": "open"}]


def test_split_report():
    assert split_report("no headings here") is None
    assert split_report("Findings: x. Impression: y.") == ("x.", "y.")
    assert split_report("A cyst. Impression: benign.") == ("A cyst.", "benign.")
    assert split_report("findings: only") == ("only", "")
    assert split_report("超声所见 结节 超声提示 良性") == ("结节", "良性")


def _bad_tag(r, root):
    r["conversations"][1]["value"] = "<image> one tag only"


def _bad_region(r, root):
    r["region"] = "elbow"


def _missing_conv(r, root):
    del r["conversations"]


def _corrupt_img(r, root):
    corrupt(root / "img" / "a2.png")


def _missing_img(r, root):
    r["image"][1] = "img/nope.png"


def _dup_id(r, root):
    r["id"] = "case_b"


@pytest.mark.parametrize("mutate, exc", [
    (_bad_tag, ImageTagMismatchError),
    (_bad_region, UnknownRegionError),
    (_missing_conv, MissingFieldError),
    (_corrupt_img, CorruptImageError),
    (_missing_img, MissingImageError),
])
def test_echovlm_bad_record(tmp_path, mutate, exc):
    records = _echo_records(tmp_path)
    mutate(records[0], tmp_path)
    path = _write_json(tmp_path / "echo.json", records)
    err, result = check_bad(lambda s: load_echovlm_json(path, strict=s), exc, "echo.json",
                            "case_a", n_good=1)
    assert result[0].id == "case_b"


def test_echovlm_duplicate_id(tmp_path):
    records = _echo_records(tmp_path)
    _dup_id(records[0], tmp_path)
    path = _write_json(tmp_path / "echo.json", records[::-1])
    check_bad(lambda s: load_echovlm_json(path, strict=s), DuplicateIdError, "echo.json",
              "case_b", n_good=1)


def test_echovlm_malformed_file_raises_even_when_lenient(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[{"id": "a",,}]')
    for strict in (True, False):
        with pytest.raises(MalformedRecordError, match="broken.json:1"):
            load_echovlm_json(path, strict=strict)
    _write_json(path, 3)
    with pytest.raises(MalformedRecordError, match="broken.json"):
        load_echovlm_json(path, strict=False)


# ---------------------------------------------------------------------------- BUSI

H, W = 20, 24


def _busi(root: Path) -> Path:
    png(root / "benign" / "benign (1).png", image(seed=1))
    png(root / "benign" / "benign (1)_mask.png", rect_mask(H, W, 2, 6, 3, 8))
    png(root / "benign" / "benign (1)_mask_1.png", rect_mask(H, W, 10, 14, 12, 20))
    png(root / "benign" / "benign (10).png", image(seed=2))
    png(root / "benign" / "benign (10)_mask.png", rect_mask(H, W, 5, 7, 5, 7))
    png(root / "benign" / "benign (2).png", image(seed=3))
    png(root / "benign" / "benign (2)_mask.png", rect_mask(H, W, 0, 1, 0, 1, value=1))
    png(root / "malignant" / "malignant (1).png", image(seed=4))
    png(root / "malignant" / "malignant (1)_mask.png", rect_mask(H, W, 4, 9, 4, 16))
    png(root / "normal" / "normal (1).png", image(seed=5))
    png(root / "normal" / "normal (1)_mask.png", np.zeros((H, W)))
    png(root / "normal" / "normal (2).png", image(seed=6))  # no mask file: allowed for normal
    return root


def test_busi_valid(tmp_path):
    result = load_busi(_busi(tmp_path))
    assert [s.id for s in result] == [
        "benign/benign (1)", "benign/benign (2)", "benign/benign (10)",
        "malignant/malignant (1)", "normal/normal (1)", "normal/normal (2)",
    ]
    by_id = {s.id: s for s in result}
    b1 = by_id["benign/benign (1)"]
    assert b1.region == "breast" and b1.diagnosis == "benign" and b1.source == "busi"
    assert b1.images[0].dtype == np.uint8 and b1.images[0].shape == (H, W)
    np.testing.assert_array_equal(b1.images[0], image(seed=1))
    lesion = b1.masks["lesion"]
    assert lesion.dtype == bool and lesion.sum() == 4 * 5 + 4 * 8  # OR of both mask files
    assert lesion[2, 3] and lesion[13, 19] and not lesion[8, 10]
    assert b1.boxes == [{"label": "lesion", "bbox": [3, 2, 19, 13]}]
    assert by_id["benign/benign (2)"].masks["lesion"].sum() == 1  # 0/1-valued mask file
    assert by_id["malignant/malignant (1)"].diagnosis == "malignant"
    for nid in ("normal/normal (1)", "normal/normal (2)"):
        n = by_id[nid]
        assert n.diagnosis == "normal" and n.boxes == []
        assert n.masks["lesion"].shape == (H, W) and not n.masks["lesion"].any()


def test_busi_normal_mask_forced_empty(tmp_path):
    png(tmp_path / "normal" / "normal (1).png", image())
    png(tmp_path / "normal" / "normal (1)_mask.png", rect_mask(H, W, 1, 5, 1, 5))
    (s,) = load_busi(tmp_path)
    assert not s.masks["lesion"].any() and s.boxes == []


def test_busi_round_trips_through_hf_dataset(tmp_path):
    from echomoe.data.schema import from_hf_dataset

    result = load_busi(_busi(tmp_path))
    back = from_hf_dataset(result.to_dataset())
    for a, b in zip(result, back, strict=True):
        assert a.id == b.id and a.boxes == b.boxes and a.diagnosis == b.diagnosis
        np.testing.assert_array_equal(a.images[0], b.images[0])
        np.testing.assert_array_equal(a.masks["lesion"], b.masks["lesion"])


@pytest.mark.parametrize("case, exc", [
    ("missing_mask", MissingMaskError),
    ("size", MaskSizeMismatchError),
    ("corrupt_image", CorruptImageError),
    ("corrupt_mask", CorruptImageError),
    ("orphan_mask", MissingImageError),
])
def test_busi_bad_case(tmp_path, case, exc):
    root = _busi(tmp_path)
    folder = root / "malignant"
    if case == "missing_mask":
        png(folder / "malignant (7).png", image())
    elif case == "size":
        png(folder / "malignant (7).png", image())
        png(folder / "malignant (7)_mask.png", np.zeros((H + 1, W)))
    elif case == "corrupt_image":
        corrupt(folder / "malignant (7).png")
        png(folder / "malignant (7)_mask.png", np.zeros((H, W)))
    elif case == "corrupt_mask":
        png(folder / "malignant (7).png", image())
        corrupt(folder / "malignant (7)_mask_1.png")
    else:
        png(folder / "malignant (7)_mask.png", np.zeros((H, W)))
    err, result = check_bad(lambda s: load_busi(root, strict=s), exc, "malignant (7)",
                            "malignant/malignant (7)", n_good=6)
    assert "malignant/malignant (1)" in {s.id for s in result}


def test_busi_without_class_folders(tmp_path):
    with pytest.raises(FormatError, match="no BUSI class folder"):
        load_busi(tmp_path, strict=False)


# ---------------------------------------------------------------------------- FM_UIA CSV

COLUMNS = ["image_path", "mask_path", "task_id", "task_name", "num_classes",
           "point_1_xy", "point_2_xy", "x_min", "y_min", "x_max", "y_max", "mask"]


def _write_csv(path: Path, rows: list[dict], columns=COLUMNS) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def _fmuia(root: Path) -> list[dict]:
    png(root / "Segmentation" / "s1.png", image(seed=1))
    png(root / "Segmentation" / "s1_mask.png", rect_mask(H, W, 2, 5, 2, 9))  # 0/255 binary
    label = np.zeros((H, W), np.uint8)
    label[1:4, 1:4] = 1
    label[10:12, 5:15] = 2
    png(root / "Segmentation" / "s2.png", image(seed=2))
    png(root / "Segmentation" / "s2_mask.png", label)
    png(root / "Detection" / "d1.png", image(seed=3))
    png(root / "Regression" / "r1.png", image(seed=4))
    png(root / "Classification" / "c1.png", image(seed=5))
    return [
        {"image_path": "Segmentation/s1.png", "mask_path": "Segmentation/s1_mask.png",
         "task_id": "breast_seg", "task_name": "segmentation", "num_classes": "2"},
        {"image_path": "Segmentation/s2.png", "mask_path": "Segmentation/s2_mask.png",
         "task_id": "heart_seg", "task_name": "segmentation", "num_classes": "3"},
        {"image_path": "Detection/d1.png", "task_id": "thyroid_det", "task_name": "detection",
         "num_classes": "1", "x_min": "1", "y_min": "2", "x_max": "10.5", "y_max": "12"},
        {"image_path": "Regression/r1.png", "task_id": "fetal_kpt", "task_name": "Regression",
         "num_classes": "2", "point_1_xy": "3,4", "point_2_xy": "[5.5, 6]"},
        {"image_path": "Classification/c1.png", "task_id": "liver_cls",
         "task_name": "classification", "num_classes": "2", "mask": "1"},
    ]


def test_fmuia_valid(tmp_path):
    rows = _fmuia(tmp_path)
    _write_csv(tmp_path / "a.csv", rows[:3])
    _write_csv(tmp_path / "csv_files" / "b.csv", rows[3:])
    result = load_fmuia_csv(tmp_path)
    assert len(result) == 5 and result.skipped == []
    s1, s2, d1, r1, c1 = result
    assert s1.id == "breast_seg/Segmentation/s1.png" and s1.source == "fm_uia"
    assert s1.attributes == {"task_id": "breast_seg", "task_name": "segmentation",
                             "num_classes": 2}
    assert list(s1.masks) == ["lesion"] and s1.masks["lesion"].sum() == 3 * 7
    assert s1.boxes == [{"label": "lesion", "bbox": [2, 2, 8, 4]}]
    np.testing.assert_array_equal(s1.images[0], image(seed=1))
    assert sorted(s2.masks) == ["class_1", "class_2"]
    assert s2.masks["class_1"].sum() == 9 and s2.masks["class_2"].sum() == 20
    assert s2.masks["class_2"][10, 5] and not s2.masks["class_1"][10, 5]
    assert d1.masks == {} and d1.boxes == [{"label": "lesion", "bbox": [1, 2, 10.5, 12]}]
    assert r1.keypoints == {"point_1": (3.0, 4.0), "point_2": (5.5, 6.0)}
    assert c1.attributes["label"] == 1 and c1.region == "unknown"


def test_fmuia_single_file_and_space_point(tmp_path):
    rows = _fmuia(tmp_path)
    rows[3]["point_1_xy"] = "7 8"
    path = _write_csv(tmp_path / "reg.csv", [rows[3]])
    (r1,) = load_fmuia_csv(path)
    assert r1.keypoints["point_1"] == (7.0, 8.0)


def test_fmuia_missing_column(tmp_path):
    rows = _fmuia(tmp_path)
    _write_csv(tmp_path / "good.csv", rows[:1])
    cols = [c for c in COLUMNS if c != "task_name"]
    _write_csv(tmp_path / "nocol.csv", rows[1:], columns=cols)
    with pytest.raises(MissingFieldError, match=r"nocol\.csv:1.*'task_name'"):
        load_fmuia_csv(tmp_path)
    result = load_fmuia_csv(tmp_path, strict=False)
    assert [s.id for s in result] == ["breast_seg/Segmentation/s1.png"]
    (skipped,) = result.skipped
    assert skipped.file.endswith("nocol.csv") and "task_name" in skipped.reason


@pytest.mark.parametrize("case, exc", [
    ("missing_mask", MissingMaskError),
    ("size", MaskSizeMismatchError),
    ("corrupt", CorruptImageError),
    ("missing_image", MissingImageError),
    ("labels", MaskLabelError),
    ("point", InvalidValueError),
    ("region", UnknownRegionError),
    ("empty_task", MissingFieldError),
])
def test_fmuia_bad_row(tmp_path, case, exc):
    rows = _fmuia(tmp_path)
    bad = dict(rows[1])  # the 3-class segmentation row, CSV line 3
    columns = COLUMNS
    if case == "missing_mask":
        bad["mask_path"] = "Segmentation/none.png"
    elif case == "size":
        png(tmp_path / "Segmentation" / "s2_mask.png", np.zeros((H, W + 3)))
    elif case == "corrupt":
        corrupt(tmp_path / "Segmentation" / "s2.png")
    elif case == "missing_image":
        bad["image_path"] = "Segmentation/gone.png"
    elif case == "labels":
        png(tmp_path / "Segmentation" / "s2_mask.png", np.full((H, W), 7))
    elif case == "point":
        bad["point_1_xy"] = "3;x"
    elif case == "region":
        bad["region"] = "knee"
        columns = [*COLUMNS, "region"]
    else:
        bad["task_id"] = ""
    rows[1] = bad
    path = _write_csv(tmp_path / "tasks.csv", rows, columns=columns)
    err, result = check_bad(lambda s: load_fmuia_csv(tmp_path, strict=s), exc, "tasks.csv:3",
                            bad["image_path"], n_good=4)
    assert err.line == 3 and err.file == str(path)
    assert result.skipped[0].line == 3


# ---------------------------------------------------------------------------- HC18

CX, CY, A, B, THETA = 40.0, 30.0, 24.0, 13.0, np.deg2rad(30.0)


def _ellipse_outline(h=64, w=80) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, 4000)
    c, s = np.cos(THETA), np.sin(THETA)
    xs = CX + A * c * np.cos(t) - B * s * np.sin(t)
    ys = CY + A * s * np.cos(t) + B * c * np.sin(t)
    out = np.zeros((h, w), np.uint8)
    out[np.round(ys).astype(int), np.round(xs).astype(int)] = 255
    return out


def _hc18(root: Path, rows=None) -> Path:
    ts = root / "training_set"
    for name in ("000_HC", "001_HC", "010_2HC"):
        png(ts / f"{name}.png", image(64, 80, seed=len(name)))
        png(ts / f"{name}_Annotation.png", _ellipse_outline())
    rows = rows or [["000_HC.png", "0.1", "123.4"], ["001_HC.png", "0.2", "150"],
                    ["010_2HC.png", "0.15", "99.5"]]
    with (root / "training_set_pixel_size_and_HC.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filename", "pixel size(mm)", "head circumference (mm)"])
        writer.writerows(rows)
    return root


def test_hc18_valid(tmp_path):
    result = load_hc18(_hc18(tmp_path))
    assert [s.id for s in result] == ["000_HC", "001_HC", "010_2HC"]
    s = result[0]
    assert s.region == "gynaecology" and s.source == "hc18"
    assert s.pixel_spacing == pytest.approx(0.1) and result[1].pixel_spacing == pytest.approx(0.2)
    assert s.attributes["head_circumference_mm"] == pytest.approx(123.4)
    yy, xx = np.mgrid[:64, :80]
    u = (xx - CX) * np.cos(THETA) + (yy - CY) * np.sin(THETA)
    v = -(xx - CX) * np.sin(THETA) + (yy - CY) * np.cos(THETA)
    truth = (u / A) ** 2 + (v / B) ** 2 <= 1
    mask = s.masks["head"]
    iou = (mask & truth).sum() / (mask | truth).sum()
    assert iou > 0.9 and mask[int(CY), int(CX)]
    ends = sorted([(CX - A * np.cos(THETA), CY - A * np.sin(THETA)),
                   (CX + A * np.cos(THETA), CY + A * np.sin(THETA))])
    for name, (ex, ey) in zip(("major_axis_1", "major_axis_2"), ends, strict=True):
        x, y = s.keypoints[name]
        assert np.hypot(x - ex, y - ey) < 2.0, (name, (x, y), (ex, ey))
    minor = np.subtract(s.keypoints["minor_axis_1"], s.keypoints["minor_axis_2"])
    assert np.hypot(*minor) == pytest.approx(2 * B, abs=2.0)
    ys, xs = np.nonzero(mask)
    assert s.boxes == [{"label": "head", "bbox": [xs.min(), ys.min(), xs.max(), ys.max()]}]


@pytest.mark.parametrize("case, exc, record, where", [
    ("missing_annotation", MissingMaskError, "001_HC", "csv:3"),
    ("size", MaskSizeMismatchError, "001_HC", "csv:3"),
    ("corrupt", CorruptImageError, "001_HC", "csv:3"),
    ("empty_annotation", MaskLabelError, "001_HC", "csv:3"),
    ("bad_spacing", InvalidValueError, "001_HC", "csv:3"),
    ("not_in_csv", MissingFieldError, "002_HC", "002_HC.png"),
])
def test_hc18_bad_case(tmp_path, case, exc, record, where):
    root = _hc18(tmp_path)
    ts = root / "training_set"
    if case == "missing_annotation":
        (ts / "001_HC_Annotation.png").unlink()
    elif case == "size":
        png(ts / "001_HC_Annotation.png", np.zeros((10, 10)))
    elif case == "corrupt":
        corrupt(ts / "001_HC.png")
    elif case == "empty_annotation":
        png(ts / "001_HC_Annotation.png", np.zeros((64, 80)))
    elif case == "bad_spacing":
        _hc18(root, rows=[["000_HC.png", "0.1", "123.4"], ["001_HC.png", "n/a", "150"],
                          ["010_2HC.png", "0.15", "99.5"]])
    else:
        png(ts / "002_HC.png", image(64, 80))
    n_good = 3 if case == "not_in_csv" else 2
    check_bad(lambda s: load_hc18(root, strict=s), exc, where, record, n_good)


def test_hc18_missing_column_and_csv(tmp_path):
    root = _hc18(tmp_path)
    (root / "training_set_pixel_size_and_HC.csv").write_text("filename,pixel size(mm)\n0.png,1\n")
    with pytest.raises(MissingFieldError, match="head circumference"):
        load_hc18(root)
    result = load_hc18(root, strict=False)
    assert len(result) == 0 and len(result.skipped) == 1
    assert "head circumference" in result.skipped[0].reason
    (root / "training_set_pixel_size_and_HC.csv").unlink()
    with pytest.raises(FormatError, match="training_set_pixel_size_and_HC.csv not found"):
        load_hc18(root, strict=False)


# ---------------------------------------------------------------------------- JSONL


def _jsonl_lines(root: Path) -> list[dict]:
    png(root / "img" / "a.png", image(seed=1))
    png(root / "img" / "b.png", image(seed=2))
    png(root / "masks" / "a.png", rect_mask(H, W, 3, 6, 4, 9))
    return [
        {"id": "a", "images": ["img/a.png"], "region": "kidney", "pixel_spacing": 0.2,
         "masks": {"lesion": "masks/a.png"}, "boxes": [{"label": "lesion", "bbox": [4, 3, 8, 5]}],
         "keypoints": {"long_axis_1": [4, 4], "long_axis_2": "8,4"},
         "attributes": {"lesion_type": "cyst", "size_long_mm": 1.0},
         "findings": "A cyst.", "impression": "Benign.", "diagnosis": "benign",
         "qa": [{"question": "Organ?", "answer": "kidney"}]},
        {"id": "b", "images": "img/b.png"},
    ]


def _write_jsonl(path: Path, records) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_jsonl_valid(tmp_path):
    records = _jsonl_lines(tmp_path)
    path = _write_jsonl(tmp_path / "m.jsonl", [records[0], "", records[1]])
    a, b = load_jsonl(path)
    assert a.id == "a" and a.region == "kidney" and a.pixel_spacing == 0.2
    assert a.images == [str((tmp_path / "img" / "a.png").resolve())]
    assert a.masks["lesion"].dtype == bool and a.masks["lesion"].sum() == 15
    assert a.boxes == [{"label": "lesion", "bbox": [4, 3, 8, 5]}]
    assert a.keypoints == {"long_axis_1": (4.0, 4.0), "long_axis_2": (8.0, 4.0)}
    assert a.qa == [{"question": "Organ?", "answer": "kidney", "type": "open"}]
    assert a.report == "Findings: A cyst. Impression: Benign." and a.diagnosis == "benign"
    assert a.source == "jsonl" and a.attributes["lesion_type"] == "cyst"
    assert b.region == "unknown" and b.masks == {} and len(b.images) == 1
    np.testing.assert_array_equal(b.image_array(), image(seed=2))


def test_jsonl_unknown_key_lists_valid_ones(tmp_path):
    records = _jsonl_lines(tmp_path)
    records[1]["organ"] = "kidney"
    path = _write_jsonl(tmp_path / "m.jsonl", records)
    err, _ = check_bad(lambda s: load_jsonl(path, strict=s), UnknownFieldError, "m.jsonl:2",
                       "'b'", n_good=1)
    assert "'organ'" in str(err) and "pixel_spacing" in str(err) and "keypoints" in str(err)


def test_jsonl_malformed_line(tmp_path):
    records = _jsonl_lines(tmp_path)
    path = _write_jsonl(tmp_path / "m.jsonl", [records[0], '{"id": "b", images: }', records[1]])
    with pytest.raises(MalformedRecordError, match=r"m\.jsonl:2"):
        load_jsonl(path)
    result = load_jsonl(path, strict=False)
    assert [s.id for s in result] == ["a", "b"]
    assert result.skipped[0].line == 2 and result.skipped[0].error == "MalformedRecordError"


@pytest.mark.parametrize("case, exc", [
    ("no_id", MissingFieldError),
    ("region", UnknownRegionError),
    ("size", MaskSizeMismatchError),
    ("missing_mask", MissingMaskError),
    ("corrupt", CorruptImageError),
    ("duplicate", DuplicateIdError),
    ("spacing", InvalidValueError),
])
def test_jsonl_bad_line(tmp_path, case, exc):
    records = _jsonl_lines(tmp_path)
    bad = {**records[0], "id": "z"}
    if case == "no_id":
        del bad["id"]
    elif case == "region":
        bad["region"] = "spleen"
    elif case == "size":
        png(tmp_path / "masks" / "z.png", np.zeros((H + 2, W)))
        bad["masks"] = {"lesion": "masks/z.png"}
    elif case == "missing_mask":
        bad["masks"] = {"lesion": "masks/none.png"}
    elif case == "corrupt":
        bad["images"] = [str(corrupt(tmp_path / "img" / "z.png").relative_to(tmp_path))]
    elif case == "duplicate":
        bad["id"] = "a"
    else:
        bad["pixel_spacing"] = -1
    path = _write_jsonl(tmp_path / "m.jsonl", [records[0], records[1], bad])
    record = "" if case == "no_id" else f"record {bad['id']!r}"
    err, result = check_bad(lambda s: load_jsonl(path, strict=s), exc, "m.jsonl:3", record,
                            n_good=2)
    assert [s.id for s in result] == ["a", "b"] and err.line == 3


# ---------------------------------------------------------------------------- shared


def test_errors_pickle_and_region_error_is_both():
    err = MissingMaskError("no mask", file="x.csv", record="r1", line=4)
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is MissingMaskError and back.line == 4
    assert str(back) == str(err) == "x.csv:4: record 'r1': no mask"
    from echomoe.data.formats import RegionError

    assert issubclass(RegionError, FormatError) and issubclass(RegionError, UnknownRegionError)
    assert issubclass(FormatError, ValueError) and issubclass(MissingImageError, CorruptImageError)
