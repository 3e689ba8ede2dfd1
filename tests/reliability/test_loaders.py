"""Loaders refuse or report what they cannot use: boxes and keypoints outside the image, a PNG
whose data is corrupt (at load, not later), a mask drawn in the alpha channel (read, not
emptied), and an empty source (a warning naming it)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from echomoe.data.formats import CorruptImageError, InvalidValueError, load_busi, load_jsonl
from echomoe.data.formats.errors import read_mask, verify_image


def _png(path: Path, array, mode=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, np.uint8), mode=mode).save(path)
    return path


def _manifest(tmp_path: Path, **fields) -> Path:
    _png(tmp_path / "a.png", np.full((10, 20), 80))
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"id": "a", "images": "a.png", **fields}) + "\n")
    return path


@pytest.mark.parametrize("fields, message", [
    ({"boxes": [{"label": "lesion", "bbox": [2, 2, 20, 5]}]},
     r"boxes\[0\]\.bbox \[2, 2, 20, 5\] lies outside the 20x10 image"),
    ({"boxes": [{"bbox": [-1, 0, 3, 3]}]}, r"boxes\[0\]\.bbox \[-1, 0, 3, 3\] lies outside"),
    ({"keypoints": {"tip": [4, 12]}}, r"keypoints\.tip \(4\.0, 12\.0\) lies outside"),
])
def test_geometry_outside_the_image_is_refused(tmp_path, fields, message):
    path = _manifest(tmp_path, **fields)
    with pytest.raises(InvalidValueError, match=rf"m\.jsonl:1: record 'a': {message}"):
        load_jsonl(path)
    result = load_jsonl(path, strict=False)
    assert len(result) == 0 and [s.error for s in result.skipped] == ["InvalidValueError"]
    # on the edge is inside
    assert len(load_jsonl(_manifest(tmp_path, boxes=[{"bbox": [0, 0, 19, 9]}],
                                    keypoints={"c": [19.5, -0.5]}))) == 1


def test_a_png_with_corrupt_data_fails_at_load(tmp_path):
    good = _png(tmp_path / "good.png", np.random.default_rng(0).integers(0, 255, (64, 64)))
    data = good.read_bytes()
    bad = tmp_path / "bad.png"
    bad.write_bytes(data[: len(data) // 2])  # header and size intact, pixels cut short
    assert verify_image(good) == (64, 64)
    with pytest.raises(CorruptImageError, match="bad.png"):
        verify_image(bad)


def test_a_mask_in_the_alpha_channel_is_read(tmp_path):
    rgba = np.zeros((6, 8, 4), np.uint8)  # black everywhere, the lesion only in alpha
    rgba[1:3, 2:5, 3] = 255
    mask = read_mask(_png(tmp_path / "alpha.png", rgba, "RGBA"), (6, 8))
    assert mask.sum() == 6 and mask[1:3, 2:5].all()
    opaque = np.zeros((6, 8, 4), np.uint8)
    opaque[..., 3] = 255
    opaque[0, 0, :3] = 255
    assert read_mask(_png(tmp_path / "opaque.png", opaque, "RGBA"), (6, 8)).sum() == 1
    # a 16-bit label mask: its value 1 is foreground (rescaled to 8 bits it would round to 0)
    deep = np.zeros((6, 8), np.uint16)
    deep[2, 3:6] = 1
    Image.fromarray(deep).save(tmp_path / "deep.png")
    assert read_mask(tmp_path / "deep.png", (6, 8)).sum() == 3


def test_an_empty_source_warns(tmp_path):
    (tmp_path / "busi" / "benign").mkdir(parents=True)
    with pytest.warns(UserWarning, match="busi: no cases found"):
        assert len(load_busi(tmp_path / "busi")) == 0
    empty = tmp_path / "e.jsonl"
    empty.write_text("\n")
    with pytest.warns(UserWarning, match="e.jsonl: no records found"):
        load_jsonl(empty)


def test_duplicate_cases_with_conflicting_labels_are_reported(tmp_path):
    import csv

    from echomoe.data.formats import DuplicateIdError, load_fmuia_csv, load_hc18

    # HC18: one image listed twice with different head circumferences
    ts = tmp_path / "hc" / "training_set"
    for name in ("000_HC", "001_HC"):
        _png(ts / f"{name}.png", np.full((20, 24), 90))
        outline = np.zeros((20, 24), np.uint8)
        outline[5, 5:15] = outline[14, 5:15] = outline[5:15, 5] = outline[5:15, 14] = 255
        _png(ts / f"{name}_Annotation.png", outline)
    with (tmp_path / "hc" / "training_set_pixel_size_and_HC.csv").open("w", newline="") as f:
        csv.writer(f).writerows([["filename", "pixel size(mm)", "head circumference (mm)"],
                                 ["000_HC.png", "0.1", "120"], ["001_HC.png", "0.1", "130"],
                                 ["000_HC.png", "0.1", "999"]])
    with pytest.raises(DuplicateIdError, match=r"'000_HC.png' is listed twice \(lines 2 and "
                                               r"4\)"):
        load_hc18(tmp_path / "hc")
    lenient = load_hc18(tmp_path / "hc", strict=False)
    assert [s.id for s in lenient] == ["000_HC", "001_HC"]
    assert [(s.line, s.error) for s in lenient.skipped] == [(4, "DuplicateIdError")]
    # FM_UIA: the same task and image twice, in two CSV files
    _png(tmp_path / "fm" / "Classification" / "c1.png", np.full((12, 16), 50))
    row = {"image_path": "Classification/c1.png", "mask_path": "", "task_id": "liver_cls",
           "task_name": "classification", "num_classes": "2", "mask": "1"}
    for name, label in (("a.csv", "1"), ("b.csv", "0")):
        with (tmp_path / "fm" / name).open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            writer.writeheader()
            writer.writerow({**row, "mask": label})
    with pytest.raises(DuplicateIdError, match=r"b\.csv:2: .*occurs twice \(first at a\.csv:2"):
        load_fmuia_csv(tmp_path / "fm")


def test_broken_and_looping_symlinks_are_reported_not_dropped(tmp_path):
    import shutil

    import data_store

    from echomoe.data.formats.dicom import load_dicom

    busi = tmp_path / "busi" / "benign"
    _png(busi / "benign (1).png", np.full((8, 8), 70))
    _png(busi / "benign (1)_mask.png", np.zeros((8, 8)))
    (busi / "benign (2).png").symlink_to(busi / "gone.png")  # dangling
    (busi / "benign (3).png").symlink_to(busi / "benign (3).png")  # a loop
    result = load_busi(tmp_path / "busi", strict=False)
    assert [s.id for s in result] == ["benign/benign (1)"]
    assert [(s.record, s.error) for s in result.skipped] == [
        ("benign/benign (2)", "MissingImageError"), ("benign/benign (3)", "MissingImageError")]
    assert all("broken or looping symlink" in s.reason for s in result.skipped)
    dcm = tmp_path / "dcm"
    dcm.mkdir()
    shutil.copy(Path(data_store.__file__).parent / "data" / "US1_UNCR.dcm", dcm / "a.dcm")
    (dcm / "b.dcm").symlink_to(dcm / "missing.dcm")
    loaded = load_dicom(dcm, strict=False)
    assert [s.id for s in loaded] == ["a.dcm"]
    assert [s.record for s in loaded.skipped] == ["b.dcm"]


def test_strict_false_survives_bad_bytes_deep_json_and_huge_csv_fields(tmp_path):
    from echomoe.data.formats import MalformedRecordError, load_echovlm_json, load_fmuia_csv

    _png(tmp_path / "a.png", np.full((10, 20), 80))
    good = json.dumps({"id": "a", "images": "a.png"}).encode()
    manifest = tmp_path / "m.jsonl"
    manifest.write_bytes(b"\n".join([good, b'{"id": "\xff\xfe"}', b"[" * 100_000 + b"]" * 100_000,
                                     json.dumps({"id": "b", "images": "a.png"}).encode()]))
    result = load_jsonl(manifest, strict=False)
    assert [s.id for s in result] == ["a", "b"]
    assert [(s.line, s.error) for s in result.skipped] == [(2, "MalformedRecordError"),
                                                          (3, "MalformedRecordError")]
    assert "not UTF-8" in result.skipped[0].reason and "nested" in result.skipped[1].reason
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(MalformedRecordError, match="deep.json: JSON nested too deeply"):
        load_echovlm_json(deep, strict=False)
    fm = tmp_path / "fm"
    fm.mkdir()
    (fm / "a.csv").write_text("image_path,mask_path,task_id,task_name,num_classes\n"
                              f"x.png,,t,classification,2,{'9' * 200_000}\n")
    lenient = load_fmuia_csv(fm, strict=False)
    assert len(lenient) == 0
    assert [(s.line, s.error) for s in lenient.skipped] == [(2, "MalformedRecordError")]
    assert "field larger than field limit" in lenient.skipped[0].reason


def test_fmuia_boxes_and_points_outside_the_image_are_refused(tmp_path):
    import csv

    from echomoe.data.formats import load_fmuia_csv

    _png(tmp_path / "Detection" / "d.png", np.full((12, 16), 50))
    rows = [{"image_path": "Detection/d.png", "mask_path": "", "task_id": "t",
             "task_name": "detection", "num_classes": "1", "x_min": "1", "y_min": "1",
             "x_max": "16", "y_max": "5", "point_1_xy": ""},
            {"image_path": "Detection/d.png", "mask_path": "", "task_id": "k",
             "task_name": "regression", "num_classes": "1", "x_min": "", "y_min": "",
             "x_max": "", "y_max": "", "point_1_xy": "3,40"}]
    with (tmp_path / "a.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    result = load_fmuia_csv(tmp_path, strict=False)
    assert len(result) == 0
    assert ["lies outside the 16x12 image" in s.reason for s in result.skipped] == [True, True]
