"""Clinical-correctness, VQA and grounding metrics: golden values and reference cross-checks."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from echomoe.data.synthetic.generate import generate
from echomoe.data.synthetic.reports import parse_diagnosis, write_report
from echomoe.metrics.detection import box_accuracy, box_iou, inclusive_to_edges
from echomoe.metrics.findings import (
    NUMERIC_KEYS,
    diagnosis_metrics,
    finding_f1,
    roc_auc,
    size_error_mm,
)
from echomoe.metrics.keypoints import measurement_error, radial_error
from echomoe.metrics.segmentation import aggregate, boundary, dice, hausdorff, hd95, iou
from echomoe.metrics.vqa import normalize_answer, token_f1, vqa_metrics


@pytest.fixture(scope="module")
def samples():
    return generate(14, seed=0)  # every region twice, lesion and normal studies


def _texts(samples):
    return [f"{s.findings} {s.impression}" for s in samples]


# ----------------------------------------------------------------------------- finding F1
def test_finding_f1_report_vs_itself_is_one(samples):
    regions = [s.region for s in samples]
    out = finding_f1(regions, _texts(samples), [s.attributes for s in samples])
    assert out["micro_f1"] == 1.0 and out["macro_f1"] == 1.0
    assert out["fp"] == out["fn"] == 0
    assert out["tp"] == sum(len(s.attributes) for s in samples)
    assert set(out["per_region"]) == set(regions)
    assert all(r["micro_f1"] == 1.0 and r["macro_f1"] == 1.0 for r in out["per_region"].values())
    assert out["per_sample_f1"] == [1.0] * len(samples)
    # the "Findings: ... Impression: ..." form parses too
    assert finding_f1(regions, [s.report for s in samples],
                      [s.attributes for s in samples])["micro_f1"] == 1.0


def test_finding_f1_perturbed_margin_exact_drop(samples):
    regions = [s.region for s in samples]
    refs = [copy.deepcopy(s.attributes) for s in samples]
    i = next(k for k, s in enumerate(samples) if s.attributes.get("margin") == "indistinct")
    refs[i]["margin"] = "spiculated"  # the report still says indistinct
    out = finding_f1(regions, _texts(samples), refs)
    total = sum(len(a) for a in refs)
    assert (out["tp"], out["fp"], out["fn"]) == (total - 1, 1, 1)
    assert out["micro_f1"] == pytest.approx((total - 1) / total, abs=1e-12)
    m = sum("margin" in a for a in refs)
    keys = {k for a in refs for k in a}
    expected_macro = (len(keys) - 1 + (m - 1) / m) / len(keys)
    assert out["macro_f1"] == pytest.approx(expected_macro, abs=1e-12)
    assert out["per_key"]["margin"]["f1"] == pytest.approx((m - 1) / m)
    n_i = len(refs[i])
    assert out["per_sample_f1"][i] == pytest.approx((n_i - 1) / n_i)
    region = regions[i]
    per = out["per_region"][region]
    total_r = sum(len(a) for a, r in zip(refs, regions, strict=True) if r == region)
    assert per["micro_f1"] == pytest.approx((total_r - 1) / total_r)
    others = [r for r in out["per_region"] if r != region]
    assert all(out["per_region"][r]["micro_f1"] == 1.0 for r in others)


def test_finding_f1_numeric_tolerance_and_hallucination(samples):
    s = next(x for x in samples if x.region == "breast" and x.attributes["lesion_present"])
    text, n = _texts([s])[0], len(s.attributes)
    near = dict(s.attributes, size_long_mm=s.attributes["size_long_mm"] + 0.5)
    far = dict(s.attributes, size_long_mm=s.attributes["size_long_mm"] + 1.5)
    assert finding_f1(["breast"], [text], [near])["micro_f1"] == 1.0
    assert finding_f1(["breast"], [text], [far])["micro_f1"] == pytest.approx((n - 1) / n)
    assert finding_f1(["breast"], [text], [near], tolerances={})["micro_f1"] == pytest.approx(
        (n - 1) / n)
    cat = finding_f1(["breast"], [text], [far], ignore_keys=NUMERIC_KEYS)
    assert cat["micro_f1"] == 1.0 and "size_long_mm" not in cat["per_key"]
    # a lesion described in a normal study: every lesion slot is a false positive
    normal = next(x for x in samples if x.region == "breast" and not x.attributes["lesion_present"])
    out = finding_f1(["breast"], [text], [normal.attributes])
    assert out["fp"] > 0 and out["micro_f1"] < 1.0
    # an empty report: all false negatives, F1 0, precision undefined
    empty = finding_f1(["breast"], [""], [s.attributes])
    assert empty["micro_f1"] == 0.0 and empty["fn"] == n and math.isnan(empty["precision"])
    assert finding_f1(["breast"], [None], [s.attributes])["micro_f1"] == 0.0


def test_size_error_mm(samples):
    regions = [s.region for s in samples]
    refs = [s.attributes for s in samples]
    lesion = [i for i, a in enumerate(refs) if "size_long_mm" in a]
    preds = _texts(samples)
    i, j = lesion[0], lesion[1]
    bumped = dict(refs[i], size_long_mm=round(refs[i]["size_long_mm"] + 2.0, 1),
                  size_short_mm=round(refs[i]["size_short_mm"] - 0.5, 1))
    preds[i] = " ".join(write_report(regions[i], bumped, np.random.default_rng(3)))
    preds[j] = "No size stated."
    out = size_error_mm(regions, preds, refs)
    assert out["n_reference"] == len(lesion)
    assert out["n_missing"] == 1 and out["n_found"] == len(lesion) - 1
    assert out["abs_error_long_mm"][i] == pytest.approx(2.0)
    assert out["abs_error_short_mm"][i] == pytest.approx(0.5)
    assert np.isnan(out["abs_error_long_mm"][j])
    k = len(lesion) - 1
    assert out["long_mae_mm"] == pytest.approx(2.0 / k)
    assert out["mae_mm"] == pytest.approx(2.5 / (2 * k))
    assert out["per_region"][regions[j]]["n_missing"] == 1
    assert size_error_mm(["breast"], [""], [{"lesion_present": False}])["n_reference"] == 0


# ----------------------------------------------------------------------------- diagnosis
def test_diagnosis_metrics_hand_values():
    true = ["a", "a", "b", "b", "c"]
    pred = ["a", "b", "b", "b", None]
    out = diagnosis_metrics(pred, true)
    assert out["accuracy"] == pytest.approx(3 / 5)
    # a: tp1 fp0 fn1 -> 2/3; b: tp2 fp1 fn0 -> 4/5; c: tp0 fp0 fn1 -> 0
    assert out["per_class"]["a"]["f1"] == pytest.approx(2 / 3)
    assert out["per_class"]["b"]["f1"] == pytest.approx(4 / 5)
    assert out["per_class"]["c"]["f1"] == 0.0
    assert out["macro_f1"] == pytest.approx(22 / 45)
    assert out["n_invalid"] == 1
    by_region = diagnosis_metrics(pred, true, regions=["x", "x", "y", "y", "y"])
    assert by_region["per_region"]["x"]["accuracy"] == 0.5
    assert by_region["per_region"]["y"]["accuracy"] == pytest.approx(2 / 3)


def test_auc_hand_value_with_ties():
    # positives 0.9, 0.4; negatives 0.5, 0.1, 0.4: 3 + (0 + 1 + 0.5) = 4.5 of 6 pairs
    assert roc_auc([0.9, 0.4, 0.5, 0.1, 0.4], [1, 1, 0, 0, 0]) == pytest.approx(0.75)
    assert math.isnan(roc_auc([0.1, 0.2], [1, 1]))


def test_diagnosis_metrics_vs_torchmetrics():
    from torchmetrics.functional.classification import multiclass_auroc, multiclass_f1_score

    rng = np.random.default_rng(0)
    labels = ["normal", "birads_2", "birads_3", "birads_4"]
    true_idx = np.r_[np.arange(4), rng.integers(0, 4, 56)]
    scores = rng.random((60, 4))
    scores[np.arange(60), true_idx] += rng.random(60) * 0.8  # informative but imperfect
    scores = np.round(scores / scores.sum(1, keepdims=True), 2)  # in [0, 1] (no softmax); ties
    pred_idx = scores.argmax(1)
    out = diagnosis_metrics([labels[i] for i in pred_idx], [labels[i] for i in true_idx],
                            scores=scores, labels=labels)
    s, t = torch.tensor(scores), torch.tensor(true_idx)
    f1_ref = multiclass_f1_score(torch.tensor(pred_idx), t, num_classes=4, average="macro")
    auc_ref = multiclass_auroc(s, t, num_classes=4, average="macro", thresholds=None)
    assert out["accuracy"] == pytest.approx(float((pred_idx == true_idx).mean()))
    assert out["macro_f1"] == pytest.approx(float(f1_ref), abs=1e-6)
    assert out["auc_macro"] == pytest.approx(float(auc_ref), abs=1e-6)
    with pytest.raises(ValueError, match="labels"):
        diagnosis_metrics(["a"], ["a"], scores=[[1.0]])


def test_diagnosis_from_generated_reports(samples):
    pred = [parse_diagnosis(s.region, t) for s, t in zip(samples, _texts(samples), strict=True)]
    out = diagnosis_metrics(pred, [s.diagnosis for s in samples],
                            regions=[s.region for s in samples])
    assert out["accuracy"] == 1.0 and out["macro_f1"] == 1.0 and out["n_invalid"] == 0


# ----------------------------------------------------------------------------- VQA
@pytest.mark.parametrize("raw, expected", [
    ("BI-RADS 4", "birads 4"),
    ("birads_4", "birads 4"),
    ("12.30mm", "12.3 mm"),
    ("12.0 mm", "12 mm"),
    ("45%", "45"),
    ("The lesion is Oval.", "lesion is oval"),
    ("  An anechoic   cyst!", "anechoic cyst"),
    ("Yes, it is.", "yes it is"),
    ("0.50", "0.5"),
    ("middle right", "middle right"),
    (None, ""),
])
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_vqa_metrics_hand_values():
    preds = ["Yes, it is.", "no", "maybe", "Spiculated.", "12.3", "the oval", "left"]
    answers = ["yes", "yes", "no", "spiculated", "12.3 mm", "oval", "middle right"]
    types = ["yes_no", "yes_no", "yes_no", "choice", "open", "open", "open"]
    out = vqa_metrics(preds, answers, types)
    assert out["per_type"]["yes_no"]["accuracy"] == pytest.approx(1 / 3)
    assert out["per_type"]["choice"]["accuracy"] == 1.0
    assert out["closed_accuracy"] == pytest.approx(2 / 4)
    assert out["open_exact_match"] == pytest.approx(1 / 3)
    assert out["open_token_f1"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert token_f1("12.3", "12.3 mm") == pytest.approx(2 / 3)
    assert token_f1("", "") == 1.0 and token_f1("", "x") == 0.0
    assert out["n"] == 7


def test_vqa_metrics_on_generated_qa(samples):
    qa = [(q, s.region) for s in samples for q in s.qa]
    answers = [q["answer"] for q, _ in qa]
    types = [q["type"] for q, _ in qa]
    out = vqa_metrics(answers, answers, types, regions=[r for _, r in qa])
    assert out["closed_accuracy"] == 1.0 and out["open_exact_match"] == 1.0
    assert out["token_f1"] == 1.0 and set(out["per_region"]) == {s.region for s in samples}
    flipped = [{"yes": "no", "no": "yes"}.get(a, a) for a in answers]
    n_yes_no = types.count("yes_no")
    bad = vqa_metrics(flipped, answers, types)
    assert bad["per_type"]["yes_no"]["accuracy"] == 0.0
    n_closed = n_yes_no + types.count("choice")
    assert bad["closed_accuracy"] == pytest.approx(1 - n_yes_no / n_closed)


# ----------------------------------------------------------------------------- segmentation
def _random_masks(n=8, size=40, seed=0):
    """Random blobs (unions of discs) so boundaries are non-trivial."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    out = np.zeros((n, size, size), dtype=bool)
    for i in range(n):
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.uniform(0, size, 2)
            r = rng.uniform(3, size / 3)
            out[i] |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    return out


def test_dice_iou_golden():
    a = np.zeros((3, 6, 8), dtype=bool)
    b = np.zeros((3, 6, 8), dtype=bool)
    a[0, 1:4, 1:5] = b[0, 1:4, 1:5] = True  # identical
    a[1, 0:2, 0:2] = True  # disjoint
    b[1, 4:6, 6:8] = True
    a[2, 0:4, 0:4] = True  # 4x4 squares overlapping in 4x2 = 8 pixels
    b[2, 0:4, 2:6] = True
    np.testing.assert_allclose(dice(a, b), [1.0, 0.0, 0.5])
    np.testing.assert_allclose(iou(a, b), [1.0, 0.0, 8 / 24])
    np.testing.assert_allclose(dice(torch.from_numpy(a), torch.from_numpy(b)), [1.0, 0.0, 0.5])
    assert dice(a[2], b[2]).shape == (1,)


def test_empty_mask_conventions():
    z = np.zeros((2, 5, 5), dtype=bool)
    one = z.copy()
    one[1, 2, 2] = True
    # sample 0: both empty; sample 1: prediction empty, reference not
    np.testing.assert_array_equal(dice(z, one), [1.0, 0.0])
    np.testing.assert_array_equal(iou(z, one), [1.0, 0.0])
    assert np.isnan(dice(z, one, empty="nan")[0]) and dice(z, one, empty="zero")[0] == 0.0
    h = hd95(z, one)
    assert h[0] == 0.0 and np.isnan(h[1])
    assert hd95(one, z, empty_penalty=99.0)[1] == 99.0
    with pytest.raises(ValueError):
        dice(z, one, empty="bogus")


def test_aggregate_reports_undefined_values():
    out = aggregate([1.0, float("nan"), 0.5, float("inf")], regions=["a", "a", "b", "b"])
    assert out["mean"] == pytest.approx(0.75)
    assert (out["n"], out["n_finite"], out["n_nan"], out["n_inf"]) == (4, 2, 1, 1)
    assert out["per_region"]["a"]["mean"] == 1.0 and out["per_region"]["a"]["n_nan"] == 1
    assert out["per_region"]["b"]["n_inf"] == 1
    assert math.isnan(aggregate([float("nan")])["mean"])


def test_mask_input_validation():
    with pytest.raises(ValueError, match="0/1"):
        dice(np.full((1, 3, 3), 0.7), np.zeros((1, 3, 3)))
    with pytest.raises(ValueError, match="shape"):
        dice(np.zeros((1, 3, 3), bool), np.zeros((1, 3, 4), bool))
    np.testing.assert_array_equal(dice(np.ones((1, 2, 2)), np.ones((1, 2, 2), int)), [1.0])


@pytest.mark.filterwarnings("ignore:dice_score metric currently defaults:UserWarning")
def test_dice_iou_vs_torchmetrics():
    from torchmetrics.functional.classification import binary_f1_score, binary_jaccard_index
    from torchmetrics.functional.segmentation import dice_score

    pred, true = _random_masks(seed=1), _random_masks(seed=2)
    p, t = torch.from_numpy(pred).long(), torch.from_numpy(true).long()
    ref_dice = dice_score(p, t, num_classes=2, include_background=False, input_format="index",
                          average="micro", aggregation_level="samplewise")
    np.testing.assert_allclose(dice(pred, true), ref_dice.reshape(-1).numpy(), atol=1e-6)
    ref_f1 = [float(binary_f1_score(p[i], t[i])) for i in range(len(p))]
    ref_iou = [float(binary_jaccard_index(p[i], t[i])) for i in range(len(p))]
    np.testing.assert_allclose(dice(pred, true), ref_f1, atol=1e-6)
    np.testing.assert_allclose(iou(pred, true), ref_iou, atol=1e-6)


def _brute_hd(pred, true, spacing, q):
    """Independent reference: explicit 4-neighbour boundary, all-pairs distances."""
    def edge(m):
        h, w = m.shape
        pts = []
        for y in range(h):
            for x in range(w):
                outside = [not (0 <= y + dy < h and 0 <= x + dx < w) or not m[y + dy, x + dx]
                           for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1))]
                if m[y, x] and any(outside):
                    pts.append((y * spacing[0], x * spacing[1]))
        return np.array(pts)
    a, b = edge(pred), edge(true)
    d = np.sqrt(((a[:, None] - b[None]) ** 2).sum(-1))
    return max(np.percentile(d.min(1), q), np.percentile(d.min(0), q))


def test_hd95_golden_and_brute_force():
    a = np.zeros((2, 8, 8), dtype=bool)
    b = np.zeros((2, 8, 8), dtype=bool)
    a[0, 1, 1], b[0, 4, 5] = True, True  # 3-4-5 triangle
    a[1, 2, 2], b[1, 2, 6] = True, True  # 4 columns apart
    np.testing.assert_allclose(hd95(a, b), [5.0, 4.0])
    np.testing.assert_allclose(hd95(a, b, spacing_mm=[[1.0, 1.0], [1.0, 0.5]]), [5.0, 2.0])
    np.testing.assert_allclose(hd95(a, b, spacing_mm=[2.0, 0.5]), [10.0, 2.0])
    same = _random_masks(n=2, seed=5)
    np.testing.assert_array_equal(hd95(same, same), [0.0, 0.0])
    pred, true = _random_masks(n=4, size=24, seed=3), _random_masks(n=4, size=24, seed=4)
    spacing = np.array([[0.3, 0.3], [1.25, 1.25], [0.5, 0.8], [1.0, 1.0]])
    for q, fn in ((95, hd95), (100, lambda p, t, spacing_mm: hausdorff(p, t, spacing_mm, 100))):
        ours = fn(pred, true, spacing_mm=spacing)
        ref = [_brute_hd(pred[i], true[i], spacing[i], q) for i in range(4)]
        np.testing.assert_allclose(ours, ref, rtol=1e-12)
    edge = boundary(np.ones((3, 3), dtype=bool))
    assert edge.sum() == 8 and not edge[1, 1]


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_hd95_vs_monai():
    pytest.importorskip("scipy")
    monai_metrics = pytest.importorskip("monai.metrics")
    pred, true = _random_masks(n=6, seed=7), _random_masks(n=6, seed=8)
    spacing = np.array([0.3125, 0.9375, 1.25, 1.09375, 0.234375, 0.5])  # per sample, isotropic
    ref = monai_metrics.compute_hausdorff_distance(
        torch.from_numpy(pred[:, None]).float(), torch.from_numpy(true[:, None]).float(),
        percentile=95, spacing=[[float(s), float(s)] for s in spacing])
    np.testing.assert_allclose(hd95(pred, true, spacing_mm=spacing), ref.reshape(-1).numpy(),
                               rtol=1e-5)


# ----------------------------------------------------------------------------- boxes
def test_box_iou_and_accuracy():
    pred = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.5, 0.5, 0.2, 0.2], [0.2, 0.2, 0.1, 0.1]])
    true = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.6, 0.5, 0.2, 0.2], [0.8, 0.8, 0.1, 0.1]])
    np.testing.assert_allclose(box_iou(pred, true), [1.0, 1 / 3, 0.0], atol=1e-6)
    assert box_iou([0, 0, 2, 2], [1, 1, 3, 3], fmt="xyxy")[0] == pytest.approx(1 / 7)
    # exactly 0.5 counts: [0, 0, 2, 1] inside [0, 0, 2, 2]
    ious = box_iou([[0, 0, 2, 2], [0, 0, 2, 1], [0, 0, 1, 1], [5, 5, 6, 6]],
                   [[0, 0, 2, 2], [0, 0, 2, 2], [0, 0, 2, 2], [0, 0, 2, 2]], fmt="xyxy")
    np.testing.assert_allclose(ious, [1.0, 0.5, 0.25, 0.0])
    assert box_accuracy([[0, 0, 2, 2], [0, 0, 2, 1], [0, 0, 1, 1], [5, 5, 6, 6]],
                        [[0, 0, 2, 2]] * 4, fmt="xyxy") == 0.5
    single_pixel = inclusive_to_edges([3, 3, 3, 3])
    assert box_iou(single_pixel, single_pixel, fmt="xyxy")[0] == 1.0
    assert box_iou([0, 0, 0, 0], [0, 0, 0, 0], fmt="xyxy")[0] == 0.0  # degenerate


# ----------------------------------------------------------------------------- keypoints
def test_radial_error_345_with_spacing():
    true = torch.tensor([[[0.10, 0.10], [0.5, 0.5]]])
    pred = torch.tensor([[[0.13, 0.12], [0.5, 0.5]]])  # W=100, H=200: dx 3 px, dy 4 px
    out = radial_error(pred, true, image_sizes=(200, 100), pixel_spacing=0.5)
    np.testing.assert_allclose(out["px"], [[5.0, 0.0]], atol=1e-5)
    np.testing.assert_allclose(out["mm"], [[2.5, 0.0]], atol=1e-5)
    px = radial_error([[4.0, 5.0]], [[1.0, 1.0]], pixel_spacing=[2.0])  # pixel coordinates
    assert px["px"][0, 0] == pytest.approx(5.0) and px["mm"][0, 0] == pytest.approx(10.0)
    assert np.isnan(radial_error([[4.0, 5.0]], [[1.0, 1.0]])["mm"]).all()


def test_radial_error_matches_measure_mm():
    from echomoe.grounding.heads import measure_mm

    g = torch.Generator().manual_seed(0)
    pred, true = torch.rand(5, 3, 2, generator=g), torch.rand(5, 3, 2, generator=g)
    sizes = torch.tensor([[128, 128], [100, 160], [64, 96], [128, 64], [200, 200]])
    spacing = torch.tensor([0.3, 0.5, 1.0, 1.25, 0.2])
    out = radial_error(pred, true, sizes, spacing)
    stacked = torch.cat([pred, true], dim=1)  # point k vs point k + 3
    ref = measure_mm(stacked, [(k, k + 3) for k in range(3)], sizes, spacing)
    np.testing.assert_allclose(out["mm"], ref.numpy(), rtol=1e-5)


def test_measurement_error():
    out = measurement_error([11.0, 9.0, 5.0], torch.tensor([10.0, 10.0, 0.0]))
    np.testing.assert_allclose(out["abs_mm"], [1.0, 1.0, 5.0])
    np.testing.assert_allclose(out["signed_mm"], [1.0, -1.0, 5.0])
    np.testing.assert_allclose(out["rel_pct"][:2], [10.0, 10.0])
    assert np.isnan(out["rel_pct"][2])
