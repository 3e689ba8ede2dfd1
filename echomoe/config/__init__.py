"""Experiment configs: YAML (OmegaConf) -> validated :class:`ExperimentConfig` dataclasses.

::

    from echomoe.config import load_config, load_sweep, read_sweep
    cfg = load_config("configs/experiments/report.yaml", ["train.lr=1e-3", "model.variant=dense"])
    cfg.model.build_config()          # the EchoMoEConfig (already built once to validate)
    for run_name, overrides in load_sweep("configs/sweeps/demo.yaml"): ...
    sweep = read_sweep("configs/sweeps/demo.yaml"); sweep.load(sweep.runs[0][0])

**Files.**  An experiment YAML holds any of the sections below.  ``base:`` names one file (or a
list, merged in order) relative to the YAML itself; the file's own keys merge on top, then the
command-line ``key=value`` overrides (OmegaConf dotlist syntax; values are parsed as YAML).  Dicts
merge key by key, lists are replaced.  ``${...}`` interpolations resolve after merging.  Paths:
``base`` and ``deepspeed`` are relative to the YAML that names them (to the working directory
when given on the command line); ``data.path``, ``model.tokenizer``, ``output_dir`` and
``logging.dir`` are relative to the working directory.

**Validation.**  An unknown key anywhere (also inside ``model.overrides``, ``data.synthetic``,
stages and overrides) raises :class:`ConfigError` naming the file and listing the section's valid
keys; wrong types and bad values (unknown preset / variant / task, ``lr <= 0``, negative task
rate, missing dataset path, ...) raise naming the field and file.  The ``model`` block is checked
by calling :func:`echomoe.models.builders.build_config` (no model is built), so every error
surfaces before training starts.

**Sweeps** list overrides only: see :func:`read_sweep`.

Modules: :mod:`~echomoe.config.schema` (the dataclasses), :mod:`~echomoe.config.loader`
(loading, validation, DeepSpeed), :mod:`~echomoe.config.sweep` (sweep files); everything public
is re-exported here.  ``python -m echomoe.config FILE [key=value ...]`` validates and prints.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from echomoe.config.loader import (
    config_to_dict,
    deepspeed_config,
    load_config,
    save_config,
    validate,
)
from echomoe.config.schema import (
    CHOICES,
    DEEPSPEED_REQUIRED_KEYS,
    ConfigError,
    DataSection,
    EvalSection,
    ExperimentConfig,
    LoggingSection,
    LoraSection,
    ModelSection,
    Stage,
    TaskRates,
    TrainSection,
)
from echomoe.config.sweep import Sweep, format_value, load_sweep, read_sweep

__all__ = [
    "ConfigError", "ExperimentConfig", "ModelSection", "DataSection", "TaskRates",
    "Stage", "LoraSection", "TrainSection", "EvalSection", "LoggingSection", "Sweep",
    "CHOICES", "DEEPSPEED_REQUIRED_KEYS", "load_config", "validate", "config_to_dict",
    "save_config", "deepspeed_config", "format_value", "load_sweep", "read_sweep", "main",
]


def main(argv=None) -> int:
    """``python -m echomoe.config <experiment.yaml|sweep.yaml> [key=value ...]``: validate and
    print the resolved config (or the sweep's runs)."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print(main.__doc__)
        return 2
    try:
        if "sweeps" in Path(argv[0]).parts:
            for run_name, overrides in load_sweep(argv[0]):
                print(run_name, " ".join(overrides))
        else:
            print(OmegaConf.to_yaml(OmegaConf.create(config_to_dict(
                load_config(argv[0], argv[1:])))))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0
