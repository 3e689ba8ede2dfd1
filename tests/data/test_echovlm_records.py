"""EchoVLM records as researchers hold them: both JSON layouts, the region from an argument, a
rule, the dataset map or the path, the diagnosis from a field or the file name, and the report
from a caption / description prompt or field, in English and Chinese (EchoVLM's own prompt
style), scored with the Chinese-aware metrics."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from echomoe.data.formats import RegionError, load_echovlm_json
from echomoe.data.formats.echovlm import DATASET_REGIONS, infer_region
from echomoe.metrics.text import report_metrics


def _png(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((12, 16), 90, np.uint8)).save(path)
    return path


def _write(path: Path, records) -> Path:
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return path


def _conv(question: str, answer: str, n_images: int = 1) -> list[dict]:
    return [{"from": "system", "value": "你是一名超声科医生。"},
            {"from": "human", "value": "<image>" * n_images + question},
            {"from": "gpt", "value": answer}]


CAPTION_ZH = "这里有一张超声图像，帮我生成对应的描述。"
REPORT_ZH = "我给你几张超声图像，你需要基于这些图像，给出超声报告"
FINDINGS_ZH = "右叶见一低回声结节，边界清，形态规则，大小约1.2×0.8cm。"


@pytest.fixture
def study(tmp_path):
    for p in ("BUSI/benign/benign (3).png", "BUSI/malignant/malignant (1).png",
              "thyriod/case9_1.png", "thyriod/case9_2.png", "misc/scan.png"):
        _png(tmp_path / p)
    return tmp_path


def test_region_diagnosis_and_report_from_what_the_records_carry(study):
    records = [
        # BUSI: the dataset map gives the region, the file name the diagnosis, the caption
        # prompt's answer the findings
        {"id": "b3", "image": "BUSI/benign/benign (3).png",
         "conversations": _conv("Here is an ultrasound image; please help me generate a "
                                "corresponding caption.", "An oval hypoechoic mass.")},
        {"id": "m1", "image": "BUSI/malignant/malignant (1).png",
         "conversations": _conv("Is there a lesion?", "Yes."),
         "description": "An irregular mass with angular margins."},
        # EchoVLM's own organ folders (with their spelling), Chinese report without headings
        {"id": "t9", "images": ["thyriod/case9_1.png", "thyriod/case9_2.png"],
         "messages": [{"role": "user", "content": "<image><image>" + REPORT_ZH},
                      {"role": "assistant", "content": FINDINGS_ZH}],
         "label": "TI-RADS 3"},
        # nothing to go on: unknown, unless an argument or a rule says otherwise
        {"id": "x", "image": "misc/scan.png", "conversations": _conv("器官？", "肝脏")},
    ]
    path = _write(study / "echo.json", records)
    b3, m1, t9, x = load_echovlm_json(path)
    assert [s.region for s in (b3, m1, t9, x)] == ["breast", "breast", "thyroid", "unknown"]
    assert (b3.diagnosis, m1.diagnosis, t9.diagnosis, x.diagnosis) == (
        "benign", "malignant", "TI-RADS 3", None)
    assert b3.findings == "An oval hypoechoic mass." and b3.impression == ""
    assert m1.findings == "An irregular mass with angular margins."  # the description field
    assert t9.findings == FINDINGS_ZH and t9.qa[0]["answer"] == FINDINGS_ZH
    assert x.findings == "" and x.qa == [{"question": "器官？", "answer": "肝脏", "type": "open"}]
    (x_arg,) = load_echovlm_json(path, region="liver").samples[3:]
    assert x_arg.region == "liver"
    ruled = load_echovlm_json(path, region_rule=lambda rec, p: "kidney" if rec["id"] == "x"
                              else None)
    assert ruled[3].region == "kidney" and ruled[0].region == "breast"
    with pytest.raises(RegionError, match="elbow"):
        load_echovlm_json(path, region="elbow")


def test_chinese_findings_and_impression_split_and_score(study):
    answer = "超声所见：" + FINDINGS_ZH + "超声提示：甲状腺右叶结节，TI-RADS 3类。"
    rec = {"id": "c", "image": "misc/scan.png", "dataset": "TN5000",
           "conversations": _conv(CAPTION_ZH, answer)}
    (sample,) = load_echovlm_json(_write(study / "zh.json", [rec]))
    assert sample.region == "thyroid"  # from the record's dataset field
    assert sample.findings == FINDINGS_ZH
    assert sample.impression == "甲状腺右叶结节，TI-RADS 3类。"
    # the report a model writes is scored per character: one changed character costs little
    pred = "Findings: " + FINDINGS_ZH.replace("右", "左")
    bleu1 = report_metrics([pred], [f"Findings: {sample.findings}"])["bleu1"]
    assert 0.9 < bleu1 < 1.0
    # word level, the changed clause is one wrong "word" of 8 (Chinese has no spaces)
    assert report_metrics([pred], [f"Findings: {sample.findings}"],
                          language="en")["bleu1"] == pytest.approx(7 / 8)


def test_impression_prompt_and_first_report_answer(study):
    rec = {"id": "i", "image": "misc/scan.png", "region": "liver", "conversations": [
        {"from": "human", "value": "<image>Give the ultrasound impression."},
        {"from": "gpt", "value": "Simple hepatic cyst."},
        {"from": "human", "value": "Describe the image."},
        {"from": "gpt", "value": "A round anechoic lesion."},
        {"from": "human", "value": "Describe it again."},
        {"from": "gpt", "value": "Something else."}]}
    (sample,) = load_echovlm_json(_write(study / "i.json", [rec]))
    assert (sample.findings, sample.impression) == ("A round anechoic lesion.",
                                                    "Simple hepatic cyst.")
    assert len(sample.qa) == 3


def test_infer_region_matches_whole_names_only():
    assert infer_region(["data/BUSI/benign (1).png"]) == "breast"
    assert infer_region(["data/business/plan.png"]) is None  # "busi" is not a token here
    assert infer_region(["exports/echonet-dynamic/0X1.png"]) == "heart"
    assert infer_region(["病例/甲状腺/001.png"]) == "thyroid"
    assert infer_region(["a.png"], {"a": "liver"}) == "liver"
    assert set(DATASET_REGIONS.values()) <= {"breast", "thyroid", "heart", "kidney", "liver",
                                              "vessel", "gynaecology"}


def test_dicom_images_in_records(study):
    import data_store

    src = Path(data_store.__file__).parent / "data" / "gdcm-US-ALOKA-16.dcm"
    shutil.copy(src, study / "scan.dcm")
    rec = {"id": "d", "image": "scan.dcm", "region": "breast",
           "conversations": _conv("Describe the image.", "A lesion.")}
    (sample,) = load_echovlm_json(_write(study / "d.json", [rec]))
    assert sample.image_array().shape == (480, 640)
