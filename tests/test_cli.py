"""The ``echomoe`` command line: complete help, ``synth`` end to end, ``config`` and ``train``."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from echomoe.cli import build_parser, main

REPO = Path(__file__).parents[1]
COMMANDS = ("info", "synth", "data", "config", "train", "compare")


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_top_level_help_lists_every_command_with_examples(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert set(_subparsers(build_parser())) == set(COMMANDS)
    for command in COMMANDS:
        assert f"\n    {command} " in text, command          # listed with its one-line help
        assert f"  echomoe {command}" in text, command       # and used in an example
    assert "examples:" in text and "--version" in text


def test_every_subcommand_documents_every_argument_and_default():
    for name, sub in _subparsers(build_parser()).items():
        text = sub.format_help()
        assert sub.description, name
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, (name, action.dest)
            shown = action.option_strings or [action.metavar]
            for flag in shown:
                assert flag in text, (name, flag)
            silent = action.default in (None, False, argparse.SUPPRESS) or action.required
            if not silent:
                assert "default" in action.help, (name, action.dest)


def test_version(capsys):
    from echomoe import __version__

    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"echomoe {__version__}"


def test_module_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "echomoe.cli", "synth", "--help"],
                         capture_output=True, text=True, check=True, cwd=REPO)
    assert "--image-size" in out.stdout and "(default: 128)" in out.stdout


def test_console_script_is_declared():
    assert '"echomoe=echomoe.cli:main"' in (REPO / "setup.py").read_text()


def test_synth_writes_a_tiny_stratified_benchmark(tmp_path, capsys):
    from datasets import load_from_disk

    from echomoe.data.synthetic.generate import SyntheticConfig, generate

    out = tmp_path / "synth"
    code = main(["synth", "--out", str(out), "--n", "11", "--seed", "3", "--image-size", "40",
                 "--regions", "thyroid", "kidney"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["out"] == str(out) and Path(report["preview"]).is_file()
    assert sum(report["splits"].values()) == 11
    assert set(report["splits"]) == {"train", "validation", "test"}
    assert min(report["splits"].values()) >= 1
    data = load_from_disk(str(out))
    assert {name: len(split) for name, split in data.items()} == report["splits"]
    regions = {r for split in data.values() for r in split["region"]}
    assert regions == {"thyroid", "kidney"}
    # The saved cases are exactly the library's cases for that seed.
    expected = {s.id: s for s in generate(11, 3, SyntheticConfig(image_size=40,
                                                                 regions=("thyroid", "kidney")))}
    row = data["train"][0]
    image = np.asarray(row["images"][0])
    assert image.shape == (40, 40)
    np.testing.assert_array_equal(image, expected[row["id"]].images[0])


@pytest.mark.parametrize("argv, message", [
    (["--regions", "elbow"], "unknown region 'elbow'"),
    (["--n", "0"], "expected an integer >= 1"),
    (["--num-proc", "two"], "expected an integer"),
])
def test_synth_rejects_bad_arguments(tmp_path, capsys, argv, message):
    base = {"--out": str(tmp_path), "--n": "4"}
    for flag, value in zip(argv[::2], argv[1::2], strict=True):
        base[flag] = value
    with pytest.raises(SystemExit) as exit_:
        main(["synth", *[x for pair in base.items() for x in pair]])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_config_prints_the_resolved_experiment(capsys):
    code = main(["config", str(REPO / "configs/experiments/report.yaml"), "train.lr=0.00042",
                 "model.variant=moe_region_soft"])
    assert code == 0
    text = capsys.readouterr().out
    assert "lr: 0.00042" in text and "variant: moe_region_soft" in text


def test_config_reports_unknown_keys(capsys):
    code = main(["config", str(REPO / "configs/experiments/report.yaml"), "train.lrr=1"])
    assert code == 1
    err = capsys.readouterr().err
    assert "lrr" in err and "lr" in err.replace("lrr", "")


def test_config_lists_a_sweeps_runs(capsys):
    from echomoe.config import load_sweep

    path = REPO / "configs/sweeps/demo.yaml"
    assert main(["config", str(path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == [name for name, _ in load_sweep(path)]


def test_train_loads_the_config_with_overrides_and_runs_it(monkeypatch, tmp_path, capsys):
    import echomoe.train.experiment as experiment

    seen = {}

    def fake_run(cfg, *, progress=True):
        seen.update(cfg=cfg, progress=progress)
        return {"metrics": {"report/bleu4": 0.25}, "output_dir": str(tmp_path),
                "model_dir": str(tmp_path / "model"), "status": "finished", "where": "local"}

    monkeypatch.setattr(experiment, "run_experiment", fake_run)
    code = main(["train", str(REPO / "configs/experiments/multitask.yaml"), "train.steps=7",
                 "train.warmup=2", "model.variant=dense", f"output_dir={tmp_path}",
                 "--no-progress"])
    assert code == 0
    cfg = seen["cfg"]
    assert cfg.train.steps == 7 and cfg.model.variant == "dense"
    assert cfg.output_dir == str(tmp_path) and seen["progress"] is False
    out = capsys.readouterr().out
    assert json.loads(out[: out.index("}") + 1]) == {"report/bleu4": 0.25}
    assert f"{tmp_path}/summary.json" in out


def test_train_exit_status(monkeypatch, tmp_path, capsys):
    import echomoe.train.experiment as experiment

    summary = {"metrics": {}, "output_dir": str(tmp_path), "model_dir": "m",
               "status": "interrupted"}
    monkeypatch.setattr(experiment, "run_experiment", lambda cfg, progress=True: summary)
    config = str(REPO / "configs/experiments/report.yaml")
    assert main(["train", config]) == 3                      # interrupted run: resumable
    assert "run the same command to resume" in capsys.readouterr().err
    summary["status"] = "failed"
    assert main(["train", config]) == 1                      # failed run
    assert main(["train", config, "model.variant=mixture"]) == 1   # invalid config
    assert "mixture" in capsys.readouterr().err
