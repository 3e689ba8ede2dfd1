"""Train-split priors scored by the harness: what each one predicts, and that its numbers can be
compared with a model's (same examples, same metric keys)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from echomoe.data.schema import UltrasoundSample
from echomoe.data.synthetic.generate import SyntheticConfig, generate
from echomoe.data.tasks import TASKS
from echomoe.data.tokenizer import IMAGE_TOKEN
from echomoe.metrics.harness import TASK_METRICS, build_examples
from echomoe.metrics.priors import prior_result, prior_results, report_ceiling
from echomoe.metrics.vqa import normalize_answer

PAIRS = [(0, 1), (2, 3)]
SIZE = 20  # the "model" input size of the grounding priors


@pytest.fixture(scope="module")
def data() -> tuple[list[UltrasoundSample], list[UltrasoundSample]]:
    """168 synthetic cases (24 per region): the first 140 train, the last 28 (4 per region)
    test."""
    samples = generate(168, seed=3, config=SyntheticConfig(image_size=40))
    return samples[:140], samples[140:]


@pytest.fixture(scope="module")
def priors(data):
    train, test = data
    return prior_results(train, test, image_size=SIZE, measure_pairs=PAIRS)


def _case(i: int, region: str = "breast", hw: tuple[int, int] = (40, 40),
          **fields) -> UltrasoundSample:
    """A hand-made sample with a blank image of ``hw`` pixels."""
    return UltrasoundSample(id=f"case{i}", images=[np.zeros(hw, dtype=np.uint8)], region=region,
                            **fields)


def _block(y0: int, y1: int, x0: int, x1: int, hw: tuple[int, int] = (40, 40)) -> np.ndarray:
    mask = np.zeros(hw, dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def _rows(result, task: str) -> list[dict]:
    return [r for r in result.records if r["task"] == task]


# ----------------------------------------------------------------------------- comparability
@pytest.mark.parametrize("seed", [0, 5])
def test_examples_and_keys_are_the_harness_ones(data, seed):
    train, test = data
    result = prior_result(train, test, by_region=True, image_size=SIZE, measure_pairs=PAIRS,
                          seed=seed)
    expected = build_examples(test, TASKS, seed)
    assert [(r["id"], r["task"], r["prompt"], r["reference"]) for r in result.records] == [
        (ex.sample.id, ex.task, ex.prompt.replace(IMAGE_TOKEN, "").strip(), ex.reference)
        for ex in expected]
    assert {k for r in result.records for k in r} == {
        "id", "region", "task", "prompt", "prediction", "reference", "scores"}
    metrics = result.metrics
    assert set(metrics["per_task"]) == set(TASKS)
    for task, row in metrics["per_task"].items():
        assert set(row) == {"n", *TASK_METRICS[task]}
        assert row["n"] == sum(ex.task == task for ex in expected)
    assert set(metrics["overall"]) == {"num_samples", "num_examples"} | {
        f"{task}/{key}" for task in TASKS for key in TASK_METRICS[task]}
    assert metrics["overall"]["num_samples"] == len(test)
    assert set(metrics["per_region"]) == {s.region for s in test}
    assert result.routing == {}
    assert result.settings["prior"] == "per_region" and result.settings["seed"] == seed
    assert result.settings["num_samples"] == len(test)
    assert result.settings["num_train_samples"] == len(train)


def test_both_priors_are_returned_and_every_prediction_is_emitted(priors):
    assert list(priors) == ["prior_global", "prior_region"]
    assert priors["prior_global"].settings["prior"] == "global"
    for result in priors.values():
        for task in ("segment", "detect", "measure"):
            assert result.metrics["per_task"][task]["task_token_rate"] == 1.0


# ----------------------------------------------------------------------------- text priors
def test_diagnosis_prior_is_the_train_majority(data, priors):
    train, test = data
    overall = Counter(s.diagnosis for s in train)
    glob = {r["prediction"] for r in _rows(priors["prior_global"], "diagnosis")}
    assert len(glob) == 1 and overall[glob.pop()] == max(overall.values())
    hits = []
    for row, sample in zip(_rows(priors["prior_region"], "diagnosis"), test, strict=True):
        labels = Counter(s.diagnosis for s in train if s.region == sample.region)
        assert labels[row["prediction"]] == max(labels.values())
        hits.append(row["prediction"] == sample.diagnosis)
    assert priors["prior_region"].metrics["per_task"]["diagnosis"]["accuracy"] == \
        pytest.approx(np.mean(hits))


def test_vqa_prior_answers_each_question_with_its_train_majority(data, priors):
    train, test = data
    answers: dict[tuple[str, str], Counter] = {}
    for s in train:
        for qa in s.qa:
            for group in ("*", s.region):
                answers.setdefault((group, normalize_answer(qa["question"])), Counter())[
                    normalize_answer(qa["answer"])] += 1
    checked = 0
    for name, by_region in (("prior_global", False), ("prior_region", True)):
        rows = _rows(priors[name], "vqa")
        questions = [normalize_answer(qa["question"]) for s in test for qa in s.qa]
        assert len(rows) == len(questions)
        for row, question in zip(rows, questions, strict=True):
            counts = answers.get((row["region"] if by_region else "*", question))
            if counts:
                assert counts[normalize_answer(row["prediction"])] == max(counts.values())
                checked += 1
    assert checked >= 20
    glob, region = (priors[n].metrics["per_task"]["vqa"] for n in priors)
    assert region["closed_accuracy"] >= glob["closed_accuracy"]
    assert region["exact_match"] >= glob["exact_match"]


def test_vqa_prior_falls_back_to_the_question_type_then_to_any_answer():
    qa = [{"question": "Is it round?", "answer": "no", "type": "yes_no"},
          {"question": "Is it smooth?", "answer": "no", "type": "yes_no"},
          {"question": "Is it bright?", "answer": "Yes", "type": "yes_no"},
          {"question": "Which side?", "answer": "left", "type": "open"},
          {"question": "Which lobe?", "answer": "left", "type": "open"},
          {"question": "What size?", "answer": "left", "type": "open"}]
    train = [_case(0, qa=qa)]
    test = [_case(1, region="kidney", qa=[
        {"question": "Is it BRIGHT?", "answer": "yes", "type": "yes_no"},  # same question
        {"question": "Is it new?", "answer": "yes", "type": "yes_no"},  # same type
        {"question": "Pick one: a, b.", "answer": "a", "type": "choice"}])]  # nothing alike
    for by_region in (False, True):  # kidney is unseen in train: the region prior is global
        result = prior_result(train, test, ("vqa",), by_region=by_region, image_size=SIZE,
                              measure_pairs=PAIRS)
        assert [r["prediction"] for r in result.records] == ["Yes", "no", "left"]
        assert result.metrics["per_task"]["vqa"]["closed_accuracy"] == pytest.approx(1 / 3)


def test_report_prior_is_a_train_report(data, priors):
    train, _ = data
    glob = {r["prediction"] for r in _rows(priors["prior_global"], "report")}
    assert len(glob) == 1 and glob <= {s.report for s in train}
    for row in _rows(priors["prior_region"], "report"):
        assert row["prediction"] in {s.report for s in train if s.region == row["region"]}
    glob_m, region_m = (priors[n].metrics["per_task"]["report"] for n in priors)
    assert 0 < glob_m["bleu1"] < 1 and region_m["rouge1"] > glob_m["rouge1"]


def test_report_prior_is_the_unigram_medoid():
    # Summed unigram F1 to the others (every report also has the token "findings"):
    # "a b c" 2.08, "a b c d" 1.92, "a b" 2.01, "z" 1.02.
    train = [_case(i, findings=text) for i, text in enumerate(["a b c d", "a b", "a b c", "z"])]
    result = prior_result(train, [_case(9, findings="q")], ("report",), by_region=False,
                          image_size=SIZE, measure_pairs=PAIRS)
    assert result.records[0]["prediction"] == "Findings: a b c"


# ----------------------------------------------------------------------------- grounding priors
def test_segment_prior_is_the_majority_mask_of_the_region():
    breast, kidney = _block(0, 10, 0, 10), _block(20, 40, 20, 40)
    train = ([_case(i, masks={"lesion": breast}) for i in range(2)]
             + [_case(i + 2, region="kidney", masks={"lesion": kidney}) for i in range(3)])
    test = [_case(8, masks={"lesion": breast}), _case(9, region="thyroid",
                                                      masks={"lesion": kidney})]
    region = prior_result(train, test, ("segment",), by_region=True, image_size=SIZE,
                          measure_pairs=PAIRS)
    glob = prior_result(train, test, ("segment",), by_region=False, image_size=SIZE,
                        measure_pairs=PAIRS)
    # globally the union of the two blocks (train Dice (1 / 3 * 2 + 8 / 9 * 3) / 5) beats the
    # kidney block alone (3 / 5); per region the breast masks agree, and thyroid (unseen) gets
    # the global union
    assert [r["scores"]["dice"] for r in region.records] == pytest.approx([1.0, 8 / 9])
    assert [r["scores"]["dice"] for r in glob.records] == pytest.approx([1 / 3, 8 / 9])
    assert region.metrics["per_region"]["breast"]["segment"]["dice"] == pytest.approx(1.0)


def test_segment_prior_without_a_majority_keeps_the_best_dice_pixels():
    blocks = [_block(0, 10, 0, 10), _block(0, 10, 20, 30), _block(20, 30, 0, 10)]
    train = [_case(i, masks={"lesion": m}) for i, m in enumerate(blocks)]
    result = prior_result(train, [_case(9, masks={"lesion": blocks[0]})], ("segment",),
                          by_region=True, image_size=SIZE, measure_pairs=PAIRS)
    # no pixel is in 2 of 3 masks: the prior is the union, Dice = 2 * 1 / (1 + 3)
    assert result.records[0]["scores"]["dice"] == pytest.approx(0.5)


def test_detect_prior_is_the_mean_normalised_box_on_each_test_image():
    # train edges / size: (0.1, 0.2, 0.5, 0.7) and (0.3, 0.2, 0.7, 0.7) -> mean (.2, .2, .6, .7)
    train = [_case(0, boxes=[{"label": "lesion", "bbox": [4, 8, 19, 27]}]),
             _case(1, boxes=[{"label": "lesion", "bbox": [12, 8, 27, 27]}])]
    # a 60 x 80 (H x W) test image: edges (16, 12, 48, 42) are that mean box
    test = [_case(9, hw=(60, 80), boxes=[{"label": "organ", "bbox": [0, 0, 5, 5]},
                                         {"label": "lesion", "bbox": [16, 12, 47, 41]}])]
    result = prior_result(train, test, ("detect",), by_region=False, image_size=SIZE,
                          measure_pairs=PAIRS)
    assert result.records[0]["scores"]["box_iou"] == pytest.approx(1.0)
    assert result.metrics["per_task"]["detect"]["acc50"] == 1.0


def test_measure_prior_mean_keypoints_and_median_length():
    four = {"a": (5.0, 10.0), "b": (25.0, 10.0), "c": (15.0, 0.0), "d": (15.0, 30.0)}
    two = {"a": (0.0, 0.0), "b": (39.0, 39.0)}
    train = ([_case(i, keypoints=four, pixel_spacing=sp) for i, sp in enumerate([0.5, 1, 2])]
             + [_case(3, keypoints=two, pixel_spacing=1.0)])
    test = [_case(8, keypoints=four, pixel_spacing=1.5),
            _case(9, hw=(80, 80), keypoints={"a": (0.5, 0.5), "b": (78.5, 78.5)},
                  pixel_spacing=1.0)]
    result = prior_result(train, test, ("measure",), by_region=True, image_size=SIZE,
                          measure_pairs=PAIRS)
    first, second = (r["scores"] for r in result.records)
    assert first["radial_error_px"] == pytest.approx(0.0, abs=1e-9)
    assert first["radial_error_mm"] == pytest.approx(0.0, abs=1e-9)
    # pair lengths 20 and 30 px: the median train lengths are 20 and 30 mm (spacing 1), the
    # true ones 30 and 45 mm (spacing 1.5)
    assert first["measurement_abs_mm"] == pytest.approx((10 + 15) / 2)
    assert first["measurement_rel_pct"] == pytest.approx(100 / 3)
    assert first["measurement_bias_mm"] == pytest.approx(-(10 + 15) / 2)  # the prior is short
    # the 2-keypoint sample gets the 2-keypoint train mean, scaled to its 80 x 80 image
    assert second["radial_error_px"] == pytest.approx(0.0, abs=1e-9)


def test_grounding_priors_on_synthetic_data_are_imperfect_but_not_null(priors):
    for result in priors.values():
        per_task = result.metrics["per_task"]
        assert 0 < per_task["segment"]["dice"] < 1
        assert 0 < per_task["detect"]["box_iou"] < 1
        assert np.isfinite(per_task["measure"]["radial_error_px"])
        assert np.isfinite(per_task["measure"]["measurement_abs_mm"])


# ----------------------------------------------------------------------------- inputs
def test_bad_inputs_raise(data):
    train, test = data
    with pytest.raises(ValueError, match="train split is empty"):
        prior_result([], test, by_region=True, image_size=SIZE, measure_pairs=PAIRS)
    with pytest.raises(ValueError, match="unknown task"):
        prior_results(train, test, ("caption",), image_size=SIZE, measure_pairs=PAIRS)


def test_a_datasets_dataset_gives_the_same_result(data):
    from echomoe.data.schema import to_hf_dataset

    train, test = data[0][:14], data[1][:7]
    kwargs = {"by_region": True, "image_size": SIZE, "measure_pairs": PAIRS}
    from_lists = prior_result(train, test, **kwargs)
    from_datasets = prior_result(to_hf_dataset(train), to_hf_dataset(test), **kwargs)
    assert [r["prediction"] for r in from_datasets.records] == [
        r["prediction"] for r in from_lists.records]
    assert from_datasets.metrics["overall"] == pytest.approx(from_lists.metrics["overall"],
                                                            nan_ok=True)


# ----------------------------------------------------------------------------- report ceiling
def test_report_ceiling_has_every_finding_but_not_the_phrasing(data, priors):
    _, test = data
    ceiling = report_ceiling(test)
    overall = ceiling.metrics["overall"]
    # the true attributes: every finding is found; another phrasing: BLEU-1 well below 1, and
    # above the per-region prior's (which guesses the findings)
    assert overall["report/finding_f1_micro"] == pytest.approx(1.0)
    assert 0.4 < overall["report/bleu1"] < 0.9
    assert overall["report/bleu1"] > priors["prior_region"].metrics["overall"]["report/bleu1"]
    assert [r["reference"] for r in ceiling.records] == [
        ex.reference for ex in build_examples(test, ["report"], 0)]
    assert all(r["prediction"] != r["reference"] for r in ceiling.records)
    # the same phrasing seed rewrites the same text; real (non-synthetic) cases are skipped
    texts = [r["prediction"] for r in ceiling.records]
    assert [r["prediction"] for r in report_ceiling(test).records] == texts
    assert [r["prediction"] for r in report_ceiling(test, phrasing_seed=2).records] != texts
    assert report_ceiling([_case(0, findings="a cyst")]) is None
