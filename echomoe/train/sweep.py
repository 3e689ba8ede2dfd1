"""Sweep runner: expand a sweep YAML, run it resumably, and turn the runs into tables and plots.

::

    from echomoe.train.sweep import run_sweep, sweep_results, write_results
    run_sweep("configs/sweeps/demo.yaml")                  # runs what is not finished yet
    write_results(sweep_results("configs/sweeps/demo.yaml"), "runs/demo")

**Runs.**  The grid comes from :func:`echomoe.config.read_sweep`.  Run ``<name>`` lives in
``<out_dir>/<name>`` (``out_dir`` defaults to the sweep's ``output_dir``) and is *finished* when
its ``summary.json`` says ``"status": "finished"``::

    {"name", "variant", "seed", "group", "status": "finished", "metrics": {name: float}}

Finished runs are skipped, so an interrupted sweep continues where it stopped.  A run that raises
(or returns without writing a finished summary) gets a ``summary.json`` with ``"status":
"failed"`` and the error, and the sweep goes on; the next call retries it.

**Tables.**  Everything is computed from the ``summary.json`` files (never typed by hand):
``results.csv`` (one row per run), ``results.md`` (mean ± std over seeds per metric and variant,
one section per group) and one bar chart per metric (``plots/<metric>.png``, error bars = std).
The std is the sample standard deviation (``ddof=1``; 0 for a single seed).

**W&B sweeps.**  :func:`wandb_sweep_yaml` gives the equivalent W&B grid sweep for users with a
W&B server: ``wandb sweep <file>`` then ``wandb agent <id>``.  Named axes (label -> bundle of
overrides, e.g. ``family``) cannot be expressed as one W&B parameter, so each combination of
their labels becomes its own W&B sweep (:func:`wandb_sweep_yamls`).
"""

from __future__ import annotations

import csv
import fnmatch
import itertools
import json
import math
import os
import re
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

from echomoe.config.sweep import Sweep, format_value, read_sweep
from echomoe.train.comparison import comparison_markdown, run_label

RunFn = Callable[[str, list[str]], None]
"""``run_fn(run_name, overrides)``: train and evaluate one run, writing its ``summary.json``."""

SUMMARY = "summary.json"
_SEED_KEY = "train.seed"
_VARIANT_KEY = "model.variant"


# ----------------------------------------------------------------------------- runs


class ExperimentRunner:
    """The default ``run_fn``: load ``experiment`` with the run's overrides and call
    :func:`echomoe.train.experiment.run_experiment` (imported on first use).  A class rather
    than a closure so that it pickles into worker processes (``run_sweep(jobs=...)``).

    Args:
        experiment: the experiment YAML the sweep points at.
        progress: show the training / evaluation progress bars.
    """

    def __init__(self, experiment: str | os.PathLike, progress: bool = True):
        self.experiment = Path(experiment)
        self.progress = progress

    def __call__(self, run_name: str, overrides: list[str]) -> None:
        """Train and evaluate run ``run_name`` (its ``summary.json`` is written by it)."""
        from echomoe.config import load_config
        from echomoe.train.experiment import run_experiment

        run_experiment(load_config(self.experiment, overrides), progress=self.progress)


def _set_threads(threads: int) -> None:
    """Worker initialiser: ``threads`` intra-op threads per run."""
    import torch

    torch.set_num_threads(threads)


def _parse_overrides(overrides: Iterable[str]) -> dict[str, Any]:
    """``["k=v", ...]`` -> ``{k: yaml(v)}`` (values parsed like the config loader does)."""
    out: dict[str, Any] = {}
    for item in overrides:
        key, _, value = item.partition("=")
        try:
            out[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            out[key] = value
    return out


def _run_axes(sweep: Sweep) -> dict[str, dict[str, str]]:
    """``{run_name: {axis: label}}`` in grid order (mirrors :func:`read_sweep`'s product)."""
    combos = itertools.product(*[list(choices) for _, choices in sweep.axes])
    names = [axis for axis, _ in sweep.axes]
    return {run: dict(zip(names, combo, strict=True))
            for (run, _), combo in zip(sweep.runs, combos, strict=True)}


def _with_out_dir(overrides: list[str], run_dir: Path) -> list[str]:
    """``overrides`` with ``output_dir=`` pointing at ``run_dir``."""
    kept = [o for o in overrides if not o.startswith("output_dir=")]
    return [*kept, f"output_dir={format_value(str(run_dir))}"]


def read_summary(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The run's ``summary.json`` as a dict, or ``None`` when absent or unreadable."""
    path = Path(run_dir) / SUMMARY
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` to ``path`` atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def _is_finished(summary: dict[str, Any] | None) -> bool:
    return bool(summary) and summary.get("status") == "finished"


def _select(runs: list[tuple[str, list[str]]], only: Sequence[str] | None, sweep: Sweep):
    """The runs whose names match one of ``only`` (exact names or ``fnmatch`` patterns)."""
    if not only:
        return runs
    names = [name for name, _ in runs]
    for pattern in only:
        if not fnmatch.filter(names, pattern):
            raise ValueError(f"--only {pattern!r} matches no run of sweep {sweep.name!r}; "
                             f"runs: {', '.join(names)}")
    return [(n, o) for n, o in runs if any(fnmatch.fnmatchcase(n, p) for p in only)]


def run_sweep(sweep_path: str | os.PathLike, *, out_dir: str | os.PathLike | None = None,
              run_fn: RunFn | None = None, only: Sequence[str] | None = None,
              dry_run: bool = False, jobs: int = 1) -> list[dict[str, Any]]:
    """Run every run of a sweep that is not finished yet; return the runs' summaries.

    Args:
        sweep_path: the sweep YAML (see :func:`echomoe.config.read_sweep`).
        out_dir: parent of the run directories (default: the sweep's ``output_dir``); the runs'
            ``output_dir`` overrides are rewritten to ``<out_dir>/<run>``.
        run_fn: ``run_fn(run_name, overrides)`` trains one run and writes
            ``<output_dir>/summary.json``; default: load the experiment with the overrides and
            call :func:`echomoe.train.experiment.run_experiment` (:class:`ExperimentRunner`).
            With ``jobs > 1`` it must pickle (a module-level function or class instance).
        only: run names or ``fnmatch`` patterns to restrict the sweep to.
        dry_run: run nothing; return the plan (status ``finished`` or ``pending``).
        jobs: runs trained at the same time, each in its own process with
            ``cpu_count // jobs`` torch threads (tiny models use a core better one run per
            core than one run on all cores); their progress bars are off.

    Returns:
        One dict per selected run, in grid order: the ``summary.json`` contents plus ``run``
        (run name), ``run_dir``, ``axes`` (``{axis: label}``) and, in a dry run, ``overrides``.
        Failed runs have ``status`` ``"failed"`` and ``error``.
    """
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    sweep = read_sweep(sweep_path)
    root = Path(out_dir if out_dir is not None else sweep.output_dir)
    axes = _run_axes(sweep)
    runs = _select(sweep.runs, only, sweep)
    results: list[dict[str, Any] | None] = [None] * len(runs)
    pending = []
    for i, (run, overrides) in enumerate(runs):
        run_dir = root / run
        overrides = _with_out_dir(overrides, run_dir)
        summary = read_summary(run_dir)
        extra = {"run": run, "run_dir": str(run_dir), "axes": axes[run]}
        tag = f"[{i + 1}/{len(runs)}] {run}"
        if dry_run:
            status = "finished" if _is_finished(summary) else "pending"
            print(f"{tag}: {status}  {' '.join(overrides)}", flush=True)
            results[i] = {**(summary or {}), "status": status, "overrides": overrides, **extra}
        elif _is_finished(summary):
            print(f"{tag}: finished, skipped", flush=True)
            results[i] = {**summary, **extra}
        else:
            pending.append((i, tag, run, overrides, run_dir, extra))
    if pending and (jobs == 1 or len(pending) == 1):
        run_fn = run_fn or ExperimentRunner(sweep.experiment)
        for i, tag, run, overrides, run_dir, extra in pending:
            print(f"{tag}: running", flush=True)
            results[i] = {**_run_one(run_fn, run, overrides, run_dir, tag), **extra}
    elif pending:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        run_fn = run_fn or ExperimentRunner(sweep.experiment, progress=False)
        workers = min(jobs, len(pending))
        threads = max(1, (os.cpu_count() or 1) // workers)
        print(f"running {len(pending)} runs, {workers} at a time, {threads} thread(s) each",
              flush=True)
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_set_threads, initargs=(threads,)) as pool:
            futures = {pool.submit(_run_one, run_fn, run, overrides, run_dir, tag): (i, extra)
                       for i, tag, run, overrides, run_dir, extra in pending}
            for future in futures:
                i, extra = futures[future]
                results[i] = {**future.result(), **extra}
    return [r for r in results if r is not None]


def _run_one(run_fn: RunFn, run: str, overrides: list[str], run_dir: Path,
             tag: str) -> dict[str, Any]:
    """Run one run; return its summary (an ``interrupted`` one as the run wrote it; a ``failed``
    summary, also written, if it raised or wrote no finished summary)."""
    started = time.perf_counter()
    error, tb = None, ""
    try:
        run_fn(run, overrides)
    except Exception as err:  # noqa: BLE001 - one failed run must not stop the sweep
        error = f"{type(err).__name__}: {err}"
        tb = traceback.format_exc()
    summary = read_summary(run_dir)
    if error is None and summary and summary.get("status") == "interrupted":
        print(f"{tag}: interrupted (checkpoint saved; rerun the sweep to resume)",
              file=sys.stderr, flush=True)
        return summary
    if error is None and not _is_finished(summary):
        error, tb = f"run finished without a finished {SUMMARY} in {run_dir}", ""
    if error is not None:
        values = _parse_overrides(overrides)
        summary = {"name": run, "variant": values.get(_VARIANT_KEY),
                   "seed": values.get(_SEED_KEY), "group": values.get("logging.group"),
                   "status": "failed", "error": error, "traceback": tb, "metrics": {}}
        _write_json(run_dir / SUMMARY, summary)
        print(f"{tag}: FAILED: {error}", file=sys.stderr, flush=True)
    else:
        print(f"{tag}: finished in {time.perf_counter() - started:.0f} s", flush=True)
    return summary


def collect_results(source: str | os.PathLike | Iterable[str | os.PathLike]
                    ) -> list[dict[str, Any]]:
    """Read ``summary.json`` files.

    ``source`` is a list of run directories, or one root directory whose sub-directories are
    runs (the root itself counts if it holds a ``summary.json``).  Directories without a readable
    summary are skipped.  Each summary gets ``run_dir`` and ``run`` (the directory name) unless
    it has them.
    """
    if isinstance(source, (str, os.PathLike)):
        root = Path(source)
        dirs = ([root] if (root / SUMMARY).is_file() else []) + sorted(
            p.parent for p in root.glob(f"*/{SUMMARY}"))
    else:
        dirs = [Path(d) for d in source]
    out = []
    for d in dirs:
        summary = read_summary(d)
        if summary is not None:
            summary.setdefault("run_dir", str(d))
            summary.setdefault("run", d.name)
            out.append(summary)
    return out


def sweep_results(sweep_path: str | os.PathLike, out_dir: str | os.PathLike | None = None
                  ) -> list[dict[str, Any]]:
    """The summaries of a sweep's runs that have one, in grid order, with ``run``,
    ``run_dir`` and ``axes`` added."""
    sweep = read_sweep(sweep_path)
    root = Path(out_dir if out_dir is not None else sweep.output_dir)
    axes = _run_axes(sweep)
    out = []
    for run, _ in sweep.runs:
        summary = read_summary(root / run)
        if summary is not None:
            out.append({**summary, "run": run, "run_dir": str(root / run), "axes": axes[run]})
    return out


def sweep_group_by(sweep_path: str | os.PathLike) -> tuple[str, ...]:
    """Table grouping for a sweep: ``group``, then every axis other than the variant and seed
    axes (e.g. ``family``; a named axis called ``variant`` counts as the variant axis), then
    ``variant``."""
    sweep = read_sweep(sweep_path)
    others = [a for a, _ in sweep.axes if a not in (_SEED_KEY, _VARIANT_KEY, "variant")]
    return ("group", *others, "variant")


# ----------------------------------------------------------------------------- tables


def _key(summary: dict[str, Any], name: str) -> Any:
    """``summary[name]`` (``variant``: :func:`~echomoe.train.comparison.run_label`), falling back to
    ``summary["axes"][name]``."""
    if name == "variant" and "variant" in summary:
        return run_label(summary)
    if name in summary:
        return summary[name]
    return (summary.get("axes") or {}).get(name)


def _metric_names(summaries: Sequence[dict[str, Any]]) -> list[str]:
    names: dict[str, None] = {}
    for s in summaries:
        for k, v in (s.get("metrics") or {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                names.setdefault(k, None)
    return sorted(names)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def results_table(summaries: Sequence[dict[str, Any]], metrics: Sequence[str] | None = None,
                  group_by: Sequence[str] = ("group", "variant")) -> list[dict[str, Any]]:
    """Aggregate finished runs over seeds.

    Runs with equal values of ``group_by`` (looked up in the summary, then in its ``axes``) form
    one cell.  Returns one row per cell and metric, in first-appearance order::

        {<group_by keys>..., "metric": name, "mean": float, "std": float, "n": int}

    ``std`` is the sample standard deviation (0 when ``n == 1``); ``n`` counts the runs that
    report the metric.  ``metrics`` defaults to every numeric metric of any finished run.
    """
    done = [s for s in summaries if _is_finished(s)]
    metrics = list(metrics) if metrics is not None else _metric_names(done)
    cells: dict[tuple, list[dict[str, Any]]] = {}
    for s in done:
        cells.setdefault(tuple(_key(s, k) for k in group_by), []).append(s)
    rows = []
    for key, runs in cells.items():
        for metric in metrics:
            values = [float(r["metrics"][metric]) for r in runs
                      if isinstance((r.get("metrics") or {}).get(metric), (int, float))]
            if not values:
                continue
            mean, std = _mean_std(values)
            rows.append({**dict(zip(group_by, key, strict=True)), "metric": metric,
                         "mean": mean, "std": std, "n": len(values)})
    return rows


def format_mean_std(mean: float, std: float, digits: int = 4) -> str:
    """``"0.5000 ± 0.0100"``."""
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _sections(rows: list[dict[str, Any]], group_by: Sequence[str]):
    """``{section key (all group_by but the last): {column (last key): {metric: row}}}``."""
    out: dict[tuple, dict[Any, dict[str, dict[str, Any]]]] = {}
    for r in rows:
        section = tuple(r[k] for k in group_by[:-1])
        column = r[group_by[-1]] if group_by else None
        out.setdefault(section, {}).setdefault(column, {})[r["metric"]] = r
    return out


def results_markdown(summaries: Sequence[dict[str, Any]], metrics: Sequence[str] | None = None,
                     group_by: Sequence[str] = ("group", "variant"), digits: int = 4) -> str:
    """Markdown: one section per value of ``group_by[:-1]``; a table with one row per metric
    and one column per value of ``group_by[-1]`` (the variant), cells ``mean ± std``, and a
    final ``n`` row (runs per column, i.e. seeds)."""
    rows = results_table(summaries, metrics, group_by)
    finished = sum(_is_finished(s) for s in summaries)
    lines = [f"# Results ({finished} finished of {len(summaries)} runs; mean ± std over seeds)",
             ""]
    failed = [s.get("run") or s.get("name") for s in summaries if s.get("status") == "failed"]
    if failed:
        lines += [f"Failed runs: {', '.join(map(str, failed))}", ""]
    for section, columns in _sections(rows, group_by).items():
        title = " / ".join(f"{k}={v}" for k, v in zip(group_by[:-1], section, strict=True))
        lines += [f"## {title}" if title else "## all runs", ""]
        names = list(columns)
        metric_order = list(dict.fromkeys(m for c in columns.values() for m in c))
        lines.append("| metric | " + " | ".join(map(str, names)) + " |")
        lines.append("|---|" + "---|" * len(names))
        for metric in metric_order:
            cells = [format_mean_std(c[metric]["mean"], c[metric]["std"], digits)
                     if metric in c else "–" for c in columns.values()]
            lines.append(f"| {metric} | " + " | ".join(cells) + " |")
        n = [str(max(r["n"] for r in c.values())) for c in columns.values()]
        lines += ["| n | " + " | ".join(n) + " |", ""]
    return "\n".join(lines)


def _write_csv(summaries: Sequence[dict[str, Any]], path: Path) -> None:
    """One row per run: identity, axes, status, error and every metric."""
    axes = list(dict.fromkeys(a for s in summaries for a in (s.get("axes") or {})))
    metrics = _metric_names(summaries)
    header = ["run", "name", "group", "variant", "seed", *axes, "status", "error", *metrics]
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for s in summaries:
            m = s.get("metrics") or {}
            writer.writerow([s.get("run", s.get("name")), s.get("name"), s.get("group"),
                             s.get("variant"), s.get("seed"),
                             *[(s.get("axes") or {}).get(a) for a in axes], s.get("status"),
                             s.get("error", ""), *[m.get(k, "") for k in metrics]])


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "metric"


def plot_metric(rows: list[dict[str, Any]], metric: str, group_by: Sequence[str],
                path: str | os.PathLike) -> Path:
    """Bar chart of ``metric``: one bar per ``group_by[-1]`` value (variant), one colour per
    section (``group_by[:-1]``), error bars = std.  Imports matplotlib (Agg) lazily."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sections = _sections([r for r in rows if r["metric"] == metric], group_by)
    columns = list(dict.fromkeys(c for cols in sections.values() for c in cols))
    width = 0.8 / max(1, len(sections))
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(columns) * max(1, len(sections)) ** 0.5),
                                    3.2))
    for i, (section, cols) in enumerate(sections.items()):
        xs = [j + (i - (len(sections) - 1) / 2) * width for j, c in enumerate(columns)
              if c in cols]
        ys = [cols[c][metric]["mean"] for c in columns if c in cols]
        es = [cols[c][metric]["std"] for c in columns if c in cols]
        label = " / ".join(map(str, section)) or None
        ax.bar(xs, ys, width, yerr=es, capsize=3, label=label)
    ax.set_xticks(range(len(columns)))
    ax.set_xticklabels([str(c) for c in columns], rotation=30, ha="right")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} (mean ± std over seeds)")
    if len(sections) > 1:
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_results(summaries: Sequence[dict[str, Any]], out_dir: str | os.PathLike, *,
                  metrics: Sequence[str] | None = None,
                  group_by: Sequence[str] = ("group", "variant"),
                  plots: bool = True) -> dict[str, Any]:
    """Write ``results.csv``, ``results.md``, ``plots/<metric>.png`` and, when the runs carry
    priors (:func:`~echomoe.train.experiment.run_experiment` runs), ``comparison.md``
    (:func:`~echomoe.train.comparison.comparison_markdown`, against ``dense`` when present)
    into ``out_dir``.

    Returns ``{"csv": path, "markdown": path, "plots": [paths], "rows": results_table(...)}``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_csv(summaries, out / "results.csv")
    md = out / "results.md"
    md.write_text(results_markdown(summaries, metrics, group_by))
    rows = results_table(summaries, metrics, group_by)
    done = [s for s in summaries if _is_finished(s)]
    if done and all(s.get("priors") for s in done):
        reference = "dense" if any(run_label(s) == "dense" for s in done) else run_label(done[0])
        (out / "comparison.md").write_text(
            "# Comparison\n\n" + comparison_markdown(done, reference=reference))
    pngs = []
    if plots:
        for metric in dict.fromkeys(r["metric"] for r in rows):
            pngs.append(plot_metric(rows, metric, group_by, out / "plots" / f"{_slug(metric)}.png"))
    return {"csv": out / "results.csv", "markdown": md, "plots": pngs, "rows": rows}


# ----------------------------------------------------------------------------- W&B sweeps


def wandb_sweep_yamls(sweep_path: str | os.PathLike, *, program: str = "experiments/train.py",
                      project: str | None = None) -> dict[str, dict[str, Any]]:
    """The W&B grid sweep(s) equivalent to a sweep file: ``{suffix: sweep dict}``.

    Key axes (``model.variant: [...]``) become W&B ``parameters`` (``values``); the command runs
    ``python <program> <experiment> <fixed overrides> ${args_no_hyphens}``, so each W&B run gets
    ``key=value`` arguments.  Fixed overrides are the sweep's shared ``overrides`` and
    ``logging.group``, plus the bundle of each named axis: with named axes there is one sweep
    per combination of their labels (suffix ``"report"``, ...); without, one sweep (suffix
    ``""``).  Per-run ``name`` / ``output_dir`` are left to the training script (W&B names runs).
    """
    sweep = read_sweep(sweep_path)
    key_axes = [(a, c) for a, c in sweep.axes if list(c.values()) and all(
        list(b) == [a] for b in c.values())]
    named = [(a, c) for a, c in sweep.axes if (a, c) not in key_axes]
    shared = {k: v for k, v in _parse_overrides(sweep.runs[0][1]).items()
              if k not in ("name", "output_dir") and k not in
              {key for _, c in sweep.axes for b in c.values() for key in b}}
    experiment = os.path.relpath(sweep.experiment)
    out = {}
    for combo in itertools.product(*[list(c.items()) for _, c in named]):
        suffix = "-".join(label for label, _ in combo)
        fixed = dict(shared)
        for _, bundle in combo:
            fixed.update(bundle)
        name = f"{sweep.name}-{suffix}" if suffix else sweep.name
        cfg: dict[str, Any] = {
            "name": name,
            "method": "grid",
            "program": program,
            "command": ["${env}", "${interpreter}", "${program}", experiment,
                        *[f"{k}={format_value(v)}" for k, v in fixed.items()],
                        "${args_no_hyphens}"],
            "parameters": {a: {"values": [b[a] for b in c.values()]} for a, c in key_axes},
        }
        if project:
            cfg["project"] = project
        out[suffix] = cfg
    return out


def wandb_sweep_yaml(sweep_path: str | os.PathLike, **kwargs) -> dict[str, Any]:
    """The W&B grid sweep equivalent to a sweep file without named axes (see
    :func:`wandb_sweep_yamls`; with named axes, raises ``ValueError`` naming them)."""
    sweeps = wandb_sweep_yamls(sweep_path, **kwargs)
    if list(sweeps) != [""]:
        raise ValueError(f"{sweep_path}: named axes need one W&B sweep per label combination "
                         f"({', '.join(sweeps)}); use wandb_sweep_yamls / write_wandb_sweep")
    return sweeps[""]


def write_wandb_sweep(sweep_path: str | os.PathLike, path: str | os.PathLike, **kwargs
                      ) -> list[Path]:
    """Write the W&B sweep YAML(s) to ``path`` (``<stem>-<suffix><ext>`` per combination of
    named-axis labels); returns the written paths."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for suffix, cfg in wandb_sweep_yamls(sweep_path, **kwargs).items():
        target = path.with_name(f"{path.stem}-{suffix}{path.suffix}") if suffix else path
        target.write_text(yaml.safe_dump(cfg, sort_keys=False))
        written.append(target)
    return written
