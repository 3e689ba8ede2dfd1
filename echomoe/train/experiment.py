"""One experiment from an :class:`~echomoe.config.ExperimentConfig`: data -> model -> train ->
evaluate -> save.  ``experiments/train.py`` is a thin command line around :func:`run_experiment`.

::

    from echomoe.config import load_config
    from echomoe.train.experiment import run_experiment
    cfg = load_config("configs/experiments/multitask.yaml", ["train.steps=50"])
    summary = run_experiment(cfg)      # also <output_dir>/summary.json

Writes into ``cfg.output_dir``: ``config.yaml``, ``checkpoints/`` (resumable; ``best``),
``metrics.jsonl`` / ``predictions.jsonl`` / ``config.json`` (local logs, in ``logging.dir``
when set), ``wandb/`` (the W&B run unless disabled), ``eval/`` (final metrics, records, routing
heatmap), ``eval_oracle/`` (the same with the true regions, for region-routed models),
``prior_global/`` / ``prior_region/`` (the train-split priors scored on the same test examples,
:func:`~echomoe.metrics.priors.prior_results`), ``report_ceiling/`` (synthetic data: the true
findings in another phrasing, :func:`~echomoe.metrics.priors.report_ceiling`), ``model/``
(``save_pretrained`` of model + processor) and ``summary.json`` = ``{"name", "variant", "seed",
"group", "status": "finished", "metrics": {flat overall test metrics}, "oracle_metrics",
"priors": {name: metrics}, "blind", "parameters": {"total", "active", "router"}, ...}``.

The final evaluation follows the fair protocol: the routers see the region the model predicts
from the image; region-routed models are evaluated a second time with the true regions
(``oracle_metrics``).  ``data.blind`` withholds every image (the blind baseline).

Periodic evaluation (every ``train.eval_every``) is the teacher-forced loss on up to
``eval.num_samples`` cases of ``data.eval_split`` (keys ``eval/loss``, ``eval/loss/<name>``);
when ``train.metric`` is another key, the generation harness
(:func:`~echomoe.metrics.harness.evaluate_model`) runs too (keys ``eval/<task>/<metric>``).
The final evaluation runs the harness on ``data.test_split``.

**Optimisation.**  ``train.schedule`` (``cosine`` / ``linear`` decay to ``min_lr_ratio`` after
``warmup`` steps of linear warmup, or ``constant``), ``train.betas`` / ``train.eps`` (AdamW) and
``train.precision`` go to :func:`~echomoe.train.loop.train`: ``bf16`` autocasts the training
forward and loss (fp32 weights), ``auto`` is bf16 on CUDA and fp32 on CPU.  With a DeepSpeed
config its ``bf16`` section decides (``"auto"`` there follows ``train.precision``), and an
explicit ``train.precision`` that disagrees with it is an error.  ``train.stages`` train only
their ``trainable`` patterns, each at ``lr_scale`` times the scheduled rate (the warmup / decay
schedule spans all ``train.steps``; see :class:`~echomoe.train.optim.StagedSchedule`).

**Scaling out.**  ``deepspeed=<json>`` trains with DeepSpeed ZeRO; under
``torchrun --nproc_per_node N`` the same config trains data-parallel (DDP, expert parallelism
for ``moe_config.backend=expert_parallel``).  Every rank trains and evaluates; rank 0 writes
the logs, the summary and the consolidated ``model/``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from echomoe.train.logging import RunLogger, jsonable


def load_splits(cfg) -> dict[str, list]:
    """``{split: [UltrasoundSample]}`` from ``cfg.data`` (generated, cached or loaded)."""
    from echomoe.data.schema import from_hf_dataset, withhold_images
    from echomoe.data.synthetic.generate import build_dataset_dict, generate, split_indices

    d = cfg.data
    path = Path(d.path) if d.path else None
    if d.source == "disk" or (path is not None and path.exists()):
        from datasets import load_from_disk

        if path is None or not path.exists():
            raise FileNotFoundError(f"data.path {d.path!r} does not exist")
        dataset = load_from_disk(str(path))
        splits = {name: from_hf_dataset(dataset[name]) for name in dataset}
    else:
        samples = generate(d.n, d.seed, d.synthetic_config(), d.num_proc)
        if path is not None:
            build_dataset_dict(d.n, samples=samples).save_to_disk(str(path))
        splits = {name: [samples[i] for i in idx] for name, idx in split_indices(samples).items()}
    if d.blind:
        splits = {name: withhold_images(split) for name, split in splits.items()}
    return splits


def diagnosis_labels(samples) -> list[str]:
    """The sorted diagnosis labels of ``samples`` (those with one); raises when none has."""
    labels = sorted({s.diagnosis for s in samples if s.diagnosis is not None})
    if not labels:
        raise ValueError("model.diagnosis_head: no sample has a diagnosis label")
    return labels


def build_model_and_processor(cfg, train_samples=None, *, label_samples=None):
    """``(model, processor)`` for ``cfg.model`` (random init).  The tokenizer: a local
    directory (``model.tokenizer``), a byte-level BPE trained offline on ``train_samples``'
    texts (``model.tokenizer: train_split``), or one trained on synthetic texts (``None``).
    ``model.diagnosis_head`` gives the model a diagnosis classifier whose classes are the
    diagnosis labels of ``label_samples`` (default ``train_samples``; :func:`run_experiment`
    passes every split, so a label that only the test split has is a class, never an error)."""
    from echomoe.data.tokenizer import load_tokenizer, train_tokenizer
    from echomoe.models.builders import build_processor, corpus_texts
    from echomoe.models.modeling import EchoMoEForConditionalGeneration

    config = cfg.model.build_config()
    if cfg.model.diagnosis_head:
        config.diagnoses = diagnosis_labels(
            (train_samples or ()) if label_samples is None else label_samples)
    tokenizer = None
    if cfg.model.tokenizer_from_train_split():
        if not train_samples:
            raise ValueError("model.tokenizer: train_split needs the train split's samples")
        tokenizer = train_tokenizer(corpus_texts(train_samples, cfg.data.seed),
                                    config.text_config.vocab_size)
    elif cfg.model.tokenizer:
        tokenizer = load_tokenizer(cfg.model.tokenizer)
    processor = build_processor(cfg.model.preset, tokenizer, seed=cfg.data.seed,
                                num_samples=cfg.model.corpus_samples, config=config)
    torch.manual_seed(cfg.train.seed)
    return EchoMoEForConditionalGeneration(config), processor


def make_collator(model, processor, max_length: int | None = None):
    """A :class:`~echomoe.data.collate.VLMCollator` matching ``model``."""
    from echomoe.data.collate import VLMCollator

    config = model.config
    return VLMCollator(processor.tokenizer, model.tokens_per_image, config.image_size,
                       max_length, num_keypoints=config.grounding_config["num_keypoints"],
                       regions=tuple(config.regions), diagnoses=config.diagnoses)


class RoutingProbe:
    """Keeps the routing report of the model's last *training* forward (a forward hook), for
    per-layer MoE stats in the training log."""

    def __init__(self, model):
        self.num_regions = model.config.num_regions
        self._last = None
        self.handle = model.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs, output) -> None:
        if module.training and getattr(output, "routing", None):
            self._last = (output.routing, kwargs.get("attention_mask"))

    def report(self) -> dict[str, Any] | None:
        """Per-layer routing report of the last training forward (``None``: dense / none)."""
        if self._last is None:
            return None
        from echomoe.metrics.routing import routing_report

        routing, mask = self._last
        return routing_report(routing, self.num_regions, token_mask=mask)


@torch.no_grad()
def predicted_masks(model, collator, samples, max_samples: int = 8) -> dict[str, np.ndarray]:
    """Teacher-forced ``[SEG]`` masks ``{sample id: (S, S) bool}`` for the predictions table
    (one forward per sample on its segmentation prompt + reference)."""
    from echomoe.data.tasks import build_task, primary_mask_name

    out: dict[str, np.ndarray] = {}
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for i, sample in enumerate(s for s in samples if primary_mask_name(s) is not None):
            if i >= max_samples:
                break
            pairs = build_task("segment", sample, np.random.default_rng([0, i]))
            if not pairs:
                continue
            prompt, target = pairs[0]
            batch = collator([{"sample": sample, "prompt": prompt, "target": target}])
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            result = model(**batch)
            if result.pred_masks is not None:
                out[sample.id] = (result.pred_masks[0] > 0).cpu().numpy()
    finally:
        model.train(was_training)
    return out


class _SilentLogger:
    """The logger of ranks other than 0: logs nothing."""

    run_dir = None

    def __getattr__(self, name):
        return lambda *args, **kwargs: None

    def describe(self) -> str:
        return "logs are written by rank 0"


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run_experiment(cfg, *, progress: bool = True) -> dict[str, Any]:
    """Run the experiment ``cfg`` end to end and return its summary (see module docstring)."""
    from echomoe.config import config_to_dict, deepspeed_config, save_config
    from echomoe.distributed import init_distributed, save_pretrained_consolidated
    from echomoe.metrics.harness import evaluate_model, report_texts, write_results
    from echomoe.metrics.priors import prior_results, report_ceiling
    from echomoe.metrics.routing import routing_heatmap
    from echomoe.models.builders import count_parameters
    from echomoe.train.batches import MultiTaskBatches
    from echomoe.train.checkpoint import seed_everything
    from echomoe.train.loop import make_loss_eval, train
    from echomoe.train.optim import apply_lora, merge_lora

    t, e, lg = cfg.train, cfg.eval, cfg.logging
    if t.device == "cuda" and not torch.cuda.is_available():
        from echomoe.config import ConfigError

        raise ConfigError(f"{cfg.name}: train.device is 'cuda' but torch.cuda.is_available() "
                          "is False here; use train.device=auto or cpu")
    out = Path(cfg.output_dir or f"runs/{cfg.name}")
    out.mkdir(parents=True, exist_ok=True)
    world = init_distributed()  # torchrun: one process group for DDP / DeepSpeed
    main = world.is_main
    if main:
        save_config(cfg, out / "config.yaml")
    seed_everything(t.seed)
    started = time.perf_counter()

    splits = load_splits(cfg)
    for split in (cfg.data.train_split, cfg.data.eval_split, cfg.data.test_split):
        if not splits.get(split):
            raise ValueError(f"data split {split!r} is missing or empty; have {sorted(splits)}")
    model, processor = build_model_and_processor(
        cfg, splits[cfg.data.train_split],
        label_samples=[s for split in splits.values() for s in split])
    model.to(world.device if world.world_size > 1 and t.device == "auto" else _device(t.device))
    if t.lora.enabled:
        apply_lora(model, target_modules=t.lora.target_modules, r=t.lora.r, alpha=t.lora.alpha,
                   dropout=t.lora.dropout, trainable=t.lora.trainable)
    collator = make_collator(model, processor, cfg.data.max_length)
    rates = cfg.tasks.rates()
    batches = MultiTaskBatches(splits[cfg.data.train_split], collator=collator, rates=rates,
                               batch_size=t.batch_size, seed=t.seed,
                               group_by_length=t.group_by_length, pack_turns=t.pack_turns)
    eval_samples = splits[cfg.data.eval_split][:e.num_samples]
    eval_batches = MultiTaskBatches(eval_samples, collator=collator, rates=rates,
                                    batch_size=min(t.batch_size, len(eval_samples)), seed=t.seed,
                                    drop_last=False)
    loss_eval = make_loss_eval([eval_batches.batch(0, i) for i in range(len(eval_batches))])

    # How every evaluation below answers and decodes (eval section).
    decoding = {"closed": e.closed, "language": e.language, "report_samples": e.report_samples,
                "report_temperature": e.report_temperature, "measure": e.measure,
                "report_pool": (report_texts(splits[cfg.data.train_split], seed=e.seed)
                                if e.report_pool == "train" else None)}

    def eval_fn(m) -> dict[str, float]:
        metrics = {f"eval/{k}": v for k, v in loss_eval(m).items()}
        if t.metric not in metrics:
            result = evaluate_model(m, processor, eval_samples, e.tasks, e.batch_size,
                                    e.max_new_tokens, progress=False, **decoding)
            metrics.update({f"eval/{k}": v for k, v in result.metrics["overall"].items()})
        return metrics

    logger = RunLogger(lg.dir or out, config_to_dict(cfg), project=lg.project, mode=lg.mode,
                       group=lg.group, name=cfg.name, tags=lg.tags,
                       entity=lg.entity) if main else _SilentLogger()
    probe = RoutingProbe(model)

    def log_fn(step: int, record: dict) -> None:
        due = step == 1 or step % max(lg.log_every, 1) == 0 or step == t.steps
        record["num_samples"] = t.batch_size * t.grad_accum
        logger.log_step(step, record, routing=probe.report() if due else None)

    stages = list(t.stages) or None
    try:
        history = train(
            model, batches, steps=t.steps, lr=t.lr, weight_decay=t.weight_decay,
            warmup=t.warmup, min_lr_ratio=t.min_lr_ratio, schedule=t.schedule,
            betas=tuple(t.betas), eps=t.eps, precision=t.precision, grad_accum=t.grad_accum,
            clip=t.clip, eval_fn=eval_fn, eval_every=t.eval_every, metric=t.metric,
            mode=t.mode, checkpoint_dir=out / "checkpoints",
            checkpoint_every=t.checkpoint_every, keep_last=t.keep_last, resume=t.resume,
            seed=t.seed, stages=stages, log_fn=log_fn, progress=progress,
            deepspeed=deepspeed_config(cfg))
        probe.handle.remove()

        test_samples = splits[cfg.data.test_split][:e.num_samples]
        result = evaluate_model(model, processor, test_samples, e.tasks, e.batch_size,
                                e.max_new_tokens, progress=progress, seed=e.seed, **decoding)
        step = len(history) and history[-1]["step"]
        logger.log_eval(step, result.metrics, prefix="test/")
        # Region-routed models also run the oracle protocol (true regions), reported apart.
        oracle = None
        if model.routes_by_region:
            oracle = evaluate_model(model, processor, test_samples, e.tasks, e.batch_size,
                                    e.max_new_tokens, progress=progress, seed=e.seed,
                                    regions="given", **decoding)
        priors = prior_results(splits[cfg.data.train_split], test_samples, e.tasks,
                               image_size=model.config.image_size,
                               measure_pairs=model.config.grounding_config["measure_pairs"],
                               seed=e.seed, language=e.language)
        if "report" in e.tasks and (ceiling := report_ceiling(test_samples, seed=e.seed)):
            priors["report_ceiling"] = ceiling
        if oracle is not None:
            logger.log_eval(step, oracle.metrics, prefix="test_oracle/")
        if main:
            write_results(result, out / "eval")
            if oracle is not None:
                write_results(oracle, out / "eval_oracle")
            for name, prior in priors.items():
                write_results(prior, out / name)
        if result.routing and main:
            heatmap = routing_heatmap(result.routing, list(model.config.regions),
                                      path=out / "eval" / "routing.png", title=cfg.name)
            del heatmap
            logger.log_heatmap(out / "eval" / "routing.png", step=step)
        masks = predicted_masks(model, collator, test_samples, lg.num_predictions)
        logger.log_predictions(result.records, test_samples, lg.num_predictions,
                               pred_masks=masks, step=step)
        if t.lora.enabled:  # the saved model is the plain architecture with merged weights
            merge_lora(model)
        save_pretrained_consolidated(model, out / "model")  # every rank; rank 0 writes
        if main:
            processor.save_pretrained(out / "model")
    except BaseException:
        logger.close({"name": cfg.name, "variant": cfg.model.variant, "seed": t.seed,
                      "group": lg.group, "status": "failed"})
        raise
    summary = {
        "name": cfg.name, "variant": cfg.model.variant, "seed": t.seed, "group": lg.group,
        "status": "finished" if not history.interrupted else "interrupted",
        "metrics": jsonable(result.metrics["overall"]),
        "oracle_metrics": None if oracle is None else jsonable(oracle.metrics["overall"]),
        "priors": {name: jsonable(p.metrics["overall"]) for name, p in priors.items()},
        "blind": cfg.data.blind,
        "parameters": count_parameters(model),
        "steps": step, "best": history.best, "train_loss": history[-1]["loss"],
        "output_dir": str(out), "model_dir": str(out / "model"),
        "wandb_dir": str(logger.run_dir) if logger.run_dir else None,
        "wall_time_s": time.perf_counter() - started,
    }
    if main:
        (out / "summary.json").write_text(json.dumps(jsonable(summary), indent=2))
    summary["where"] = logger.describe()
    logger.close({k: v for k, v in summary.items() if k != "where"})
    return summary
