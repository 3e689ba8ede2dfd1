"""The sweep comparison: prior / blind / variant / oracle rows, paired significance, regions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from echomoe.train.comparison import HEADLINE, comparison_markdown, results_rows

REGIONS = ("breast", "thyroid")


def _records(dice: np.ndarray, correct: np.ndarray) -> list[dict]:
    rows = []
    for i, (d, c) in enumerate(zip(dice, correct, strict=True)):
        region = REGIONS[i % 2]
        rows.append({"id": f"case{i}", "region": region, "task": "segment", "prompt": "seg",
                     "scores": {"dice": float(d)}})
        rows.append({"id": f"case{i}", "region": region, "task": "diagnosis", "prompt": "dx",
                     "scores": {"correct": float(c)}})
    return rows


def _write_eval(folder: Path, dice: np.ndarray, correct: np.ndarray) -> dict:
    folder.mkdir(parents=True)
    with (folder / "records.jsonl").open("w") as f:
        for row in _records(dice, correct):
            f.write(json.dumps(row) + "\n")
    per_region = {r: {"segment": {"dice": float(dice[i::2].mean())},
                      "diagnosis": {"accuracy": float(correct[i::2].mean())}}
                  for i, r in enumerate(REGIONS)}
    overall = {"segment/dice": float(dice.mean()), "diagnosis/accuracy": float(correct.mean())}
    (folder / "metrics.json").write_text(json.dumps(
        {"metrics": {"overall": overall, "per_region": per_region}}))
    return overall


def _run(root: Path, variant: str, seed: int, dice, correct, *, blind=False, oracle=None,
         priors=None):
    name = f"{variant}{'_blind' if blind else ''}-seed{seed}"
    run_dir = root / name
    metrics = _write_eval(run_dir / "eval", np.asarray(dice), np.asarray(correct))
    summary = {"run": name, "run_dir": str(run_dir), "variant": variant, "seed": seed,
               "blind": blind, "status": "finished", "metrics": metrics,
               "parameters": {"total": 2_500_000, "active": 1_250_000, "router": 512}}
    if oracle is not None:
        summary["oracle_metrics"] = _write_eval(run_dir / "eval_oracle", *map(np.asarray,
                                                                           oracle))
    summary["priors"] = {}
    for key, (p_dice, p_correct) in (priors or {}).items():
        summary["priors"][key] = _write_eval(run_dir / key, np.asarray(p_dice),
                                             np.asarray(p_correct))
    return summary


@pytest.fixture
def runs(tmp_path):
    rng = np.random.default_rng(0)
    n = 60
    base = rng.uniform(0.2, 0.6, n)
    prior = {"prior_global": (np.full(n, 0.1), np.zeros(n)),
             "prior_region": (np.full(n, 0.2), np.tile([1.0, 0.0], n // 2))}
    out = []
    for seed in (0, 1):
        noise = rng.normal(0, 0.01, n)
        out.append(_run(tmp_path, "dense", seed, base + noise, np.tile([1.0, 0.0], n // 2),
                        priors=prior))
        out.append(_run(tmp_path, "moe_region_soft", seed, base + 0.2 + noise,
                        np.tile([1.0, 0.0], n // 2), priors=prior,
                        oracle=(base + 0.25, np.ones(n))))
        out.append(_run(tmp_path, "dense", seed, np.full(n, 0.2), np.zeros(n), blind=True,
                        priors=prior))
    return out


def test_results_rows_have_priors_blind_variants_and_oracle(runs):
    rows = {r[0]: r for r in results_rows(runs)}
    assert list(rows) == ["*prior (global)*", "*prior (per region)*", "dense",
                          "moe_region_soft", "moe_region_soft (oracle regions)", "dense (blind)"]
    dice = 2 + [m for _, m, *_ in HEADLINE].index("dice")
    assert rows["*prior (global)*"][dice] == "0.10"
    assert rows["dense (blind)"][dice] == "0.20 ± 0.00"
    assert rows["moe_region_soft"][1] == "0, 1"
    assert rows["dense"][-3:] == ["2.50 M", "1.25 M", "512"]
    # tasks the runs did not evaluate are n/a, not zero
    bleu = 2 + [m for _, m, *_ in HEADLINE].index("bleu1")
    assert rows["dense"][bleu] == "n/a"


def test_the_report_ceiling_row_comes_after_the_priors(runs):
    for run in runs:
        run["priors"]["report_ceiling"] = {"report/bleu1": 0.66,
                                           "report/finding_f1_micro": 1.0}
    rows = results_rows(runs)
    assert rows[2][0] == "*ceiling (true findings, new phrasing)*"
    bleu = 2 + [m for _, m, *_ in HEADLINE].index("bleu1")
    dice = 2 + [m for _, m, *_ in HEADLINE].index("dice")
    assert (rows[2][bleu], rows[2][dice]) == ("0.66", "n/a")


def test_significance_marks_the_real_difference_only(runs):
    text = comparison_markdown(runs, reference="dense", num_resamples=500)
    sig = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines()
           if " − " in line}
    dice = 1 + [m for _, m, *_ in HEADLINE].index("dice")
    accuracy = 1 + [m for _, m, *_ in HEADLINE].index("accuracy")
    better = sig["moe_region_soft − dense"].split(" | ")[dice]
    assert better.startswith("+0.200*") and "(2/2 seeds)" in better
    same = sig["moe_region_soft − dense"].split(" | ")[accuracy]
    assert same.startswith("+0.000 ") and "*" not in same
    assert sig["dense − prior (per region)"].split(" | ")[accuracy].startswith("+0.000 ")
    assert "dense − dense" not in sig
    assert "## Per region: Dice" in text and "| breast |" in text
    with pytest.raises(ValueError, match="reference variant 'nope'"):
        comparison_markdown(runs, reference="nope")


def test_echomoe_compare_tabulates_runs_of_several_folders(runs, tmp_path, capsys):
    from echomoe.cli import main

    for run in runs:
        Path(run["run_dir"], "summary.json").write_text(json.dumps(run))
    dense = sorted(str(Path(r["run_dir"])) for r in runs if r["variant"] == "dense"
                   and not r["blind"])
    out = tmp_path / "comparison.md"
    status = main(["compare", *dense, str(tmp_path), "--reference", "moe_region_soft",
                   "--variants", "dense", "moe_region_soft", "--resamples", "200",
                   "--out", str(out)])
    assert status == 0
    text = out.read_text()
    assert text.startswith("# Comparison") and "dense − moe_region_soft" in text
    assert "| dense (blind) |" not in text and "| dense | 0, 1 |" in text
    assert "(4 runs)" in capsys.readouterr().out  # the dense dirs are in the root too: once
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["compare", str(empty)]) == 1
    assert "no finished run" in capsys.readouterr().err
    assert main(["compare", str(tmp_path), "--variants", "moe_topk"]) == 1
    assert "no runs of moe_topk; found: dense, dense (blind), moe_region_soft" in \
        capsys.readouterr().err
    assert main(["compare", str(tmp_path), "--reference", "nope"]) == 1
    assert "reference 'nope' has no runs" in capsys.readouterr().err
