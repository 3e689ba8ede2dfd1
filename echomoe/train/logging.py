"""Run logging: a local JSONL log that is always written, plus Weights & Biases (offline by
default).

::

    from echomoe.train.logging import RunLogger

    logger = RunLogger("runs/a", config_dict, project="echomoe")        # offline W&B run
    train(model, batches, steps=100, log_fn=logger.log_step)            # losses, lr, MoE stats
    logger.log_eval(100, result.metrics)                                # overall + per region
    logger.log_predictions(result.records, samples, max_rows=8, pred_masks=masks)
    logger.log_heatmap("runs/a/eval/routing.png")
    logger.close({"status": "finished", ...})                           # summary.json

**Local files** (in ``out_dir``): ``config.json`` (the run config), ``metrics.jsonl`` (one JSON
object per ``log_*`` call: ``{"kind", "step", ...flat scalars}``; NaN / inf written as
``null``), ``predictions.jsonl`` (the rows of the predictions table, without images) and
``summary.json`` and ``metrics.csv`` (written by :meth:`RunLogger.close`: the ``train`` and
``eval`` rows of ``metrics.jsonl`` as one table, a column per key, for spreadsheets and
pandas).

**W&B.**  ``wandb`` is imported only when the mode is not ``disabled``.  The mode is the
``WANDB_MODE`` environment variable when set, else ``mode`` (``offline`` by default, so
nothing leaves the machine); the run lives under ``<out_dir>/wandb/`` (``offline-run-*`` when
offline; sync it later with ``wandb sync``).

**Keys.**  Training steps: ``train/loss``, ``train/losses/<name>`` (raw named losses, MoE aux
losses included), ``train/lr``, ``train/grad_norm``, ``train/step_time``,
``train/steps_per_sec`` (+ ``train/samples_per_sec`` / ``train/tokens_per_sec`` when the
record has ``num_samples`` / ``num_tokens``) and, given a routing report, per-layer MoE stats
``moe/<layer>/{load_cv, entropy, nmi, dropped_fraction}`` and their means ``moe/mean/...``
(:func:`echomoe.metrics.routing.report_scalars`).  Evaluation: ``eval/<metric>`` (overall) and
``eval/region/<region>/<task>/<metric>``.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

MODES = ("online", "offline", "disabled")


def jsonable(value: Any) -> Any:
    """A JSON-safe copy: NaN / inf -> ``None``, numpy / torch scalars -> Python, paths -> str."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a nested dict as ``{prefix + "a/b/c": float}`` (others dropped)."""
    out: dict[str, float] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}/"))
        elif isinstance(value, bool):
            out[name] = float(value)
        elif isinstance(value, int | float | np.number):
            out[name] = float(value)
    return out


def eval_scalars(metrics: Mapping[str, Any], prefix: str = "eval/") -> dict[str, float]:
    """Flat eval scalars: an :class:`~echomoe.metrics.harness.EvalResult` ``metrics`` dict gives
    ``{prefix}<overall key>`` and ``{prefix}region/<region>/<task>/<metric>``; any other dict
    is flattened under ``prefix``."""
    if "overall" in metrics:
        out = flatten(metrics["overall"], prefix)
        out.update(flatten(metrics.get("per_region", {}), f"{prefix}region/"))
        return out
    return flatten(metrics, prefix)


def step_scalars(record: Mapping[str, Any], routing: Mapping[str, Any] | None = None
                 ) -> dict[str, float]:
    """Flat scalars of one :func:`echomoe.train.loop.train` record (see the module docstring);
    ``routing`` is a per-layer routing report (:func:`echomoe.metrics.routing.routing_report`),
    or taken from ``record["routing"]`` when it has one."""
    from echomoe.metrics.routing import report_scalars

    out: dict[str, float] = {}
    for key in ("loss", "lr", "grad_norm", "step_time", "epoch"):
        if isinstance(record.get(key), int | float):
            out[f"train/{key}"] = float(record[key])
    out.update(flatten(record.get("losses") or {}, "train/losses/"))
    step_time = record.get("step_time")
    if isinstance(step_time, int | float) and step_time > 0:
        out["train/steps_per_sec"] = 1.0 / step_time
        for key, name in (("num_samples", "samples"), ("num_tokens", "tokens")):
            if isinstance(record.get(key), int | float):
                out[f"train/{name}_per_sec"] = float(record[key]) / step_time
    routing = routing if routing is not None else record.get("routing")
    if routing:
        out.update(report_scalars(routing, prefix="moe/"))
    return out


def write_metrics_csv(jsonl_path: str | os.PathLike, csv_path: str | os.PathLike,
                      kinds: Sequence[str] = ("train", "eval")) -> Path:
    """Write the rows of ``kinds`` in a ``metrics.jsonl`` log as a CSV table.

    Columns: ``kind``, ``step``, ``time``, then every other key in order of first appearance;
    a row leaves the keys it does not have empty.  Returns ``csv_path``.
    """
    rows = []
    with open(jsonl_path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                if row.get("kind") in kinds:
                    rows.append(row)
    columns: dict[str, None] = dict.fromkeys(("kind", "step", "time"))
    for row in rows:
        columns.update(dict.fromkeys(row))
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), restval="")
        writer.writeheader()
        writer.writerows(rows)
    return Path(csv_path)


class RunLogger:
    """Log one run to ``out_dir`` (always) and to W&B (unless disabled).

    Args:
        out_dir: local log directory (created); the W&B run goes to ``out_dir/wandb``.
        config_dict: the run config (JSON-able dict), saved as ``config.json`` and as the W&B
            run config.
        project: W&B project.
        mode: ``"offline"`` (default), ``"online"`` or ``"disabled"``; ``WANDB_MODE`` wins.
        group: W&B group (e.g. the sweep), also stored in the summary.
        name: run name.
        tags: W&B tags.
        entity: W&B entity (online runs).
    """

    def __init__(self, out_dir: str | os.PathLike, config_dict: Mapping[str, Any] | None = None,
                 project: str = "echomoe", mode: str = "offline", group: str | None = None,
                 name: str | None = None, *, tags: Sequence[str] = (),
                 entity: str | None = None):
        mode = os.environ.get("WANDB_MODE") or mode
        if mode == "dryrun":
            mode = "offline"
        if mode not in MODES:
            raise ValueError(f"logging mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.config = jsonable(dict(config_dict or {}))
        self.group, self.name = group, name
        (self.out_dir / "config.json").write_text(json.dumps(self.config, indent=2))
        self.metrics_path = self.out_dir / "metrics.jsonl"
        self._file = self.metrics_path.open("a", encoding="utf-8")
        self.last: dict[str, float] = {}
        self.closed = False
        self.run = None
        self.wandb = None
        if mode != "disabled":
            import wandb

            self.wandb = wandb
            self.run = wandb.init(project=project, entity=entity, config=self.config,
                                  dir=str(self.out_dir), mode=mode, group=group, name=name,
                                  tags=list(tags) or None)

    # ------------------------------------------------------------------------- properties
    @property
    def run_dir(self) -> Path | None:
        """The W&B run directory (``.../wandb/offline-run-*``), ``None`` when disabled."""
        if self.run is None:
            return None
        return Path(self.run.dir).parent

    def describe(self) -> str:
        """One line saying where the logs are (and how to sync an offline run)."""
        where = f"local logs: {self.out_dir}"
        if self.run is None:
            return f"{where} (W&B disabled)"
        if self.mode == "offline":
            return f"{where}; W&B offline run: {self.run_dir} (upload: wandb sync {self.run_dir})"
        return f"{where}; W&B run: {getattr(self.run, 'url', None) or self.run_dir}"

    # ------------------------------------------------------------------------- writing
    def _write(self, kind: str, step: int | None, data: Mapping[str, Any]) -> None:
        row = {"kind": kind, "step": step, "time": time.time(), **data}
        self._file.write(json.dumps(jsonable(row)) + "\n")
        self._file.flush()

    def _wandb_log(self, data: Mapping[str, Any], step: int | None) -> None:
        if self.run is not None and data:
            self.run.log(dict(data), step=step)

    def log_step(self, step: int, record: Mapping[str, Any],
                 routing: Mapping[str, Any] | None = None) -> dict[str, float]:
        """Log one training record (the ``log_fn`` of :func:`echomoe.train.loop.train`).

        ``routing``: optional per-layer routing report of this step (MoE stats).  An
        ``"eval"`` entry of the record is logged through :meth:`log_eval`.  Returns the scalars.
        """
        scalars = step_scalars(record, routing)
        extra = {"stage": record["stage"]} if record.get("stage") is not None else {}
        self.last.update(scalars)
        self._write("train", step, {**scalars, **extra})
        self._wandb_log(scalars, step)
        if record.get("eval"):
            metrics = record["eval"]
            prefixed = all(str(k).startswith("eval/") for k in metrics)
            self.log_eval(step, metrics, prefix="" if prefixed else "eval/")
        return scalars

    def log_eval(self, step: int, metrics: Mapping[str, Any],
                 prefix: str = "eval/") -> dict[str, float]:
        """Log evaluation metrics: an ``EvalResult.metrics`` dict (overall + per region,
        flattened) or a flat ``{name: value}`` dict.  Returns the scalars."""
        scalars = eval_scalars(metrics, prefix)
        self.last.update(scalars)
        self._write("eval", step, scalars)
        self._wandb_log(scalars, step)
        return scalars

    def log_predictions(self, records: Sequence[Mapping[str, Any]], samples: Any,
                        max_rows: int = 8, *, pred_masks: Mapping[str, Any] | None = None,
                        key: str = "predictions", step: int | None = None) -> list[dict]:
        """A predictions table: image with ground-truth / predicted mask overlays, task,
        prompt, reference and generated text.

        Args:
            records: ``EvalResult.records`` rows (``id``, ``region``, ``task``, ``prompt``,
                ``prediction``, ``reference``, ``scores``).
            samples: the evaluated :class:`~echomoe.data.schema.UltrasoundSample` objects (a
                sequence or ``{id: sample}``), for images and ground-truth masks.
            max_rows: rows kept; rows are taken round-robin over tasks so every task shows.
            pred_masks: optional ``{sample id: (h, w) mask}`` predicted masks (resized to the
                image's size for the overlay).
            key: W&B key of the table.
            step: W&B step.

        Returns the table rows without images (also written to ``predictions.jsonl``).
        """
        from echomoe.data.collate import resize_mask
        from echomoe.data.tasks import primary_mask_name

        by_id = dict(samples) if isinstance(samples, Mapping) else {s.id: s for s in samples}
        by_task: dict[str, list[Mapping[str, Any]]] = {}
        for rec in records:
            by_task.setdefault(str(rec.get("task", "")), []).append(rec)
        chosen: list[Mapping[str, Any]] = []
        queues = [list(v) for v in by_task.values()]
        while len(chosen) < max_rows and any(queues):
            for queue in queues:
                if queue and len(chosen) < max_rows:
                    chosen.append(queue.pop(0))
        columns = ["id", "region", "task", "image", "prompt", "reference", "prediction",
                   "scores"]
        table = self.wandb.Table(columns=columns) if self.run is not None else None
        rows = []
        for rec in chosen:
            sample = by_id.get(rec.get("id"))
            row = {k: rec.get(k) for k in ("id", "region", "task", "prompt", "reference",
                                          "prediction")}
            row["scores"] = jsonable(rec.get("scores", {}))
            rows.append(row)
            if table is None:
                continue
            image = None
            if sample is not None:
                array = sample.image_array(0)
                masks = {}
                name = primary_mask_name(sample)
                if name is not None:
                    masks["ground_truth"] = {"mask_data": np.asarray(sample.masks[name],
                                                                     dtype=np.uint8),
                                             "class_labels": {0: "background", 1: name}}
                pred = (pred_masks or {}).get(sample.id)
                if pred is not None:
                    pred = resize_mask(np.asarray(pred, dtype=np.float32), array.shape[:2])
                    masks["prediction"] = {"mask_data": (pred > 0.5).astype(np.uint8),
                                           "class_labels": {0: "background", 1: "predicted"}}
                image = self.wandb.Image(array, masks=masks or None,
                                         caption=f"{sample.region} / {rec.get('task')}")
            table.add_data(row["id"], row["region"], row["task"], image, row["prompt"],
                           row["reference"], row["prediction"], json.dumps(row["scores"]))
        with (self.out_dir / "predictions.jsonl").open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(jsonable(row)) + "\n")
        self._write("predictions", step, {"rows": len(rows), "key": key})
        if table is not None:
            self.run.log({key: table}, step=step)
        return rows

    def log_heatmap(self, path: str | os.PathLike, key: str = "routing/heatmap",
                    step: int | None = None) -> None:
        """Log a routing heatmap PNG (:func:`echomoe.metrics.routing.routing_heatmap`)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"heatmap image {path} does not exist")
        self._write("media", step, {"key": key, "path": str(path)})
        if self.run is not None:
            self.run.log({key: self.wandb.Image(str(path))}, step=step)

    def close(self, summary: Mapping[str, Any] | None = None) -> Path:
        """Write ``summary.json`` (``summary``, or the last logged scalars when ``None``),
        copy its scalars into the W&B run summary and finish the run.  Idempotent; returns the
        summary path."""
        path = self.out_dir / "summary.json"
        if self.closed:
            return path
        data = jsonable(dict(summary) if summary is not None else dict(self.last))
        path.write_text(json.dumps(data, indent=2))
        self._file.close()
        write_metrics_csv(self.metrics_path, self.out_dir / "metrics.csv")
        self.closed = True
        if self.run is not None:
            flat = flatten(data)
            flat.update({k: v for k, v in data.items() if isinstance(v, str)})
            self.run.summary.update(flat)
            self.run.finish()
        return path

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.closed:
            self.close(None if exc is None else {**self.last, "status": "failed"})
