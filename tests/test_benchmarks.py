"""Every benchmark script runs end to end at a tiny size and writes the JSON its README table is
generated from.  Timings are not checked (they depend on the machine); schema and arithmetic are.
"""

import importlib
import json
import math
import statistics
import sys
from pathlib import Path

import pytest
import torch

from echomoe.models.builders import EQUAL_ACTIVE_VARIANTS

BENCH_DIR = Path(__file__).parents[1] / "experiments" / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH_DIR))
    try:
        yield lambda name: importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH_DIR))


TIMING_KEYS = {"median_ms", "min_ms", "max_ms", "rounds", "samples_ms"}


def _check_timing(result: dict) -> None:
    assert TIMING_KEYS <= set(result)
    assert 0 < result["min_ms"] <= result["median_ms"] <= result["max_ms"]
    assert result["rounds"] == len(result["samples_ms"]) >= 1
    assert result["median_ms"] == statistics.median(result["samples_ms"])


def _paired(result: dict, reference: dict) -> float:
    return statistics.median(
        a / b for a, b in zip(result["samples_ms"], reference["samples_ms"], strict=True))


def test_paired_ratio_is_the_median_of_per_round_ratios():
    from echomoe.utils.benchmark import paired_ratio, time_interleaved

    # Round 2 ran under load for both. Per-round ratios: 2, 2, 7/3 -> 2; medians: 7 / 3.
    times = {"moe": {"samples_ms": [2.0, 40.0, 7.0]}, "dense": {"samples_ms": [1.0, 20.0, 3.0]}}
    assert paired_ratio(times, "moe", "dense") == 2.0
    assert paired_ratio(times, "dense", "moe") == 0.5
    calls = []
    result = time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                              repeats=3, warmup=1)
    assert calls == ["a", "b"] + ["a", "b"] * 3  # warm-up, then interleaved rounds
    assert all(len(r["samples_ms"]) == r["rounds"] == 3 for r in result.values())


def _check_common(payload: dict, name: str, path: Path) -> None:
    assert payload["benchmark"] == name
    assert json.loads(path.read_text()) == json.loads(json.dumps(payload))
    env = payload["environment"]
    assert env["torch"] == torch.__version__ and env["threads"] >= 1


def _check_readme_update(bench, payload: dict, tmp_path: Path) -> str:
    name = payload["benchmark"]
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n<!-- {name}:start -->\nold\n<!-- {name}:end -->\noutro\n")
    json_path = tmp_path / f"{name}.json"
    json_path.write_text(json.dumps(payload))
    bench("update_readme").main([str(json_path), "--readme", str(readme)])
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "old" not in text
    assert any(f"| {first} |" in text for first in ("model", "T", "part", "conversion", "variant",
                                                     "encoder"))
    return text


def test_moe_layer_benchmark(bench, tmp_path):
    out = tmp_path / "moe_layer.json"
    payload = bench("moe_layer").main([
        "--out", str(out), "--configs", "[[24, 16, 8, 4, 2]]", "--repeats", "1",
        "--min-seconds", "0", "--no-memory"])
    _check_common(payload, "moe_layer", out)
    (row,) = payload["configs"]
    assert (row["T"], row["D"], row["F"], row["E"], row["k"]) == (24, 16, 8, 4, 2)
    results = row["results"]
    assert set(results) == {"dense", "echomoe_grouped_mm", "echomoe_loop", "hf_eager",
                            "hf_grouped_mm"}
    for r in results.values():
        _check_timing(r)
        assert math.isclose(r["R"], _paired(r, results["dense"]))
    ours = results["echomoe_grouped_mm"]
    assert math.isclose(row["speedup_vs_best_hf"],
                        min(_paired(results[hf], ours) for hf in ("hf_eager", "hf_grouped_mm")))
    _check_readme_update(bench, payload, tmp_path)


def test_moe_layer_configs_option(bench, capsys):
    parse = bench("moe_layer").parse_configs
    assert parse("512,256,512,8,2; 24,16,8,4,2") == [(512, 256, 512, 8, 2), (24, 16, 8, 4, 2)]
    assert parse("[[24, 16, 8, 4, 2]]") == [(24, 16, 8, 4, 2)]
    for bad, reason in [("512,256,512,8", "5 positive integers"), ("[[1, 2, 3, 4, 0]]", "5 pos"),
                        ("a,b", "cannot parse"), ("[[1, 2", "cannot parse"), ("", "5 pos")]:
        with pytest.raises(SystemExit):
            bench("moe_layer").main(["--configs", bad])
        assert reason in capsys.readouterr().err, bad


def test_moe_layer_benchmark_with_a_thread_count_writes_its_own_block(bench, tmp_path):
    out = tmp_path / "moe_layer.json"
    payload = bench("moe_layer").main([
        "--out", str(out), "--configs", "20,16,8,4,2", "--repeats", "1",
        "--min-seconds", "0", "--no-memory", "--threads", "1"])
    assert payload["environment"]["threads"] == 1
    assert payload["readme_block"] == "moe_layer_threads1"
    assert "peak_mb" not in payload["configs"][0]["results"]["dense"]
    readme = tmp_path / "README.md"
    readme.write_text("<!-- moe_layer:start -->\nkeep\n<!-- moe_layer:end -->\n"
                      "<!-- moe_layer_threads1:start -->\nold\n<!-- moe_layer_threads1:end -->\n")
    bench("update_readme").main([str(out), "--readme", str(readme)])
    text = readme.read_text()
    assert "keep" in text and "old" not in text and "| 20 | 16 | 8 | 4 | 2 |" in text
    assert "1 thread;" in text


def test_train_step_benchmark(bench, tmp_path):
    out = tmp_path / "train_step.json"
    payload = bench("train_step").main([
        "--out", str(out), "--presets", "tiny", "--variants", "moe_topk", "moe_region_soft",
        "--batch-size", "2", "--seq-len", "20", "--repeats", "1", "--min-seconds", "0",
        "--hf-hidden", "32", "--hf-layers", "1"])
    _check_common(payload, "train_step", out)
    assert (payload["batch_size"], payload["seq_len"]) == (2, 20)
    assert payload["environment"]["threads"] == 1
    echomoe, hf = payload["groups"]
    assert echomoe["model"] == "echomoe tiny" and echomoe["dense"] == "dense"
    assert list(echomoe["results"]) == ["dense", "moe_topk", "moe_region_soft"]
    assert list(hf["results"]) == ["qwen2", "qwen2_moe"] and hf["target"] is None
    for group in payload["groups"]:
        dense = group["results"][group["dense"]]
        for variant, r in group["results"].items():
            _check_timing(r)
            assert math.isclose(r["ratio_vs_dense"], _paired(r, dense))
            if group["target"] is None or variant == group["dense"]:
                assert r["meets_target"] is None
            else:
                assert r["meets_target"] == (r["ratio_vs_dense"] <= payload["target"])
    text = _check_readme_update(bench, payload, tmp_path)
    assert "echomoe tiny | moe_region_soft" in text


def test_decode_benchmark(bench, tmp_path):
    out = tmp_path / "decode.json"
    payload = bench("decode").main([
        "--out", str(out), "--preset", "tiny", "--variants", "moe_region_hard",
        "--batch-size", "2", "--prompt-len", "6", "--new-tokens", "3", "--kv-new-tokens", "2",
        "--repeats", "1", "--kv-repeats", "1", "--min-seconds", "0", "--hf-hidden", "32",
        "--hf-layers", "1"])
    _check_common(payload, "decode", out)
    assert (payload["batch_size"], payload["prompt_len"], payload["new_tokens"]) == (2, 6, 3)
    echomoe, hf = payload["groups"]
    assert list(echomoe["results"]) == ["dense", "moe_region_hard"]
    assert list(hf["results"]) == ["qwen2", "qwen2_moe"]
    for group in payload["groups"]:
        dense = group["results"][group["dense"]]
        for r in group["results"].values():
            _check_timing(r)
            assert math.isclose(r["tokens_per_s"], 2 * 3 / (r["median_ms"] / 1e3))
            assert math.isclose(r["ratio_vs_dense"], _paired(dense, r))  # dense time / ours
            # one KV round: the paired ratio is the ratio of the two times
            assert math.isclose(r["kv_cache_speedup"],
                                r["kv_median_ms_no_cache"] / r["kv_median_ms"])
    assert all(r["meets_target"] is None for r in hf["results"].values())
    assert all(isinstance(r["meets_target"], bool) for r in echomoe["results"].values())
    _check_readme_update(bench, payload, tmp_path)


def test_encoders_benchmark(bench, tmp_path):
    out = tmp_path / "encoders.json"
    payload = bench("encoders").main([
        "--out", str(out), "--seeds", "0", "1", "--steps", "3", "--n-train", "28",
        "--n-test", "14", "--image-size", "32", "--batch-size", "4",
        "--encoders", "vit, patch stem", "convnet 16-32-48"])
    _check_common(payload, "encoders", out)
    results = payload["results"]
    assert list(results) == ["vit, patch stem", "convnet 16-32-48"]
    assert payload["first"] == "vit, patch stem"
    assert results["vit, patch stem"]["step_time_vs_first"] == 1.0
    for r in results.values():
        accs = [row["accuracy"] for row in r["per_seed"]]
        assert [row["seed"] for row in r["per_seed"]] == [0, 1]
        assert all(a * 14 == pytest.approx(round(a * 14)) for a in accs)  # 14 test cases
        assert r["accuracy_mean"] == pytest.approx(statistics.fmean(accs))
        assert r["above_prior_seeds"] == sum(a > payload["prior_region_accuracy"] for a in accs)
    # 28 train cases cycle the 7 regions: 4 per region, the prior is a multiple of 1 / 14
    assert 0 < payload["prior_region_accuracy"] <= 1
    prior = payload["prior_region_accuracy"] * 14
    assert prior == pytest.approx(round(prior))
    text = _check_readme_update(bench, payload, tmp_path)
    assert "per-region majority prior" in text and "seeds above prior" in text


def test_data_benchmark(bench, tmp_path):
    out = tmp_path / "data.json"
    payload = bench("data").main(["--out", str(out), "--n", "4", "--repeats", "1",
                                  "--image-size", "64"])
    _check_common(payload, "synthetic_data", out)
    generate = payload["parts"]["generate (all labels)"]
    _check_timing(generate)
    assert math.isclose(payload["samples_per_s_per_core"], 4 / (generate["median_ms"] / 1e3))
    assert payload["meets_target"] == (payload["samples_per_s_per_core"] >= payload["target"])
    assert len(payload["per_region_samples_per_s"]) == 7
    _check_readme_update(bench, payload, tmp_path)


def test_upcycle_fidelity_benchmark(bench, tmp_path):
    out = tmp_path / "upcycle.json"
    payload = bench("upcycle_fidelity").main(["--preset", "tiny", "--batch", "2", "--seq-len",
                                              "8", "--out", str(out)])
    _check_common(payload, "upcycle_fidelity", out)
    rows = {(r["case"], r["router_init"]): r for r in payload["results"]}
    # every equal-active variant + copies + MoEfication, 2 router inits
    assert len(rows) == 2 * (len(EQUAL_ACTIVE_VARIANTS) + 2) == 2 * 9
    for init in ("moefy", "random"):
        assert rows[("moe_topk (copies)", init)]["ffn_rel_err_max"] < 1e-6
    # exact by construction: each region's group holds every slice once, uniform weights
    assert rows[("moe_region_hard (F/k slices)", "moefy")]["ffn_rel_err_max"] < 1e-5
    # the same for each modality's group of k experts (and its region groups)
    for variant in ("moe_modality", "moe_modality_region"):
        assert rows[(f"{variant} (F/k slices)", "moefy")]["ffn_rel_err_max"] < 1e-5
    assert rows[("moe_topk (MoEfication)", "moefy")]["ffn_rel_err_mean"] > 0.5
    assert rows[("moe_region_hard (F/k slices)", "random")]["ffn_rel_err_mean"] > 1e-3
    _check_readme_update(bench, payload, tmp_path)


def test_update_readme_rejects_unknown_benchmarks_and_missing_markers(bench, tmp_path):
    update_readme = bench("update_readme")
    with pytest.raises(ValueError, match="unknown benchmark"):
        update_readme.render({"benchmark": "nope", "environment": {}})
    readme = tmp_path / "README.md"
    readme.write_text("no markers here\n")
    with pytest.raises(ValueError, match="decode:start"):
        update_readme.update(readme, {"benchmark": "decode"})


def test_readme_has_a_block_for_every_benchmark(bench):
    text = (Path(__file__).parents[1] / "README.md").read_text()
    for name in bench("update_readme").RENDERERS:
        assert f"<!-- {name}:start -->" in text and f"<!-- {name}:end -->" in text, name


def test_update_readme_demo_table_from_run_summaries(bench, tmp_path):
    update_readme = bench("update_readme")
    for run, dice, status in (("dense-seed0", 0.5, "finished"), ("moe_topk-seed0", 0.25,
                                                                   "finished"),
                              ("broken-seed0", 0.9, "failed")):
        (tmp_path / run).mkdir()
        summary = {"status": status, "wall_time_s": 123.4,
                   "metrics": {"segment/dice": dice, "report/bleu1": 0.4}}
        (tmp_path / run / "summary.json").write_text(json.dumps(summary))
    readme = tmp_path / "README.md"
    readme.write_text("x\n<!-- demo:start -->\nold\n<!-- demo:end -->\ny\n")
    update_readme.main(["--demo", str(tmp_path), "--readme", str(readme)])
    text = readme.read_text()
    assert "old" not in text and "broken" not in text
    assert "| dense-seed0 | 0.50 | n/a | n/a | 0.40 |" in text
    assert "| moe_topk-seed0 | 0.25 |" in text and "| 123 |" in text
    assert "| *goal* | ≥ 0.85 |" in text
    with pytest.raises(ValueError, match="no finished runs"):
        update_readme.finished_runs(tmp_path / "dense-seed0" / "missing")


def test_update_readme_demo_table_over_seeds(bench, tmp_path):
    """Several seeds per variant: one row per variant, mean ± sample std over its seeds."""
    for variant, seed, dice, wall in (("dense", 0, 0.4, 100), ("dense", 1, 0.6, 120),
                                      ("dense", 2, 0.5, 110), ("moe_topk", 0, 0.3, 90),
                                      ("moe_topk", 1, 0.3, 95), ("moe_topk", 2, 0.9, 1)):
        run = tmp_path / f"{variant}-seed{seed}"
        run.mkdir()
        status = "failed" if dice == 0.9 else "finished"  # a failed seed is left out
        (run / "summary.json").write_text(json.dumps({
            "status": status, "variant": variant, "seed": seed, "wall_time_s": wall,
            "metrics": {"segment/dice": dice}}))
    update_readme = bench("update_readme")
    readme = tmp_path / "README.md"
    readme.write_text("<!-- demo:start -->\nold\n<!-- demo:end -->\n"
                      "<!-- demo_seeds:start -->\nold\n<!-- demo_seeds:end -->\n")
    update_readme.main(["--demo", str(tmp_path), "--readme", str(readme)])
    demo, seeds = readme.read_text().split("<!-- demo_seeds:start -->")
    assert "| dense-seed0 | 0.40 |" in demo and "seed1" not in demo  # `make demo`: seed 0
    assert "| dense | 0, 1, 2 | 0.50 ± 0.10 | n/a |" in seeds and "| 110 |" in seeds
    assert "| moe_topk | 0, 1 | 0.30 ± 0.00 |" in seeds and "| 92 |" in seeds
    assert "mean ± sample std" in seeds and "old" not in seeds


def test_generation_benchmark(bench, tmp_path):
    out = tmp_path / "generation.json"
    payload = bench("generation").main(["--variants", "dense", "--n", "40", "--steps", "4",
                                        "--segmenter-steps", "4", "--sample-steps", "2",
                                        "--width", "8", "--out", str(out)])
    _check_common(payload, "generation", out)
    (result,) = payload["results"]
    assert set(result["report"]) == {"generated", "real", "shuffled"}
    real, shuffled = result["report"]["real"], result["report"]["shuffled"]
    assert real["feature_distance"] == pytest.approx(shuffled["feature_distance"])  # same images
    assert result["parameters"]["head"] > 0 and result["steps"] == 4
    _check_readme_update(bench, payload, tmp_path)


def test_lesion_contrast_benchmark(bench, tmp_path):
    out = tmp_path / "lesion_contrast.json"
    payload = bench("lesion_contrast").main(["--out", str(out), "--n", "21", "--image-size",
                                             "48"])
    assert json.loads(out.read_text())["groups"] == payload["groups"]
    groups = payload["groups"]
    regions = [g for g in groups if " / " not in g]
    assert regions and set(regions) <= {"breast", "gynaecology", "heart", "kidney", "liver",
                                        "thyroid", "vessel"}
    for region in regions:  # a region's count is the sum of its diagnoses'
        parts = [r["n"] for g, r in groups.items() if g.startswith(region + " / ")]
        assert groups[region]["n"] == sum(parts) >= 1
    for r in groups.values():
        assert 0 <= r["cnr_q25"] <= r["cnr_median"] and r["area_median_px"] >= 1
