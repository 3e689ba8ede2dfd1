"""The evaluation language (``en`` / ``zh`` / ``auto``) reaches every text metric: tokens, report
metrics, VQA token F1 and the harness's scoring, on Chinese and English text."""

from __future__ import annotations

import numpy as np
import pytest

from echomoe.data.schema import UltrasoundSample
from echomoe.metrics import text as T
from echomoe.metrics.priors import prior_result
from echomoe.metrics.vqa import normalize_answer, token_f1, vqa_metrics

EN = "Hypo-echoic, 1.5x2cm nodule in the LEFT lobe."
ZH = "甲状腺左叶见1.2cm低回声结节。"


def test_auto_tokens_equal_en_on_english_and_zh_on_chinese():
    assert T.tokenize(EN, "auto") == T.tokenize(EN, "en")
    assert T.tokenize(ZH, "auto") == T.tokenize(ZH, "zh") != T.tokenize(ZH, "en")
    assert T.resolve_language("auto", [EN, [EN, "见"]]) == "zh"
    assert T.resolve_language("auto", [EN, [EN]]) == "en"
    assert T.resolve_language("en", [ZH]) == "en"
    with pytest.raises(ValueError, match="language must be one of"):
        T.resolve_language("fr", [EN])


def test_chinese_reports_score_at_character_level_with_auto():
    pred, ref = ["甲状腺左叶见低回声结节"], ["甲状腺右叶见低回声结节"]
    auto = T.report_metrics(pred, ref, language="auto")
    assert auto == T.report_metrics(pred, ref, language="zh")
    assert auto["bleu1"] == pytest.approx(10 / 11)  # 10 of 11 characters match
    assert T.report_metrics(pred, ref, language="en")["bleu1"] == 0.0  # one "word" each
    english = (["the nodule is hypoechoic"], ["the nodule is hypoechoic and solid"])
    assert T.report_metrics(*english, language="auto") == T.report_metrics(*english)


def test_vqa_token_f1_splits_chinese_answers():
    assert token_f1("低回声结节", "低回声") == pytest.approx(0.75)  # P 3/5, R 1
    assert token_f1("低回声结节", "低回声", "en") == 0.0
    assert token_f1("12 mm", "12mm") == token_f1("12 mm", "12mm", "en") == 1.0
    assert normalize_answer("边界清楚，形态规则。") == "边界清楚 形态规则"
    assert normalize_answer("ＹＥＳ") == "yes"  # full-width letters (NFKC)
    v = vqa_metrics(["低回声"], ["低回声结节"], ["open"])
    assert v["open_token_f1"] == pytest.approx(0.75) and v["open_exact_match"] == 0.0
    with pytest.raises(ValueError, match="language must be one of"):
        token_f1("a", "a", "de")


def _case(i: int, findings: str, qa: list[dict]) -> UltrasoundSample:
    return UltrasoundSample(id=f"c{i}", images=[np.zeros((8, 8), np.uint8)], region="thyroid",
                            findings=findings, qa=qa)


def test_the_harness_scores_chinese_records_in_the_resolved_language():
    qa = [{"question": "回声如何？", "answer": "低回声", "type": "open"}]
    train = [_case(0, "甲状腺左叶见低回声结节", qa), _case(1, "甲状腺左叶见低回声结节", qa)]
    test = [_case(2, "甲状腺右叶见低回声结节", [dict(qa[0], answer="低回声结节")])]
    auto = prior_result(train, test, ("report", "vqa"), by_region=False, image_size=8,
                        measure_pairs=[])
    assert auto.settings["language"] == "zh"
    report = next(r for r in auto.records if r["task"] == "report")
    # "Findings:" + 11 characters, one of which (左 / 右) differs
    assert report["scores"]["bleu1"] == pytest.approx(11 / 12)
    assert auto.metrics["overall"]["vqa/token_f1"] == pytest.approx(0.75)
    en = prior_result(train, test, ("report", "vqa"), by_region=False, image_size=8,
                      measure_pairs=[], language="en")
    assert en.settings["language"] == "en"
    assert en.metrics["overall"]["report/bleu1"] == 0.5  # "findings" + one Chinese "word"
    assert en.metrics["overall"]["vqa/token_f1"] == 0.0


# ----------------------------------------------------------------------------- real labels
def test_real_dataset_diagnoses_are_scored_with_their_own_classes():
    from echomoe.metrics.harness import build_examples, diagnosis_label, normalize_label
    from echomoe.metrics.ranking import closed_options

    assert normalize_label("BI-RADS 4") == "birads_4" and normalize_label(" Benign.") == "benign"
    classes = ["benign", "malignant", "normal"]
    assert diagnosis_label("breast", "Malignant", classes) == "malignant"
    assert diagnosis_label("breast", "likely benign lesion", classes) == "benign"
    assert diagnosis_label("breast", "birads_4", classes) == "birads_4"  # synthetic ones too
    assert diagnosis_label("unknown", "COVID", ["regular", "covid"]) == "covid"
    assert diagnosis_label("unknown", "pneumonia", []) == "pneumonia"
    assert diagnosis_label("unknown", "nothing known", ["regular"]) is None
    # BUSI-style samples: the class list the ranking chooses from includes their labels
    busi = [UltrasoundSample(id=f"b{i}", images=[np.zeros((8, 8), np.uint8)], region="breast",
                             diagnosis=("benign", "malignant", "normal")[i % 3])
            for i in range(6)]
    (ex, *_) = build_examples(busi, ["diagnosis"])
    assert {"benign", "malignant", "normal", "birads_4"} <= set(ex.options)
    assert closed_options("diagnosis", ex.prompt, options=ex.options) == ex.options
    prior = prior_result(busi[:4], busi, ("diagnosis",), by_region=True, image_size=8,
                         measure_pairs=[])
    # the train majority ("benign", 2 of 4) is right on 2 of the 6 test cases, not 0
    assert prior.metrics["overall"]["diagnosis/accuracy"] == pytest.approx(2 / 6)
