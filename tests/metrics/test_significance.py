"""Paired bootstrap, record alignment and seed averages."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from echomoe.metrics.significance import (
    align_records,
    compare_runs,
    load_records,
    paired_bootstrap,
    seed_average,
    seed_summary,
)


def test_identical_runs_do_not_differ():
    a = np.random.default_rng(0).uniform(size=50)
    out = paired_bootstrap(a, a)
    assert out["diff"] == 0 and out["ci_low"] == out["ci_high"] == 0
    assert out["p_value"] == 1.0 and not out["significant"] and out["better"] is None


def test_a_real_shift_is_found_with_its_sign_and_size():
    rng = np.random.default_rng(1)
    b = rng.uniform(0.2, 0.6, 80)
    a = b + 0.1 + rng.normal(0, 0.02, 80)
    out = paired_bootstrap(a, b, num_resamples=4000)
    assert out["significant"] and out["better"] == "a" and out["p_value"] <= 1 / 4000 * 2
    assert out["ci_low"] < 0.1 < out["ci_high"] and out["diff"] == pytest.approx(0.1, abs=0.01)
    lower = paired_bootstrap(a, b, higher_is_better=False)
    assert lower["better"] == "b"  # an error metric: a is worse


def test_ci_matches_scipy_bootstrap_on_the_paired_differences():
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(2)
    b = rng.normal(0, 1, 200)
    a = b + rng.normal(0.05, 0.5, 200)
    out = paired_bootstrap(a, b, num_resamples=5000, seed=3)
    ref = scipy_stats.bootstrap(((a - b),), np.mean, n_resamples=5000, method="percentile",
                                random_state=4).confidence_interval
    width = ref.high - ref.low
    assert abs(out["ci_low"] - ref.low) < 0.15 * width
    assert abs(out["ci_high"] - ref.high) < 0.15 * width


def test_nan_pairs_are_dropped_and_the_seed_decides():
    a = np.array([1.0, 2.0, math.nan, 4.0, 5.0])
    b = np.array([0.0, math.nan, 1.0, 1.0, 2.0])
    out = paired_bootstrap(a, b, seed=5)
    assert out["n"] == 3 and out["diff"] == pytest.approx((1 + 3 + 3) / 3)
    assert paired_bootstrap(a, b, seed=5) == out
    empty = paired_bootstrap([math.nan], [1.0])
    assert empty["n"] == 0 and math.isnan(empty["diff"]) and not empty["significant"]
    with pytest.raises(ValueError, match="equal length"):
        paired_bootstrap([1.0, 2.0], [1.0])


def _rec(i, task, value, prompt="p"):
    return {"id": f"c{i}", "task": task, "prompt": prompt, "scores": {"dice": value}}


def test_align_records_pairs_by_case_and_refuses_duplicates():
    a = [_rec(i, "segment", i / 10) for i in range(5)] + [_rec(0, "detect", 1.0)]
    b = [_rec(i, "segment", i / 20) for i in reversed(range(1, 6))]
    x, y, keys = align_records(a, b, "segment", "dice")
    assert [k[0] for k in keys] == ["c1", "c2", "c3", "c4"]
    assert np.allclose(x, [0.1, 0.2, 0.3, 0.4]) and np.allclose(y, [0.05, 0.1, 0.15, 0.2])
    assert set(compare_runs(a, b, [("segment", "dice", True)])) == {"segment/dice"}
    with pytest.raises(ValueError, match="duplicate example"):
        align_records(a + [_rec(1, "segment", 0.0)], b, "segment", "dice")
    with pytest.raises(ValueError, match="no detect example"):
        align_records(a, b, "detect", "dice")


def test_seed_average_and_summary():
    seeds = [[_rec(0, "segment", 0.2), _rec(1, "segment", None)],
             [_rec(0, "segment", 0.4), _rec(1, "segment", 0.6)]]
    avg = seed_average(seeds, "segment", "dice")
    assert avg[("c0", "segment", "p")] == pytest.approx(0.3)
    assert avg[("c1", "segment", "p")] == pytest.approx(0.6)  # the finite seed only
    with pytest.raises(ValueError, match="other segment cases"):
        seed_average([seeds[0], seeds[1][:1]], "segment", "dice")
    assert seed_summary([0.2, 0.4]) == pytest.approx({"n": 2, "mean": 0.3,
                                                      "std": math.sqrt(0.02)})
    assert math.isnan(seed_summary([0.5])["std"])


def test_load_records_names_the_bad_line(tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_text(json.dumps(_rec(0, "segment", 0.5)) + "\n\n{oops\n")
    with pytest.raises(ValueError, match=r"records.jsonl:3: not a JSON record"):
        load_records(path)
    path.write_text(json.dumps(_rec(0, "segment", 0.5)) + "\n")
    assert load_records(path)[0]["scores"]["dice"] == 0.5
