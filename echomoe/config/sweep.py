"""Sweep files: a grid of overrides over one experiment (see :func:`read_sweep`)."""

from __future__ import annotations

import itertools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from echomoe.config.loader import _check_dotted_key, load_config, yaml_error
from echomoe.config.schema import ConfigError, ExperimentConfig

_PLAIN = re.compile(r"[A-Za-z_][\w.\-/]*")
_RESERVED = {"null", "true", "false", "yes", "no", "on", "off", "none", "nan", "inf"}


def format_value(value: Any) -> str:
    """``value`` as a dotlist value that OmegaConf parses back to ``value``."""
    if isinstance(value, str) and _PLAIN.fullmatch(value) and value.lower() not in _RESERVED:
        return value
    return json.dumps(value)


@dataclass
class Sweep:
    """An expanded sweep file (see :func:`read_sweep`).

    Attributes:
        name: sweep name (W&B group).
        path: the sweep YAML.
        experiment: the experiment YAML every run starts from.
        output_dir: parent directory of the runs' ``output_dir``.
        axes: ``[(axis, {label: {key: value}})]`` in grid order.
        runs: ``[(run_name, ["key=value", ...])]``, the grid in order (last axis fastest).
    """

    name: str
    path: Path
    experiment: Path
    output_dir: str
    axes: list[tuple[str, dict[str, dict[str, Any]]]]
    runs: list[tuple[str, list[str]]]

    def overrides(self, run_name: str) -> list[str]:
        """The overrides of run ``run_name``."""
        for name, overrides in self.runs:
            if name == run_name:
                return overrides
        raise KeyError(f"no run {run_name!r} in sweep {self.name!r}")

    def load(self, run_name: str, extra=()) -> ExperimentConfig:
        """``load_config(experiment, overrides of run_name + extra)``."""
        return load_config(self.experiment, [*self.overrides(run_name), *extra])


def _label(key: str, value: Any) -> str:
    if isinstance(value, str):
        return value
    return f"{key.rsplit('.', 1)[-1]}{value}"


def read_sweep(path: str | os.PathLike) -> Sweep:
    """Read and expand a sweep YAML.

    Format::

        name: dense_vs_moe                       # default: the file stem
        experiment: ../experiments/base.yaml     # relative to the sweep file
        output_dir: runs/sweeps/dense_vs_moe     # default: runs/sweeps/<name>
        overrides: {train.steps: 300}            # dotted key -> value, for every run
        grid:                                    # cartesian product; later axes vary fastest
          family:                                # named axis: label -> {dotted key: value}
            report: {tasks.vqa: 0, ...}
          model.variant: [dense, moe_topk]       # key axis: list of values
          train.seed: [0, 1, 2]

    A run is named by its labels joined with ``-`` (a key axis labels a string value by itself,
    another value as ``<last key part><value>``, e.g. ``seed0``): ``report-dense-seed0``.  Its
    overrides are the shared ``overrides``, then each axis's, then ``name=<run>``,
    ``output_dir=<output_dir>/<run>`` and ``logging.group=<sweep name>``.  Every key must exist
    in the experiment schema, no key may be set by two axes, and run names must be unique.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file {str(path)!r} not found")
    import yaml

    try:
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except (OmegaConfBaseException, ValueError, yaml.YAMLError) as err:
        raise yaml_error(path, err) from err
    valid = ("name", "description", "experiment", "output_dir", "overrides", "grid")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with keys {', '.join(valid)}")
    for key in data:
        if key not in valid:
            raise ConfigError(f"{path}: unknown key {key!r} in sweep; valid keys: "
                              f"{', '.join(valid)}")
    name = str(data.get("name") or path.stem)
    if "experiment" not in data:
        raise ConfigError(f"{path}: experiment (the experiment YAML to start from) is required")
    experiment = Path(os.path.normpath(path.parent / str(data["experiment"])))
    if not experiment.is_file():
        raise ConfigError(f"{path}: experiment {str(experiment)!r} not found")
    output_dir = str(data.get("output_dir") or os.path.join("runs", "sweeps", name))
    shared = data.get("overrides") or {}
    if not isinstance(shared, dict):
        raise ConfigError(f"{path}: overrides must map dotted keys to values")
    for key, value in shared.items():
        _check_dotted_key(str(key), f"{path}: overrides", value)
    grid = data.get("grid") or {}
    if not isinstance(grid, dict):
        raise ConfigError(f"{path}: grid must map axis names to value lists or labelled "
                          "override mappings")
    axes: list[tuple[str, dict[str, dict[str, Any]]]] = []
    owner: dict[str, str] = {}
    for axis, spec in grid.items():
        where = f"{path}: grid.{axis}"
        if isinstance(spec, list):
            _check_dotted_key(str(axis), where)
            choices = {_label(axis, v): {axis: v} for v in spec}
            if len(choices) != len(spec):
                raise ConfigError(f"{where}: repeated values {spec}")
        elif isinstance(spec, dict):
            choices = {}
            for label, bundle in spec.items():
                if not isinstance(bundle, dict):
                    raise ConfigError(f"{where}.{label}: must map dotted keys to values")
                for key, value in bundle.items():
                    _check_dotted_key(str(key), f"{where}.{label}", value)
                choices[str(label)] = bundle
        else:
            raise ConfigError(f"{where}: must be a list of values or a mapping label -> "
                              "overrides")
        if not choices:
            raise ConfigError(f"{where}: has no values")
        for key in {k for bundle in choices.values() for k in bundle}:
            if key in owner:
                raise ConfigError(f"{where}: key {key!r} is also set by grid.{owner[key]}")
            owner[key] = axis
        axes.append((str(axis), choices))
    runs: list[tuple[str, list[str]]] = []
    for combo in itertools.product(*[list(choices.items()) for _, choices in axes]):
        run_name = "-".join(label for label, _ in combo) or name
        items = dict(shared)
        for _, bundle in combo:
            items.update(bundle)
        overrides = [f"{k}={format_value(v)}" for k, v in items.items()]
        overrides += [f"name={run_name}", f"output_dir={format_value(output_dir + '/' + run_name)}",
                      f"logging.group={name}"]
        runs.append((run_name, overrides))
    names = [r for r, _ in runs]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: run names are not unique: {names}")
    return Sweep(name, path, experiment, output_dir, axes, runs)


def load_sweep(path: str | os.PathLike) -> list[tuple[str, list[str]]]:
    """``[(run_name, ["key=value", ...])]`` of a sweep file, in grid order (see
    :func:`read_sweep`; the experiment file is ``read_sweep(path).experiment``)."""
    return read_sweep(path).runs
