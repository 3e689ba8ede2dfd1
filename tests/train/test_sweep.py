"""Sweep runner: grid expansion, resumability, failure recording, tables, plots, W&B YAML."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from echomoe.train.sweep import (
    collect_results,
    results_table,
    run_sweep,
    sweep_group_by,
    wandb_sweep_yaml,
    wandb_sweep_yamls,
    write_results,
    write_wandb_sweep,
)

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "configs" / "sweeps" / "demo.yaml"
DENSE_VS_MOE = ROOT / "configs" / "sweeps" / "dense_vs_moe.yaml"


@pytest.fixture
def demo(tmp_path) -> Path:
    """The demo sweep at one seed: 4 runs (what `make demo` selects with --only '*-seed0')."""
    data = yaml.safe_load(DEMO.read_text())
    data["experiment"] = str((DEMO.parent / data["experiment"]).resolve())
    data["grid"]["train.seed"] = [0]
    path = tmp_path / "sweep" / "demo.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture
def plain_demo(tmp_path) -> Path:
    """The demo's three variants as a plain ``model.variant`` list axis (one W&B grid)."""
    data = yaml.safe_load(DEMO.read_text())
    data["experiment"] = str((DEMO.parent / data["experiment"]).resolve())
    data["grid"] = {"model.variant": ["dense", "moe_topk", "moe_region_soft"],
                    "train.seed": [0]}
    path = tmp_path / "plain" / "demo.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _value(overrides, key):
    return yaml.safe_load(next(o.split("=", 1)[1] for o in overrides if o.startswith(key + "=")))


class FakeRun:
    """A ``run_fn`` that records calls and writes a finished summary (or raises for ``fail``)."""

    def __init__(self, fail=(), interrupt=()):
        self.calls = []
        self.fail = set(fail)
        self.interrupt = set(interrupt)

    def __call__(self, run_name, overrides):
        self.calls.append(run_name)
        if run_name in self.fail:
            raise RuntimeError(f"boom in {run_name}")
        out = Path(_value(overrides, "output_dir"))
        out.mkdir(parents=True, exist_ok=True)
        seed = _value(overrides, "train.seed")
        summary = {"name": run_name, "variant": _value(overrides, "model.variant"), "seed": seed,
                   "group": _value(overrides, "logging.group"),
                   "status": "interrupted" if run_name in self.interrupt else "finished",
                   "metrics": {"eval/dice": 0.5 + 0.1 * seed}}
        (out / "summary.json").write_text(json.dumps(summary))


def test_expansion_counts_dry_run(tmp_path):
    demo = run_sweep(DEMO, out_dir=tmp_path, dry_run=True, only=["*-seed0"])  # `make demo`
    assert [r["run"] for r in demo] == ["dense-seed0", "moe_topk-seed0", "moe_region_soft-seed0",
                                        "dense_blind-seed0"]
    assert len(run_sweep(DEMO, out_dir=tmp_path, dry_run=True)) == 12  # `make demo-seeds`
    assert sweep_group_by(DEMO) == ("group", "variant")
    assert all(r["status"] == "pending" for r in demo)
    assert _value(demo[0]["overrides"], "output_dir") == str(tmp_path / "dense-seed0")
    big = run_sweep(DENSE_VS_MOE, out_dir=tmp_path, dry_run=True)
    assert len(big) == 4 * 8 * 3 == 96
    assert big[0]["axes"] == {"family": "report", "model.variant": "dense", "train.seed": "seed0"}
    assert not any(tmp_path.iterdir())  # a dry run writes nothing
    assert sweep_group_by(DENSE_VS_MOE) == ("group", "family", "variant")


def test_resumable_skips_finished_runs(tmp_path, demo):
    fake = FakeRun()
    first = run_sweep(demo, out_dir=tmp_path, run_fn=fake)
    assert fake.calls == ["dense-seed0", "moe_topk-seed0", "moe_region_soft-seed0",
                          "dense_blind-seed0"]
    assert [r["status"] for r in first] == ["finished"] * 4
    again = run_sweep(demo, out_dir=tmp_path, run_fn=fake)
    assert len(fake.calls) == 4  # nothing re-run
    assert [r["metrics"] for r in again] == [r["metrics"] for r in first]
    # an unfinished run is picked up again; --only restricts the sweep
    (tmp_path / "moe_topk-seed0" / "summary.json").unlink()
    run_sweep(demo, out_dir=tmp_path, run_fn=fake, only=["moe_*"])
    assert fake.calls[4:] == ["moe_topk-seed0"]
    assert all(r["status"] == "finished" for r in run_sweep(demo, out_dir=tmp_path, dry_run=True))
    with pytest.raises(ValueError, match="matches no run"):
        run_sweep(demo, out_dir=tmp_path, run_fn=fake, only=["nope"])


def test_failed_run_is_recorded_and_sweep_continues(tmp_path, demo):
    fake = FakeRun(fail={"moe_topk-seed0"})
    runs = run_sweep(demo, out_dir=tmp_path, run_fn=fake)
    assert fake.calls == ["dense-seed0", "moe_topk-seed0", "moe_region_soft-seed0",
                          "dense_blind-seed0"]
    assert [r["status"] for r in runs] == ["finished", "failed", "finished", "finished"]
    saved = json.loads((tmp_path / "moe_topk-seed0" / "summary.json").read_text())
    assert saved["status"] == "failed" and "RuntimeError: boom" in saved["error"]
    assert saved["variant"] == "moe_topk" and saved["seed"] == 0 and saved["group"] == "demo"
    # a run_fn that returns without a summary is a failure too
    runs = run_sweep(demo, out_dir=tmp_path / "x", run_fn=lambda name, ov: None,
                     only=["dense-*"])
    assert runs[0]["status"] == "failed" and "summary.json" in runs[0]["error"]
    # the failed run is retried next time
    fixed = FakeRun()
    run_sweep(demo, out_dir=tmp_path, run_fn=fixed)
    assert fixed.calls == ["moe_topk-seed0"]


def test_interrupted_run_keeps_its_summary_and_resumes(tmp_path, demo):
    fake = FakeRun(interrupt={"moe_topk-seed0"})
    runs = run_sweep(demo, out_dir=tmp_path, run_fn=fake)
    assert [r["status"] for r in runs] == ["finished", "interrupted", "finished", "finished"]
    saved = json.loads((tmp_path / "moe_topk-seed0" / "summary.json").read_text())
    assert saved["status"] == "interrupted"  # not overwritten as a failure
    resumed = FakeRun()
    run_sweep(demo, out_dir=tmp_path, run_fn=resumed)
    assert resumed.calls == ["moe_topk-seed0"]


def test_parallel_jobs_run_in_worker_processes_and_record_failures(tmp_path, demo):
    fake = FakeRun(fail={"moe_topk-seed0"})
    runs = run_sweep(demo, out_dir=tmp_path, run_fn=fake, jobs=2)
    assert fake.calls == []  # the calls happened in the workers, on copies of fake
    assert [r["run"] for r in runs] == ["dense-seed0", "moe_topk-seed0", "moe_region_soft-seed0",
                                        "dense_blind-seed0"]
    assert [r["status"] for r in runs] == ["finished", "failed", "finished", "finished"]
    assert "RuntimeError: boom in moe_topk-seed0" in runs[1]["error"]
    assert runs[0]["metrics"] == {"eval/dice": 0.5}
    assert json.loads((tmp_path / "dense-seed0" / "summary.json").read_text())["seed"] == 0
    # resumable as before: only the failed run is left, and one pending run runs in-process
    again = FakeRun()
    assert [r["status"] for r in run_sweep(demo, out_dir=tmp_path, run_fn=again, jobs=2)] == \
        ["finished"] * 4
    assert again.calls == ["moe_topk-seed0"]
    with pytest.raises(ValueError, match="jobs must be >= 1"):
        run_sweep(demo, out_dir=tmp_path, run_fn=again, jobs=0)


def _summary(variant, seed, dice, bleu, group="g"):
    return {"name": f"{variant}-seed{seed}", "variant": variant, "seed": seed, "group": group,
            "status": "finished", "metrics": {"dice": dice, "bleu1": bleu}}


def test_tables_mean_std_csv_and_plots(tmp_path):
    summaries = [_summary("dense", 0, 0.5, 0.2), _summary("dense", 1, 0.7, 0.4),
                 _summary("dense", 2, 0.9, 0.6), _summary("moe", 0, 0.8, 0.1),
                 _summary("moe", 1, 0.8, 0.3),
                 {"name": "moe-seed2", "variant": "moe", "seed": 2, "group": "g",
                  "status": "failed", "error": "boom", "metrics": {}}]
    rows = {(r["variant"], r["metric"]): r for r in results_table(summaries)}
    assert rows["dense", "dice"]["mean"] == pytest.approx(0.7)
    assert rows["dense", "dice"]["std"] == pytest.approx(0.2)  # sample std of .5 .7 .9
    assert rows["dense", "dice"]["n"] == 3 and rows["moe", "dice"]["n"] == 2
    assert rows["moe", "bleu1"]["std"] == pytest.approx(2 ** 0.5 / 10)
    assert len(results_table(summaries, metrics=["dice"])) == 2

    out = write_results(summaries, tmp_path)
    md = (tmp_path / "results.md").read_text()
    assert "| metric | dense | moe |" in md
    assert "| dice | 0.7000 ± 0.2000 | 0.8000 ± 0.0000 |" in md
    assert "| bleu1 | 0.4000 ± 0.2000 | 0.2000 ± 0.1414 |" in md
    assert "| n | 3 | 2 |" in md and "Failed runs: moe-seed2" in md
    with (tmp_path / "results.csv").open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == 6
    assert table[1]["variant"] == "dense" and float(table[1]["dice"]) == 0.7
    assert table[5]["status"] == "failed" and table[5]["error"] == "boom"
    assert table[5]["dice"] == ""
    pngs = sorted(p.name for p in out["plots"])
    assert pngs == ["bleu1.png", "dice.png"]
    assert all((tmp_path / "plots" / p).read_bytes()[:4] == b"\x89PNG" for p in pngs)


def test_tables_group_by_axis_and_collect(tmp_path):
    fake = FakeRun()
    run_sweep(DENSE_VS_MOE, out_dir=tmp_path, run_fn=fake, only=["report-dense-*", "vqa-dense-*"])
    assert len(fake.calls) == 6
    found = collect_results(tmp_path)
    assert len(found) == 6 and {s["run"] for s in found} == set(fake.calls)
    assert len(collect_results([tmp_path / "report-dense-seed0"])) == 1
    from echomoe.train.sweep import sweep_results

    summaries = sweep_results(DENSE_VS_MOE, tmp_path)
    write_results(summaries, tmp_path, group_by=sweep_group_by(DENSE_VS_MOE))
    md = (tmp_path / "results.md").read_text()
    assert "## group=dense_vs_moe / family=report" in md
    assert "## group=dense_vs_moe / family=vqa" in md
    assert "| eval/dice | 0.6000 ± 0.1000 |" in md  # seeds 0, 1, 2 -> .5 .6 .7
    assert (tmp_path / "plots" / "eval_dice.png").is_file()


def test_wandb_sweep_yaml(tmp_path, demo, plain_demo):
    assert list(wandb_sweep_yamls(demo)) == ["dense", "moe_topk", "moe_region_soft",
                                             "dense_blind"]  # a named axis: one per label
    cfg = wandb_sweep_yaml(plain_demo)
    assert cfg["method"] == "grid" and cfg["program"] == "experiments/train.py"
    assert cfg["parameters"] == {"model.variant": {"values": ["dense", "moe_topk",
                                                              "moe_region_soft"]},
                                 "train.seed": {"values": [0]}}
    assert cfg["command"][-1] == "${args_no_hyphens}" and "logging.group=demo" in cfg["command"]
    assert cfg["command"][3].endswith("experiments/demo.yaml")
    big = wandb_sweep_yamls(DENSE_VS_MOE)
    assert list(big) == ["report", "vqa", "grounding", "multitask"]
    assert big["vqa"]["parameters"]["train.seed"] == {"values": [0, 1, 2]}
    assert "eval.max_new_tokens=16" in big["vqa"]["command"]
    with pytest.raises(ValueError, match="named axes"):
        wandb_sweep_yaml(DENSE_VS_MOE)
    paths = write_wandb_sweep(plain_demo, tmp_path / "wandb.yaml")
    assert yaml.safe_load(paths[0].read_text()) == cfg
    assert len(write_wandb_sweep(DENSE_VS_MOE, tmp_path / "w.yaml")) == 4


def _cli():
    spec = importlib.util.spec_from_file_location("sweep_cli", ROOT / "experiments" / "sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_cli(tmp_path, demo, plain_demo, capsys):
    main = _cli()
    assert main([str(demo), "--out", str(tmp_path), "--dry-run"]) == 0
    assert "4 runs, 0 finished, 4 to run" in capsys.readouterr().out
    fake = FakeRun(fail={"moe_region_soft-seed0"})
    assert main([str(demo), "--out", str(tmp_path)], run_fn=fake) == 1
    assert (tmp_path / "results.md").is_file() and (tmp_path / "results.csv").is_file()
    assert main([str(demo), "--out", str(tmp_path), "--tables-only"]) == 0
    assert "| eval/dice | 0.5000 ± 0.0000 | 0.5000 ± 0.0000 |" in capsys.readouterr().out
    assert main([str(plain_demo), "--emit-wandb", str(tmp_path / "w.yaml")]) == 0
    assert yaml.safe_load((tmp_path / "w.yaml").read_text())["method"] == "grid"
    assert main([str(demo), "--only", "nope"]) == 1
    interrupted = tmp_path / "i"
    assert main([str(demo), "--out", str(interrupted)],
                run_fn=FakeRun(interrupt={"dense-seed0"})) == 3
    assert "1 runs interrupted" in capsys.readouterr().err
