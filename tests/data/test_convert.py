"""``echomoe data`` / :func:`convert`: a real source becomes a saved DatasetDict, and the report
lists what was loaded, what was skipped and why, the regions and the tasks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import data_store
import numpy as np
import pytest
from PIL import Image

from echomoe.cli import main
from echomoe.data.formats.convert import convert, format_report, load_source
from echomoe.data.schema import from_hf_dataset

DICOM = Path(data_store.__file__).parent / "data"


@pytest.fixture
def echovlm(tmp_path):
    records = []
    for i in range(12):
        name = f"BUSI/{'benign' if i % 2 else 'malignant'}/case ({i}).png"
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((10, 12), 20 * i % 256, np.uint8)).save(tmp_path / name)
        records.append({"id": f"c{i}", "image": name, "conversations": [
            {"from": "human", "value": "<image>Describe the image."},
            {"from": "gpt", "value": f"A mass of {i} mm."}]})
    records.append({"id": "broken", "image": "BUSI/missing.png", "conversations": [
        {"from": "human", "value": "<image>Describe."}, {"from": "gpt", "value": "x"}]})
    path = tmp_path / "echo.json"
    path.write_text(json.dumps(records))
    return path


def test_convert_saves_the_splits_and_reports_skips(echovlm, tmp_path):
    report = convert("echovlm", echovlm, tmp_path / "out")
    assert report["loaded"] == 12 and report["splits"] == {"train": 10, "validation": 1,
                                                           "test": 1}
    assert [(s["record"], s["error"]) for s in report["skipped"]] == [("broken",
                                                                      "MissingImageError")]
    assert report["regions"] == {"breast": 12}  # BUSI in the image paths
    assert report["tasks"]["report"] == 12 and report["tasks"]["diagnosis"] == 12
    from datasets import load_from_disk

    saved = load_from_disk(str(tmp_path / "out"))
    back = [s for split in ("train", "validation", "test") for s in from_hf_dataset(saved[split])]
    assert sorted(s.id for s in back) == [f"c{i}" for i in sorted(range(12), key=str)]
    assert {s.diagnosis for s in back} == {"benign", "malignant"}
    assert back[0].images[0].shape == (10, 12)  # pixels embedded, not paths
    text = format_report(report)
    assert "loaded 12, skipped 1" in text and "broken" in text and "breast 12" in text


def test_bad_requests_are_clear(echovlm, tmp_path):
    with pytest.raises(ValueError, match="unknown format 'png'; valid: busi, dicom"):
        load_source("png", echovlm)
    with pytest.raises(ValueError, match="busi loader does not take region"):
        load_source("busi", tmp_path, region="breast")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_source("dicom", tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="nothing to convert"), \
            pytest.warns(UserWarning, match="empty: no DICOM files found"):
        convert("dicom", empty, tmp_path / "out")


def test_cli_converts_real_dicom_files(tmp_path, capsys):
    src = tmp_path / "exports"
    src.mkdir()
    for name in ("gdcm-US-ALOKA-16.dcm", "OBXXXX1A_2frame.dcm", "US1_UNCR.dcm"):
        shutil.copy(DICOM / name, src / name)
    (src / "truncated.dcm").write_bytes((DICOM / "US1_UNCR.dcm").read_bytes()[:2000])
    code = main(["data", "dicom", str(src), "--out", str(tmp_path / "out"), "--region",
                 "liver", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["loaded"] == 3 and report["regions"] == {"liver": 3}
    assert [s["record"] for s in report["skipped"]] == ["truncated.dcm"]
    assert main(["data", "dicom", str(src), "--out", str(tmp_path / "o2"), "--strict"]) == 1
    assert "truncated.dcm" in capsys.readouterr().err
    assert main(["data", "busi", str(src), "--out", str(tmp_path / "o3"),
                 "--region", "breast"]) == 1
    assert "does not take region" in capsys.readouterr().err
