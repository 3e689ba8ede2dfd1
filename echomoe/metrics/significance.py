"""Is variant A better than variant B?  Paired bootstrap over test cases, and seed averages.

Both variants are scored on the *same* test examples (the harness builds identical prompts for
the same evaluation seed), so the comparison is paired: resample the cases with replacement,
recompute the mean difference, read the percentile confidence interval.  Per-case scores come
from the harness's ``records.jsonl`` (``scores``: ``dice``, ``box_iou``, ``correct``,
``bleu1`` (sentence-level, the per-case stand-in for corpus BLEU-1), ...).  Several seeds: each
case's score is averaged over the seeds first (:func:`seed_average`), then bootstrapped.

* ``diff`` = mean(a) − mean(b) over the pairs where both are finite;
* ``[ci_low, ci_high]``: the ``(1 − confidence) / 2`` and ``(1 + confidence) / 2`` quantiles of
  the resampled differences; ``significant``: the interval excludes 0;
* ``p_value`` = ``min(1, 2 · min(P*(d ≤ 0), P*(d ≥ 0)))`` over the resamples ``d``, at least
  ``1 / num_resamples`` (a two-sided bootstrap p-value).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["paired_bootstrap", "align_records", "compare_runs", "seed_average",
           "seed_summary", "load_records"]


def _key(record: dict[str, Any]) -> tuple[str, str, str]:
    return str(record.get("id")), str(record.get("task")), str(record.get("prompt"))


def _value(record: dict[str, Any], metric: str) -> float:
    value = (record.get("scores") or {}).get(metric)
    try:
        return math.nan if value is None else float(value)
    except (TypeError, ValueError):
        return math.nan


def paired_bootstrap(a: Sequence[float], b: Sequence[float], *, num_resamples: int = 2000,
                     confidence: float = 0.95, seed: int = 0,
                     higher_is_better: bool = True) -> dict[str, Any]:
    """Paired bootstrap of ``mean(a) − mean(b)`` (see the module docstring for definitions).

    Returns ``{"n", "mean_a", "mean_b", "diff", "ci_low", "ci_high", "p_value",
    "significant", "better"}``; ``better`` is ``"a"`` / ``"b"`` for a significant difference
    (using ``higher_is_better``), else ``None``.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"a and b must be 1-D of equal length, got {a.shape} and {b.shape}")
    if not 0 < confidence < 1 or num_resamples < 1:
        raise ValueError("confidence must be in (0, 1) and num_resamples >= 1")
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    n = int(a.size)
    if n == 0:
        return {"n": 0, "mean_a": math.nan, "mean_b": math.nan, "diff": math.nan,
                "ci_low": math.nan, "ci_high": math.nan, "p_value": math.nan,
                "significant": False, "better": None}
    d = a - b
    rng = np.random.default_rng(seed)
    resampled = d[rng.integers(0, n, size=(num_resamples, n))].mean(axis=1)
    alpha = (1.0 - confidence) / 2
    low, high = np.quantile(resampled, [alpha, 1.0 - alpha])
    p = 2 * min(np.mean(resampled <= 0), np.mean(resampled >= 0))
    p = float(min(1.0, max(p, 1.0 / num_resamples)))
    diff = float(d.mean())
    significant = bool(low > 0 or high < 0)
    better = None
    if significant:
        better = "a" if (diff > 0) == higher_is_better else "b"
    return {"n": n, "mean_a": float(a.mean()), "mean_b": float(b.mean()), "diff": diff,
            "ci_low": float(low), "ci_high": float(high), "p_value": p,
            "significant": significant, "better": better}


def _index(records: Sequence[dict[str, Any]], task: str, metric: str, name: str):
    out: dict[tuple[str, str, str], float] = {}
    for record in records:
        if record.get("task") != task:
            continue
        key = _key(record)
        if key in out:
            raise ValueError(f"{name}: duplicate example {key} for {task}/{metric}")
        out[key] = _value(record, metric)
    return out


def align_records(records_a: Sequence[dict[str, Any]], records_b: Sequence[dict[str, Any]],
                  task: str, metric: str) -> tuple[np.ndarray, np.ndarray, list[tuple]]:
    """The per-case ``scores[metric]`` of ``task`` of two runs, paired by ``(id, task,
    prompt)``: ``(a, b, keys)`` in sorted key order (missing / ``None`` scores are NaN)."""
    a = _index(records_a, task, metric, "records_a")
    b = _index(records_b, task, metric, "records_b")
    keys = sorted(a.keys() & b.keys())
    if not keys:
        raise ValueError(f"no {task} example is scored by both runs (metric {metric!r})")
    return (np.array([a[k] for k in keys]), np.array([b[k] for k in keys]), keys)


def compare_runs(records_a: Sequence[dict[str, Any]], records_b: Sequence[dict[str, Any]],
                 metrics: Sequence[tuple[str, str, bool]], **bootstrap_kwargs
                 ) -> dict[str, dict[str, Any]]:
    """:func:`paired_bootstrap` for each ``(task, metric, higher_is_better)``, keyed
    ``"task/metric"``."""
    out = {}
    for task, metric, higher in metrics:
        a, b, _ = align_records(records_a, records_b, task, metric)
        out[f"{task}/{metric}"] = paired_bootstrap(a, b, higher_is_better=higher,
                                                   **bootstrap_kwargs)
    return out


def seed_average(records_by_seed: Sequence[Sequence[dict[str, Any]]], task: str,
                 metric: str) -> dict[tuple[str, str, str], float]:
    """Each case's ``scores[metric]`` averaged over the seeds that scored it finitely (NaN when
    none did).  Every seed must have evaluated the same cases."""
    if not records_by_seed:
        raise ValueError("no runs to average")
    tables = [_index(r, task, metric, f"seed run {i}") for i, r in enumerate(records_by_seed)]
    cases = set(tables[0])
    for i, table in enumerate(tables[1:], 1):
        if set(table) != cases:
            missing = sorted(cases ^ set(table))[:3]
            raise ValueError(f"seed run {i} scores other {task} cases than seed run 0, e.g. "
                             f"{missing}")
    out = {}
    for case in cases:
        values = [t[case] for t in tables if math.isfinite(t[case])]
        out[case] = float(np.mean(values)) if values else math.nan
    return out


def seed_summary(values: Sequence[float]) -> dict[str, float]:
    """``{"n", "mean", "std"}`` of per-seed values (sample std; NaN for fewer than 2)."""
    arr = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if arr.size == 0:
        return {"n": 0, "mean": math.nan, "std": math.nan}
    std = float(arr.std(ddof=1)) if arr.size > 1 else math.nan
    return {"n": int(arr.size), "mean": float(arr.mean()), "std": std}


def load_records(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a harness ``records.jsonl``; bad JSON is an error naming file and line."""
    path = Path(path)
    rows = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not a JSON record ({err.msg})") from err
    return rows
