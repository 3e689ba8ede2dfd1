"""Bad YAML is a ConfigError naming the file and the line, and a ``!!python`` tag is refused
(never constructed), for experiment files, their ``base`` files and sweep files."""

from __future__ import annotations

import pytest

from echomoe.config import ConfigError, load_config
from echomoe.config.sweep import load_sweep


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntrain: {steps: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:3: invalid YAML: did not find expected"):
        load_config(bad)
    child = tmp_path / "child.yaml"
    child.write_text("base: bad.yaml\nname: y\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:3: invalid YAML"):
        load_config(child)


def test_python_tags_are_refused_not_run(tmp_path):
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.yaml"
    evil.write_text(f'name: !!python/object/apply:os.system ["touch {marker}"]\n')
    with pytest.raises(ConfigError, match=r"evil\.yaml:1: the tag .*python/object/apply"
                                          r":os\.system is not allowed"):
        load_config(evil)
    assert not marker.exists()
    sweep = tmp_path / "sweeps" / "s.yaml"
    sweep.parent.mkdir()
    sweep.write_text("name: s\ngrid: {train.seed: !!python/name:os.getcwd }\n")
    with pytest.raises(ConfigError, match=r"s\.yaml:2: the tag .*python/name"):
        load_sweep(sweep)


def test_cuda_without_cuda_fails_before_anything_runs(tmp_path):
    from pathlib import Path

    import torch

    from echomoe.train.experiment import run_experiment

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    base = Path(__file__).parents[2] / "configs" / "experiments" / "base.yaml"
    cfg = load_config(base, ["train.device=cuda", f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match="train.device is 'cuda' but torch.cuda"):
        run_experiment(cfg)
    assert not (tmp_path / "run").exists()  # nothing written
