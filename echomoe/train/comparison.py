"""The comparison of a sweep's variants: priors, blind and variant rows, significance, regions.

::

    from echomoe.train.comparison import comparison_markdown
    from echomoe.train.sweep import collect_results

    runs = [r for r in collect_results("results/demo") if r["status"] == "finished"]
    print(comparison_markdown(runs, reference="dense"))

Every run directory holds what :func:`~echomoe.train.experiment.run_experiment` writes: the
test metrics with predicted regions (``eval/``), with the true regions for region-routed
models (``eval_oracle/``), and the train-split priors scored on the same test examples
(``prior_global/``, ``prior_region/``).  From these the markdown has:

1. **Results**: one row per prior (global, per region), the report ceiling of synthetic data
   (:func:`~echomoe.metrics.priors.report_ceiling`, when the runs have it), one row per blind
   run and per variant (mean ± sample std over seeds), oracle rows labelled apart, and
   parameter counts (total / active / router).
2. **Significance**: each variant against the reference variant and against the per-region
   prior, a paired bootstrap over test cases on the per-case scores averaged over seeds
   (:mod:`echomoe.metrics.significance`), and how many seeds agree on the sign.
3. **Per region**: each headline metric per anatomical region (mean over seeds).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from echomoe.metrics.significance import (
    load_records,
    paired_bootstrap,
    seed_average,
    seed_summary,
)


def run_label(summary: dict[str, Any]) -> str:
    """The name a run is tabulated under: its variant, ``"<variant> (blind)"`` for a run whose
    images were withheld (``data.blind``), so blind runs never pool with their variant."""
    variant = str(summary.get("variant"))
    return f"{variant} (blind)" if summary.get("blind") else variant


HEADLINE: tuple[tuple[str, str, str, str, bool], ...] = (
    # (task, summary metric, per-case score, column, higher is better)
    ("segment", "dice", "dice", "Dice", True),
    ("detect", "box_iou", "box_iou", "box IoU", True),
    ("measure", "measurement_abs_mm", "measurement_abs_mm", "measurement error (mm)", False),
    ("report", "bleu1", "bleu1", "BLEU-1", True),
    ("report", "finding_f1_micro", "finding_f1_micro", "finding F1", True),
    ("vqa", "closed_accuracy", "correct", "VQA closed", True),
    ("diagnosis", "accuracy", "correct", "diagnosis", True),
)
"""The headline metrics of every comparison table."""

PRIORS = (("prior_global", "prior (global)"), ("prior_region", "prior (per region)"),
          ("report_ceiling", "ceiling (true findings, new phrasing)"))


def _runs_by_label(runs: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault(run_label(run), []).append(run)
    for members in groups.values():
        members.sort(key=lambda r: r.get("seed") or 0)
    return groups


def _run_dir(run: dict[str, Any]) -> Path:
    return Path(run.get("run_dir") or run["output_dir"])


def _cell(values: Sequence[float | None]) -> str:
    stats = seed_summary([math.nan if v is None else float(v) for v in values])
    mean, std = stats["mean"], stats["std"]
    if not math.isfinite(mean):
        return "n/a"
    return f"{mean:.2f}" if not math.isfinite(std) else f"{mean:.2f} ± {std:.2f}"


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def _records(run: dict[str, Any], folder: str) -> list[dict[str, Any]]:
    return load_records(_run_dir(run) / folder / "records.jsonl")


def results_rows(runs: Sequence[dict[str, Any]]) -> list[list[str]]:
    """The results table's rows (see the module docstring), without the header."""
    groups = _runs_by_label(runs)
    first = runs[0]
    rows = []
    for key, name in PRIORS:
        prior = (first.get("priors") or {}).get(key)
        if prior is None and key == "report_ceiling":
            continue
        prior = prior or {}
        rows.append([f"*{name}*", "", *(_cell([prior.get(f"{t}/{m}")])
                                         for t, m, *_ in HEADLINE), "", "", ""])
    for label, members in groups.items():
        params = members[0].get("parameters") or {}
        seeds = ", ".join(str(r.get("seed")) for r in members)
        counts = [f"{params[k] / 1e6:.2f} M" if k in params else "n/a"
                  for k in ("total", "active")]
        counts.append(f"{params['router']:,}" if "router" in params else "n/a")
        for source, suffix in (("metrics", ""), ("oracle_metrics", " (oracle regions)")):
            if source == "oracle_metrics" and not any(r.get(source) for r in members):
                continue
            cells = [_cell([(r.get(source) or {}).get(f"{t}/{m}") for r in members])
                     for t, m, *_ in HEADLINE]
            rows.append([f"{label}{suffix}", seeds, *cells, *counts])
    return rows


def _seed_scores(members: Sequence[dict[str, Any]], folder: str, task: str, score: str):
    return seed_average([_records(r, folder) for r in members], task, score)


def significance_rows(runs: Sequence[dict[str, Any]], reference: str, *,
                      num_resamples: int = 2000, seed: int = 0) -> list[list[str]]:
    """Each variant vs ``reference`` and vs the per-region prior, per headline metric:
    ``diff [95 % CI]`` of the seed-averaged per-case scores, ``*`` when significant, and the
    seeds whose own difference has the same sign (vs the reference, paired by seed)."""
    groups = _runs_by_label(runs)
    if reference not in groups:
        raise ValueError(f"reference variant {reference!r} not among the runs: "
                         f"{', '.join(groups)}")
    rows = []
    for label, members in groups.items():
        opponents = [("prior (per region)", [runs[0]], "prior_region")]
        if label != reference:
            opponents.insert(0, (reference, groups[reference], "eval"))
        for name, others, folder in opponents:
            cells = []
            for task, metric, score, _, higher in HEADLINE:
                try:
                    mine = _seed_scores(members, "eval", task, score)
                    theirs = _seed_scores(others, folder, task, score)
                except (FileNotFoundError, ValueError):
                    cells.append("n/a")
                    continue
                keys = sorted(mine.keys() & theirs.keys())
                test = paired_bootstrap([mine[k] for k in keys], [theirs[k] for k in keys],
                                        num_resamples=num_resamples, seed=seed,
                                        higher_is_better=higher)
                if not test["n"]:
                    cells.append("n/a")
                    continue
                mark = "*" if test["significant"] else ""
                agree = ""
                if folder == "eval":
                    agree = " " + _seed_agreement(members, others, task, metric, test["diff"])
                cells.append(f"{test['diff']:+.3f}{mark} [{test['ci_low']:+.3f}, "
                             f"{test['ci_high']:+.3f}]{agree}")
            rows.append([f"{label} − {name}", *cells])
    return rows


def _seed_agreement(members, others, task: str, metric: str, diff: float) -> str:
    """``"(k/n seeds)"``: seeds present in both groups whose summary metric differs with the
    sign of ``diff``."""
    theirs = {r.get("seed"): r for r in others}
    pairs = [(r["metrics"].get(f"{task}/{metric}"), theirs[r.get("seed")]["metrics"].get(
        f"{task}/{metric}")) for r in members if r.get("seed") in theirs]
    pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
    if not pairs:
        return ""
    same = sum((a - b) * diff > 0 for a, b in pairs)
    return f"({same}/{len(pairs)} seeds)"


def region_rows(runs: Sequence[dict[str, Any]], task: str, metric: str) -> tuple[list, list]:
    """``(header, rows)``: ``task/metric`` per region (rows) for the per-region prior and
    every run group (columns, mean over seeds)."""
    groups = _runs_by_label(runs)

    def per_region(run: dict[str, Any], folder: str) -> dict[str, float]:
        path = _run_dir(run) / folder / "metrics.json"
        if not path.exists():
            return {}
        regions = json.loads(path.read_text())["metrics"]["per_region"]
        return {r: v.get(task, {}).get(metric) for r, v in regions.items()}

    columns = {"prior (per region)": [per_region(runs[0], "prior_region")]}
    for label, members in groups.items():
        columns[label] = [per_region(r, "eval") for r in members]
    regions = sorted({r for tables in columns.values() for t in tables for r in t})
    rows = [[region, *(_cell([t.get(region) for t in tables]) for tables in columns.values())]
            for region in regions]
    return ["region", *columns], rows


def comparison_markdown(runs: Sequence[dict[str, Any]], reference: str = "dense", *,
                        region_metrics: Sequence[tuple[str, str]] | None = None,
                        num_resamples: int = 2000, heading: str = "##") -> str:
    """The whole comparison (results, significance, per-region tables) as markdown.

    ``region_metrics``: the ``(task, metric)`` pairs of :data:`HEADLINE` to break down per
    region (default: all); ``heading``: the markdown heading of each section."""
    if not runs:
        raise ValueError("no finished runs to compare")
    head = ["run", "seeds", *(c for *_, c, _ in HEADLINE), "params total", "params active",
            "router params"]
    lines = [f"{heading} Results", "", *_table(head, results_rows(runs)), "",
             "<sub>held-out test split; variants route with the region they predict from the "
             "image, *(oracle regions)* rows with the true region; priors answer from the train "
             "split's statistics without the image; the *ceiling* rewrites each case's true "
             "findings with another phrasing (the best a model that reads the image perfectly "
             "can expect); *(blind)* runs never see an image. "
             "Mean ± sample std over the seeds listed.</sub>", ""]
    sig_head = ["comparison", *(c for *_, c, _ in HEADLINE)]
    lines += [f"{heading} Significance", "", *_table(sig_head, significance_rows(
        runs, reference, num_resamples=num_resamples)), "",
        "<sub>difference of the means of per-case scores averaged over seeds (BLEU-1: "
        "sentence-level), [95 % paired bootstrap CI over test cases]; * = the CI excludes 0; "
        "(k/n seeds) = seeds whose own difference has the same sign. Lower is better for the "
        "measurement error. Each cell is its own test, uncorrected for multiple comparisons: "
        "among 20 true null differences expect about one *.</sub>", ""]
    for task, metric in region_metrics or [(t, m) for t, m, *_ in HEADLINE]:
        column = next(c for t, m, _, c, _ in HEADLINE if (t, m) == (task, metric))
        header, rows = region_rows(runs, task, metric)
        lines += [f"{heading} Per region: {column}", "", *_table(header, rows), ""]
    return "\n".join(lines)
