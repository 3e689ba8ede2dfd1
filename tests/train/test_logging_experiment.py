"""RunLogger (W&B offline / disabled), the ``experiments/train.py`` entry point and HF
``Trainer`` compatibility, on tiny CPU models."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from echomoe.data.synthetic.generate import SyntheticConfig, generate
from echomoe.models import build_model, build_processor
from echomoe.train.experiment import make_collator
from echomoe.train.logging import RunLogger

REPO = Path(__file__).resolve().parents[2]
RATES = {"report": 1.0, "vqa": 1.0, "segment": 1.0, "detect": 1.0, "measure": 1.0}


@pytest.fixture(scope="module")
def tiny():
    """A tiny ``moe_topk`` model, its processor / collator and 6 synthetic cases at 32 px."""
    torch.manual_seed(0)
    processor = build_processor("tiny", num_samples=16)
    model = build_model("tiny", "moe_topk")
    samples = generate(6, 0, SyntheticConfig(image_size=32))
    return {"model": model, "processor": processor, "samples": samples,
            "collator": make_collator(model, processor)}


def _batch(tiny, n: int = 2):
    from echomoe.data.collate import TaskTransform
    from echomoe.data.tasks import TaskSampler

    transform = TaskTransform(TaskSampler(RATES, seed=0))
    return tiny["collator"]([transform.example(s) for s in tiny["samples"][:n]])


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _log_run(tmp_path: Path, tiny, mode: str, monkeypatch) -> RunLogger:
    from echomoe.metrics.routing import routing_heatmap, routing_report

    monkeypatch.setenv("WANDB_MODE", mode)
    model, samples = tiny["model"], tiny["samples"]
    batch = _batch(tiny)
    with torch.no_grad():
        out = model(**batch)
    report = routing_report(out.routing, model.config.num_regions,
                            token_mask=batch["attention_mask"])
    logger = RunLogger(tmp_path, {"model": {"variant": "moe_topk"}}, project="test",
                       mode="offline", group="g", name="r")
    record = {"step": 1, "loss": float(out.loss), "lr": 1e-3, "grad_norm": 1.0,
              "step_time": 0.5, "num_samples": 2,
              "losses": {k: float(v) for k, v in out.losses.items()}, "eval": {"eval/loss": 2.0}}
    logger.log_step(1, record, routing=report)
    metrics = {"overall": {"segment/dice": 0.5, "report/bleu1": float("nan")},
               "per_region": {samples[0].region: {"segment": {"dice": 0.5, "n": 1}}}}
    logger.log_eval(1, metrics)
    records = [{"id": s.id, "region": s.region, "task": t, "prompt": "p", "prediction": "x",
                "reference": "y", "scores": {"dice": 0.1}}
               for s in samples[:2] for t in ("segment", "report")]
    pred = {samples[0].id: np.ones((16, 16), dtype=bool)}
    rows = logger.log_predictions(records, samples, max_rows=3, pred_masks=pred, step=1)
    assert len(rows) == 3 and {r["task"] for r in rows} == {"segment", "report"}
    heatmap = tmp_path / "routing.png"
    routing_heatmap(report, list(model.config.regions), path=heatmap)
    logger.log_heatmap(heatmap, step=1)
    logger.close({"status": "finished", "metrics": {"segment/dice": 0.5}})
    return logger


def test_run_logger_offline_writes_wandb_run_and_local_log(tmp_path, tiny, monkeypatch):
    logger = _log_run(tmp_path, tiny, "offline", monkeypatch)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and logger.run_dir == runs[0]
    assert list(runs[0].glob("*.wandb")), "the offline run has no .wandb log"
    rows = _rows(tmp_path / "metrics.jsonl")
    kinds = [r["kind"] for r in rows]
    assert kinds[:3] == ["train", "eval", "eval"] and "predictions" in kinds and "media" in kinds
    train = rows[0]
    for key in ("train/loss", "train/lr", "train/grad_norm", "train/steps_per_sec",
                "train/samples_per_sec", "train/losses/lm", "train/losses/moe_balance",
                "moe/mean/load_cv", "moe/mean/dropped_fraction"):
        assert key in train, key
    assert any(k.startswith("moe/layers.") and k.endswith("/load_cv") for k in train)
    assert rows[1]["eval/loss"] == 2.0
    assert rows[2]["eval/region/" + tiny["samples"][0].region + "/segment/dice"] == 0.5
    assert rows[2]["eval/report/bleu1"] is None  # NaN -> null
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "finished"
    assert (tmp_path / "predictions.jsonl").exists() and (tmp_path / "config.json").exists()


def test_run_logger_disabled_writes_only_local_files(tmp_path, tiny, monkeypatch):
    logger = _log_run(tmp_path, tiny, "disabled", monkeypatch)
    assert logger.run is None and logger.run_dir is None
    assert not (tmp_path / "wandb").exists()
    assert {p.name for p in tmp_path.iterdir()} == {
        "config.json", "metrics.jsonl", "metrics.csv", "predictions.jsonl", "summary.json",
        "routing.png"}
    assert "W&B disabled" in logger.describe()
    with (tmp_path / "metrics.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [r["kind"] for r in table] == ["train", "eval", "eval"]
    assert float(table[1]["eval/loss"]) == 2.0 and table[0]["eval/loss"] == ""
    assert float(table[0]["train/lr"]) == 1e-3 and "moe/mean/load_cv" in table[0]


def test_train_script_main_tiny_config(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    spec = importlib.util.spec_from_file_location("train_script", REPO / "experiments/train.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "run"
    started = time.perf_counter()
    status = script.main([
        str(REPO / "configs/experiments/multitask.yaml"), "train.steps=3",
        "train.warmup=1", "train.eval_every=2", "train.batch_size=4", "data.n=16",
        "data.synthetic.image_size=32", "eval.num_samples=4", "eval.max_new_tokens=4",
        "model.variant=moe_topk", "model.corpus_samples=16", "logging.mode=disabled",
        "logging.log_every=1", "train.group_by_length=true", "model.diagnosis_head=true",
        f"output_dir={out}"])
    assert status == 0 and time.perf_counter() - started < 60
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished"
    assert (summary["name"], summary["variant"], summary["seed"]) == ("multitask", "moe_topk", 0)
    assert "group" in summary and summary["metrics"]
    values = [v for v in summary["metrics"].values() if v is not None]
    assert values and all(math.isfinite(v) for v in values)
    assert (out / "model" / "config.json").exists()
    assert (out / "model" / "processor_config.json").exists()
    diagnoses = json.loads((out / "model" / "config.json").read_text())["diagnoses"]
    assert diagnoses == sorted(diagnoses) and "renal_stone" in diagnoses  # a test-only label
    rows = _rows(out / "metrics.jsonl")
    steps = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in steps] == [1, 2, 3] and "moe/mean/load_cv" in steps[0]
    assert any("diagnosis_cls" in key for key in steps[0])
    assert any("eval/loss" in r for r in rows) and any("test/segment/dice" in r for r in rows)
    assert not (out / "wandb").exists()


def test_hf_trainer_trains_with_moe_aux_losses(tmp_path, tiny):
    from transformers import Trainer, TrainingArguments

    from echomoe.data.collate import TaskTransform
    from echomoe.data.tasks import TaskSampler

    torch.manual_seed(0)
    model = build_model("tiny", "moe_topk")
    batch = _batch(tiny)
    out = model(**batch)
    weights = model.config.loss_weights
    assert {"lm", "moe_balance"} <= set(out.losses)
    expected = sum(weights.get(k, 1.0) * v for k, v in out.losses.items())
    torch.testing.assert_close(out.loss, expected)

    transform = TaskTransform(TaskSampler(RATES, seed=0))
    examples = [transform.example(s) for s in tiny["samples"]]
    seen: list[dict] = []

    class RecordingTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True, **kwargs)
            seen.append({k: float(v.detach()) for k, v in outputs["losses"].items()} | {
                "total": float(loss.detach())})
            return (loss, outputs) if return_outputs else loss

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[],
                             save_strategy="no", max_steps=2, per_device_train_batch_size=2,
                             learning_rate=1e-3, logging_steps=1, remove_unused_columns=False,
                             disable_tqdm=True)
    before = next(p for n, p in model.named_parameters()
                                             if "experts" in n).detach().clone()
    trainer = RecordingTrainer(model=model, args=args, train_dataset=examples,
                               data_collator=tiny["collator"])
    result = trainer.train()
    assert result.global_step == 2 and math.isfinite(result.training_loss)
    assert len(seen) == 2 and all("moe_balance" in s and s["moe_balance"] > 0 for s in seen)
    for s in seen:
        total = sum(weights.get(k, 1.0) * v for k, v in s.items() if k != "total")
        assert math.isclose(s["total"], total, rel_tol=1e-4)
    after = next(p for n, p in model.named_parameters() if "experts" in n)
    assert not torch.equal(before, after.detach())


def test_diagnosis_labels_are_the_sorted_labels_and_none_is_an_error():
    from types import SimpleNamespace

    from echomoe.train.experiment import diagnosis_labels

    samples = [SimpleNamespace(diagnosis=d) for d in ("tr4", None, "normal", "tr4")]
    assert diagnosis_labels(samples) == ["normal", "tr4"]
    with pytest.raises(ValueError, match="model.diagnosis_head: no sample has a diagnosis"):
        diagnosis_labels([SimpleNamespace(diagnosis=None)])


def test_run_experiment_gives_the_train_reports_as_the_report_pool(tmp_path, train_kwargs_of,
                                                                  monkeypatch):
    from echomoe.config import load_config
    from echomoe.metrics import harness

    seen = []
    monkeypatch.setattr(harness, "report_texts",
                        lambda samples, seed=0: seen.append((list(samples), seed)) or ["x"])
    base = REPO / "configs" / "experiments" / "base.yaml"
    common = ["train.steps=4", "train.warmup=0", "train.batch_size=2", "train.device=cpu",
              "data.n=12", "data.synthetic.image_size=32", "model.corpus_samples=12",
              "eval.num_samples=2", "logging.mode=disabled", f"output_dir={tmp_path / 'run'}",
              "eval.report_samples=2", "eval.seed=3"]
    train_kwargs_of(load_config(base, common))
    assert seen == []  # report_pool: none
    train_kwargs_of(load_config(base, [*common, "eval.report_pool=train"]))
    (samples, seed), = seen
    assert seed == 3 and 0 < len(samples) < 12  # the train split only
