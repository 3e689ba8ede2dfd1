"""Routing analytics, the evaluation harness and ``experiments/evaluate.py`` (tiny, CPU)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from echomoe.data.collate import resize_mask
from echomoe.data.schema import to_hf_dataset
from echomoe.data.synthetic.generate import generate
from echomoe.data.tasks import TASKS, primary_box, primary_mask_name
from echomoe.metrics.harness import (
    TASK_METRICS,
    build_examples,
    diagnosis_label,
    evaluate_model,
    score_examples,
    summarize,
    write_results,
)
from echomoe.metrics.routing import (
    LAYER_KEYS,
    RoutingAccumulator,
    report_scalars,
    routing_heatmap,
    routing_report,
)
from echomoe.moe.layer import RoutingInfo

ROOT = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------- routing
def _info(regions: torch.Tensor, experts: torch.Tensor, num_experts: int) -> RoutingInfo:
    probs = torch.nn.functional.one_hot(experts, num_experts).float()
    return RoutingInfo(expert_ids=experts[:, None], weights=torch.ones(len(experts), 1),
                       probs=probs, region_ids=regions, num_experts=num_experts)


def test_routing_report_one_to_one_and_independent():
    r = torch.arange(4).repeat_interleave(5)
    one_to_one = _info(r, r.clone(), 4)
    independent = _info(torch.arange(4).repeat(4), torch.arange(4).repeat_interleave(4), 4)
    report = routing_report({"a": one_to_one, "b": independent}, num_regions=4)
    assert list(report) == ["a", "b"]
    assert set(report["a"]) == set(LAYER_KEYS)
    assert report["a"]["nmi"] == pytest.approx(1.0)
    assert report["b"]["nmi"] == pytest.approx(0.0, abs=1e-9)
    assert report["a"]["region_expert"] == (5 * np.eye(4, dtype=int)).tolist()
    assert report["a"]["load_cv"] == pytest.approx(0.0)
    assert report["a"]["entropy"] == pytest.approx(0.0)
    assert report["a"]["dropped_fraction"] == 0.0
    json.dumps(report)  # plain Python
    scalars = report_scalars(report)
    assert scalars["routing/mean/nmi"] == pytest.approx(0.5)


def test_accumulator_equals_one_big_batch_and_masks_tokens():
    r = torch.arange(3).repeat(4)
    e = torch.tensor([0, 1, 1, 2, 0, 1, 2, 2, 0, 0, 1, 2])
    acc = RoutingAccumulator(3)
    acc.update({"l": _info(r[:5], e[:5], 3)}).update({"l": _info(r[5:], e[5:], 3)})
    assert acc.report() == routing_report({"l": _info(r, e, 3)}, 3)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    masked = routing_report({"l": _info(r, e, 3)}, 3, token_mask=mask)["l"]
    assert masked["num_tokens"] == 9
    assert sum(map(sum, masked["region_expert"])) == 9
    # relabel by per-sample regions (broadcast over the 6 tokens of each of 2 samples)
    relabelled = routing_report({"l": _info(r, e, 3)}, 3, region_ids=torch.tensor([0, 2]))["l"]
    assert [sum(row) for row in relabelled["region_expert"]] == [6, 0, 6]
    no_regions = RoutingInfo(e[:, None], torch.ones(12, 1), torch.ones(12, 3) / 3, None, 3)
    assert routing_report({"l": no_regions}, 3, region_ids=torch.tensor([1, 1]))["l"][
        "region_expert"][1] == torch.bincount(e, minlength=3).tolist()
    with pytest.raises(ValueError, match="token_mask"):
        routing_report({"l": _info(r, e, 3)}, 3, token_mask=torch.ones(5))


def test_routing_heatmap_png(tmp_path):
    r = torch.arange(4).repeat_interleave(5)
    report = routing_report({"layers.0": _info(r, r.clone(), 4),
                             "layers.1": _info(r, (r + 1) % 4, 4)}, num_regions=4)
    path = tmp_path / "sub" / "routing.png"
    fig = routing_heatmap(report, ["a", "b", "c", "d"], path=path, title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000
    assert len([ax for ax in fig.axes if ax.images]) == 2  # one panel per layer
    # raw matrices work too; rows are normalised
    routing_heatmap({"x": torch.tensor([[2, 2], [0, 0]])}, ["a", "b"])
    with pytest.raises(ValueError, match="region names"):
        routing_heatmap(report, ["a", "b"])


# ----------------------------------------------------------------------------- harness
@pytest.fixture(scope="module")
def tiny():
    from echomoe.models import build_model, build_processor

    torch.manual_seed(0)
    model = build_model("tiny", "moe_region_hard")
    return model, build_processor("tiny", num_samples=40, config=model.config)


@pytest.fixture(scope="module")
def samples():
    return generate(6, seed=0)


def test_evaluate_model_every_task(tiny, samples, tmp_path):
    model, processor = tiny
    result = evaluate_model(model, processor, samples, batch_size=8, max_new_tokens=3,
                            progress=False)
    m = result.metrics
    assert list(m["per_task"]) == list(TASKS)
    for task in TASKS:
        row = m["per_task"][task]
        assert set(row) == {"n", *TASK_METRICS[task]}
        for key, value in row.items():
            assert isinstance(value, (int, float)) and not math.isinf(value), (task, key)
        for key in ("dice", "iou", "box_iou", "acc50", "radial_error_px", "accuracy", "bleu1",
                    "cider", "closed_accuracy", "finding_f1_micro", "task_token_rate",
                    "measurement_abs_mm"):
            if key in row:
                assert math.isfinite(row[key]), (task, key)
    assert set(m["per_region"]) == {s.region for s in samples}
    for region, tasks in m["per_region"].items():
        assert set(tasks) == set(TASKS), region
    assert m["overall"]["num_samples"] == 6
    assert len(result.records) == m["overall"]["num_examples"]
    assert len(result.records) == sum(m["per_task"][t]["n"] for t in TASKS)
    assert m["per_task"]["vqa"]["n"] == sum(len(s.qa) for s in samples)
    assert {"id", "region", "task", "prompt", "prediction", "reference", "scores"} <= set(
        result.records[0])
    # routing over every evaluated token; region-hard routing ties experts to regions
    assert set(result.routing) == {"layers.0", "layers.1"}
    assert result.routing["layers.0"]["nmi"] > 0.2
    paths = write_results(result, tmp_path)
    loaded = json.loads(paths["json"].read_text())
    assert loaded["metrics"]["per_task"]["report"]["n"] == 6
    assert len(paths["records"].read_text().splitlines()) == len(result.records)
    assert "| all |" in paths["markdown"].read_text()


def test_evaluate_model_hf_dataset_is_deterministic(tiny, samples):
    model, processor = tiny
    kwargs = dict(tasks=("diagnosis", "detect"), max_new_tokens=2, progress=False)
    a = evaluate_model(model, processor, samples[:3], **kwargs)
    b = evaluate_model(model, processor, to_hf_dataset(samples[:3]), batch_size=2, **kwargs)
    assert [r["prompt"] for r in a.records] == [r["prompt"] for r in b.records]
    assert [r["prediction"] for r in a.records] == [r["prediction"] for r in b.records]
    assert a.metrics["per_task"]["detect"]["box_iou"] == pytest.approx(
        b.metrics["per_task"]["detect"]["box_iou"], abs=1e-5)
    c = evaluate_model(model, processor, samples[:3], tasks=("detect",), max_new_tokens=2,
                       progress=False, force_task_token=False)
    for row in c.records:  # without its [DET] a row scores as a miss
        assert row["scores"]["task_token"] == 1.0 or row["scores"]["box_iou"] == 0.0
    with pytest.raises(ValueError, match="unknown task"):
        evaluate_model(model, processor, samples[:1], tasks=("caption",), progress=False)


def test_evaluate_model_routes_with_predicted_regions_unless_given(tiny, samples, monkeypatch):
    from echomoe.data.schema import REGIONS

    model, processor = tiny
    seen = []
    generate_ = model.generate

    def spy(*args, **kwargs):
        seen.append(kwargs.get("region_ids"))
        return generate_(*args, **kwargs)

    monkeypatch.setattr(model, "generate", spy)
    kwargs = dict(tasks=("diagnosis",), max_new_tokens=2, progress=False)
    fair = evaluate_model(model, processor, samples[:3], **kwargs)
    assert seen == [None] and fair.settings["regions"] == "predicted"
    seen.clear()
    oracle = evaluate_model(model, processor, samples[:3], regions="given", **kwargs)
    assert torch.equal(seen[0].cpu(), torch.tensor([REGIONS.index(s.region)
                                                    for s in samples[:3]]))
    assert oracle.settings["regions"] == "given"
    with pytest.raises(ValueError, match="regions must be one of predicted, given"):
        evaluate_model(model, processor, samples[:1], regions="oracle", **kwargs)


def test_oracle_predictions_score_perfectly(samples):
    size, pairs = 32, [(0, 1), (2, 3)]
    examples = build_examples(samples, TASKS)
    for ex in examples:
        s, ex.prediction = ex.sample, ex.reference
        if ex.task == "segment":
            ex.ground = {"masks": resize_mask(s.masks[primary_mask_name(s)], (size, size)) > 0}
        elif ex.task == "detect":
            x0, y0, x1, y1 = primary_box(s)["bbox"]
            ex.ground = {"boxes_xyxy": np.array([x0, y0, x1 + 1, y1 + 1], dtype=float)}
        elif ex.task == "measure":
            pts = np.array(list(s.keypoints.values()), dtype=float)
            mm = [np.hypot(*(pts[b] - pts[a])) * s.pixel_spacing if b < len(pts) else 0.0
                  for a, b in pairs]
            ex.ground = {"keypoints_px": np.pad(pts, ((0, 4 - len(pts)), (0, 0))),
                         "measurements_mm": np.array(mm)}
    score_examples(examples, size, pairs)
    per_task = summarize(examples, TASKS, len(samples))["per_task"]
    assert per_task["report"]["bleu4"] == pytest.approx(1.0)
    assert per_task["report"]["finding_f1_micro"] == pytest.approx(1.0)
    assert per_task["report"]["size_error_mm"] == pytest.approx(0.0, abs=0.06)
    assert per_task["vqa"]["exact_match"] == 1.0
    assert per_task["diagnosis"]["accuracy"] == 1.0
    assert per_task["segment"]["dice"] == 1.0 and per_task["segment"]["hd95_mm"] == 0.0
    assert per_task["detect"]["box_iou"] == pytest.approx(1.0) and per_task["detect"][
        "acc50"] == 1.0
    assert per_task["measure"]["radial_error_px"] == 0.0
    assert per_task["measure"]["measurement_abs_mm"] == pytest.approx(0.0, abs=1e-9)
    assert per_task["measure"]["measurement_bias_mm"] == pytest.approx(0.0, abs=1e-9)
    # A caliper pair's ends are unordered: the long axis drawn end to start scores the same;
    # a point moved by 3 px does not.
    ex = next(e for e in examples if e.task == "measure")
    ex.ground["keypoints_px"] = ex.ground["keypoints_px"][[1, 0, 2, 3]]
    ex.scores = {}
    score_examples([ex], size, pairs)
    assert ex.scores["radial_error_px"] == pytest.approx(0.0, abs=1e-9)
    ex.ground["keypoints_px"][2] += [3.0, 0.0]
    score_examples([ex], size, pairs)
    assert ex.scores["radial_error_px"] == pytest.approx(3.0 / 4)


def test_diagnosis_label():
    assert diagnosis_label("breast", "birads_4") == "birads_4"
    assert diagnosis_label("breast", "BI-RADS 4") == "birads_4"
    assert diagnosis_label("vessel", "Stenosis lt50") == "stenosis_lt50"
    assert diagnosis_label("kidney", "Renal cyst.") == "renal_cyst"
    assert diagnosis_label("thyroid", "nonsense") is None
    assert diagnosis_label("unknown", " Foo ") == "foo"


# ----------------------------------------------------------------------------- script
def _script():
    spec = importlib.util.spec_from_file_location("evaluate_script",
                                                  ROOT / "experiments" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_evaluate_script_synthetic(tmp_path, capsys):
    out = tmp_path / "eval"
    rc = _script().main(["--preset", "tiny", "--variant", "moe_region_hard", "--synthetic", "4",
                         "--max-new-tokens", "2", "--corpus-samples", "40", "--no-progress",
                         "--out", str(out)])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["metrics"]["per_task"]) == set(TASKS)
    assert metrics["settings"]["model"] == "tiny/moe_region_hard"
    assert (out / "metrics.md").read_text().startswith("# Evaluation")
    assert (out / "routing.png").stat().st_size > 1000
    assert json.loads(capsys.readouterr().out)["paths"]["json"] == str(out / "metrics.json")


def test_evaluate_script_checkpoint_and_data(tiny, samples, tmp_path):
    from datasets import DatasetDict

    model, processor = tiny
    model.save_pretrained(tmp_path / "ckpt")
    processor.save_pretrained(tmp_path / "ckpt")
    DatasetDict({"test": to_hf_dataset(samples[:2])}).save_to_disk(str(tmp_path / "data"))
    out = tmp_path / "eval"
    rc = _script().main(["--checkpoint", str(tmp_path / "ckpt"), "--data", str(tmp_path / "data"),
                         "--split", "test", "--tasks", "diagnosis", "segment",
                         "--max-new-tokens", "2", "--no-progress", "--out", str(out)])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["metrics"]["per_task"]) == {"diagnosis", "segment"}
    assert metrics["metrics"]["overall"]["num_samples"] == 2
    with pytest.raises(SystemExit, match="no split"):
        _script().main(["--checkpoint", str(tmp_path / "ckpt"), "--data",
                        str(tmp_path / "data"), "--split", "train", "--out", str(out)])


def test_measure_from_mask_spans_the_segmented_lesion(tiny, monkeypatch):
    """``measure="mask"``: given the true lesion mask, the calipers are the reference ones
    (the benchmark's calipers span that mask), so the measurement error is exactly 0; the
    left-ventricle measurements and the keypoint protocol keep the head's points."""
    from echomoe.data.synthetic.generate import SyntheticConfig
    from echomoe.data.tasks import measured_mask_name

    model, processor = tiny
    cases = generate(14, seed=3, config=SyntheticConfig(image_size=model.config.image_size))
    lesions = [s for s in cases if len(s.keypoints) >= 2 and measured_mask_name(s)]
    assert 0 < len(lesions) < sum(len(s.keypoints) >= 2 for s in cases)  # some LV-only cases
    seg_id, ground = model.config.seg_token_id, model.ground
    calls = []

    def oracle_masks(ids, *args, **kwargs):
        out = ground(ids, *args, **kwargs)
        if (ids == seg_id).any():  # the lesion query of the mask protocol
            calls.append(len(ids))
            out["masks"] = torch.from_numpy(np.stack([s.masks["lesion"] for s in lesions]))
        return out

    monkeypatch.setattr(model, "ground", oracle_masks)
    kwargs = dict(tasks=("measure",), batch_size=16, max_new_tokens=2, progress=False)
    head = evaluate_model(model, processor, cases, **kwargs)
    assert calls == [] and math.isnan(head.metrics["per_task"]["measure"]["mask_calipers_rate"])
    result = evaluate_model(model, processor, cases, measure="mask", **kwargs)
    assert calls == [len(lesions)] and result.settings["measure"] == "mask"
    row = result.metrics["per_task"]["measure"]
    assert row["mask_calipers_rate"] == pytest.approx(len(lesions) / row["n"])
    for rec, ref in zip(result.records, head.records, strict=True):
        if rec["scores"]["mask_calipers"]:
            assert rec["scores"]["measurement_abs_mm"] == pytest.approx(0.0, abs=1e-4)
            assert rec["scores"]["radial_error_px"] == pytest.approx(0.0, abs=1e-4)
        else:
            assert rec["scores"] == {**ref["scores"], "mask_calipers": 0.0}
    with pytest.raises(ValueError, match="measure must be one of keypoints, mask"):
        evaluate_model(model, processor, cases[:1], measure="masks", **kwargs)
    monkeypatch.setitem(model.config.grounding_config, "measure_pairs", [[0, 2], [1, 3]])
    with pytest.raises(ValueError, match=r"measure='mask' needs grounding_config measure_pairs"):
        evaluate_model(model, processor, cases[:1], measure="mask", **kwargs)
