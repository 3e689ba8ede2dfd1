"""The training recipe: one explicit loop (setup -> steps -> eval / checkpoint), no Trainer.

::

    from echomoe.train import MultiTaskBatches, train
    batches = MultiTaskBatches(samples, collator=collator, rates={"report": 1, "segment": 1},
                               batch_size=4, seed=0)
    history = train(model, batches, steps=200, lr=1e-3, warmup=20, grad_accum=2, clip=1.0,
                    checkpoint_dir="runs/a/checkpoints", checkpoint_every=50, seed=0)

**The step** (as written in :func:`train`; the strategy, :mod:`echomoe.train.strategy`, only
wraps the model, runs backward and reduces across processes)::

    optimizer.zero_grad(set_to_none=True)
    for micro in range(grad_accum):
        with strategy.no_sync(last), autocast(precision, device):
            out = model(**batch)                       # out.loss, out.losses
            strategy.backward(out.loss, grad_accum=grad_accum, last=last)
    grad_norm = strategy.clip_grad_norm(params, clip)
    optimizer.step()
    scheduler.step()

**Data order.**  A batch source (:mod:`echomoe.train.batches`) maps ``(epoch, position)`` to a
batch, so a resumed run sees exactly the batches the uninterrupted run would have seen.

**Losses.**  The model weights its raw named losses with ``config.loss_weights`` into
``out.loss`` (the quantity optimised); the loop records ``loss`` (that total) and ``losses`` (the
raw dict, MoE aux losses included), each averaged over the micro-batches of a step.

**Precision.**  ``precision="bf16"`` runs each training forward (and its loss) under
``torch.autocast(device, dtype=torch.bfloat16)``: weights, gradients and optimiser state stay
fp32, backward runs outside autocast, evaluation runs in fp32.  ``"auto"`` is bf16 on CUDA and
fp32 on CPU (where bf16 autocast is slower); with ``deepspeed=`` the config's ``bf16`` section
decides (see :class:`~echomoe.train.deepspeed.DeepSpeed`).

**Order within a step**: forward/backward x ``grad_accum`` -> clip -> optimiser and scheduler
step -> record + ``log_fn`` -> evaluation (every ``eval_every``; RNG state restored afterwards,
so evaluating never changes the training curve) -> checkpoint (every ``checkpoint_every``, at the
end, and on SIGTERM).  A resumed run continues after the last saved step with identical losses.
"""

from __future__ import annotations

import math
import signal
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from echomoe.config.rules import (
    MODES,
    SCHEDULES,
    check_betas,
    check_choice,
    check_int,
    check_positive,
    check_warmup,
)
from echomoe.config.schema import Stage
from echomoe.distributed.runtime import barrier, init_distributed, is_distributed
from echomoe.train.batches import BatchCursor, as_batch_source
from echomoe.train.checkpoint import (
    latest_valid_checkpoint,
    prune_checkpoints,
    read_meta,
    remove_stale_tmp,
    rng_state,
    seed_everything,
    set_rng_state,
    step_dirname,
)
from echomoe.train.deepspeed import DeepSpeed
from echomoe.train.optim import apply_stage, build_optimizer, build_scheduler, stage_at
from echomoe.train.precision import autocast, check_precision
from echomoe.train.strategy import DDP, Local

BEST_DIRNAME = "best"

EXIT_INTERRUPTED = 3
"""Exit status of an entry point whose run stopped on SIGTERM / SIGINT after saving a
checkpoint (0: finished, 1: failed or invalid); rerun the same command to resume."""

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class NonFiniteLossError(FloatingPointError):
    """A loss or the gradient norm became NaN / inf; ``step`` and ``names`` say where."""

    def __init__(self, message: str, *, step: int, names: Sequence[str]):
        super().__init__(message)
        self.step = step
        self.names = tuple(names)


class History(list):
    """The per-step records returned by :func:`train` (a ``list`` of dicts) plus run facts:
    ``interrupted`` (stopped by SIGTERM / SIGINT), ``best`` (``{"step", "metric", "value"}``
    or None), ``last_checkpoint`` (path or None) and ``resumed_from`` (path or None)."""

    def __init__(self, *args: Any):
        super().__init__(*args)
        self.interrupted = False
        self.best: dict[str, Any] | None = None
        self.last_checkpoint: Path | None = None
        self.resumed_from: Path | None = None


# ----------------------------------------------------------------------------- helpers
def _field(out: Any, name: str) -> Any:
    return out.get(name) if isinstance(out, Mapping) else getattr(out, name, None)


def _to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def set_loss_weights(model: nn.Module, loss_weights: Mapping[str, float]) -> None:
    """Override entries of ``model.config.loss_weights`` (unknown names are an error)."""
    current = getattr(getattr(model, "config", None), "loss_weights", None)
    if current is None:
        raise ValueError("loss_weights given but the model has no config.loss_weights")
    unknown = sorted(set(loss_weights) - set(current))
    if unknown:
        raise ValueError(f"unknown loss_weights {unknown}; valid: {sorted(current)}")
    for name, weight in loss_weights.items():
        if not (isinstance(weight, int | float) and math.isfinite(weight) and weight >= 0):
            raise ValueError(f"loss weight {name!r} must be a finite number >= 0, got {weight!r}")
    current.update({k: float(v) for k, v in loss_weights.items()})


def make_loss_eval(batches: Sequence[Mapping[str, Any]]) -> Callable[[nn.Module], dict]:
    """An ``eval_fn`` giving the mean total ``loss`` and mean raw named losses (prefixed
    ``loss/``) of ``model`` over fixed ``batches``."""
    batches = list(batches)
    if not batches:
        raise ValueError("make_loss_eval needs at least one batch")

    def evaluate(model: nn.Module) -> dict[str, float]:
        device = next(model.parameters()).device
        sums: dict[str, list[float]] = {}
        for batch in batches:
            out = model(**_to_device(batch, device))
            sums.setdefault("loss", []).append(_field(out, "loss").item())
            for name, value in (_field(out, "losses") or {}).items():
                sums.setdefault(f"loss/{name}", []).append(value.item())
        return {k: sum(v) / len(v) for k, v in sums.items()}

    return evaluate


def _evaluate(model: nn.Module, eval_fn: Callable[[nn.Module], Mapping]) -> dict[str, float]:
    """``eval_fn(model)`` in eval mode without gradients; RNG states restored afterwards."""
    was_training = model.training
    saved = rng_state()
    model.eval()
    try:
        with torch.no_grad():
            metrics = eval_fn(model)
    finally:
        set_rng_state(saved)
        model.train(was_training)
    if not isinstance(metrics, Mapping):
        raise TypeError(f"eval_fn must return a dict of metrics, got {type(metrics).__name__}")
    return {k: float(v) for k, v in metrics.items()}


def _check_loss(out: Any, *, step: int, micro: int, grad_accum: int, position: dict) -> None:
    loss = _field(out, "loss")
    if loss is None:
        raise ValueError("the model returned no loss: training batches need labels / targets")
    if torch.isfinite(loss).all():
        return
    losses = _field(out, "losses") or {}
    bad = {k: float(v.detach().float().sum()) for k, v in losses.items()
           if not torch.isfinite(v).all()}
    names = list(bad) or ["loss"]
    detail = ", ".join(f"{k}={v}" for k, v in bad.items()) or f"loss={float(loss)}"
    raise NonFiniteLossError(
        f"non-finite loss at step {step} (micro-batch {micro + 1}/{grad_accum}, data epoch "
        f"{position['epoch']} batch {position['index']}): {detail}. Training stopped before "
        "the optimiser step; lower the learning rate or this loss's weight, or check that "
        "batch.", step=step, names=names)


# ----------------------------------------------------------------------------- the loop
def make_strategy(*, deepspeed=None, ep_size: int | None = None,
                  micro_batch_size: int | None = None) -> Local:
    """The strategy for this process: :class:`~echomoe.train.deepspeed.DeepSpeed` when
    ``deepspeed`` is given, :class:`~echomoe.train.strategy.DDP` under ``torchrun`` with more
    than one process, else :class:`~echomoe.train.strategy.Local`."""
    if deepspeed is not None:
        if ep_size not in (None, 1):
            raise ValueError("ep_size > 1 is not combined with DeepSpeed; use torchrun without "
                             "deepspeed= for expert parallelism")
        return DeepSpeed(deepspeed, micro_batch_size=micro_batch_size)
    init_distributed()
    if is_distributed():
        return DDP(ep_size)
    if ep_size not in (None, 1):
        raise ValueError(f"ep_size={ep_size} needs {ep_size} processes: launch with "
                         f"`torchrun --nproc_per_node {ep_size}`")
    return Local()


def train(
    model: nn.Module,
    train_batches,
    *,
    steps: int,
    lr: float = 1e-3,
    weight_decay: float = 0.01,
    warmup: int = 0,
    min_lr_ratio: float = 0.0,
    schedule: str = "cosine",
    betas: Sequence[float] = (0.9, 0.999),
    eps: float = 1e-8,
    precision: str = "auto",
    grad_accum: int = 1,
    clip: float | None = 1.0,
    expert_lr_scale: float = 1.0,
    loss_weights: Mapping[str, float] | None = None,
    eval_fn: Callable[[nn.Module], Mapping[str, float]] | None = None,
    eval_every: int = 0,
    metric: str = "loss",
    mode: str = "min",
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 0,
    keep_last: int = 3,
    resume: bool = True,
    seed: int = 0,
    stages: Sequence[Stage] | None = None,
    stop_at: int | None = None,
    log_fn: Callable[[int, dict], None] | None = None,
    progress: bool = True,
    handle_sigterm: bool = True,
    deepspeed: Mapping[str, Any] | str | Path | None = None,
    ep_size: int | None = None,
) -> History:
    """Train ``model`` for ``steps`` optimiser steps and return the per-step :class:`History`.

    Args:
        model: a model whose ``forward(**batch)`` returns ``loss`` and ``losses`` (the echomoe
            VLM), already on its device.
        train_batches: a batch source (:class:`MultiTaskBatches`, :class:`IndexedBatches`) or a
            callable ``epoch -> iterable of batch dicts``.
        steps: total optimiser steps (the schedule's length).
        lr, weight_decay, expert_lr_scale: AdamW settings (see
            :func:`~echomoe.train.optim.build_optimizer`).
        warmup, min_lr_ratio, schedule: ``warmup`` steps of linear warmup from 0, then
            ``schedule`` (:data:`~echomoe.config.rules.SCHEDULES`): ``"cosine"`` or
            ``"linear"`` decay to ``min_lr_ratio * lr`` at ``steps``, or ``"constant"`` (see
            :func:`~echomoe.train.optim.lr_schedule`).
        betas, eps: AdamW's moment decay rates (two numbers in ``[0, 1)``) and epsilon (> 0).
        precision: ``"auto"`` (bf16 on CUDA, fp32 on CPU; with ``deepspeed`` the config's
            ``bf16`` section), ``"fp32"`` or ``"bf16"`` (autocast around forward + loss); see
            the module docstring.
        grad_accum: micro-batches per optimiser step.
        clip: gradient-norm clipping (``None`` / 0: off; the norm is logged either way).
        loss_weights: overrides of ``model.config.loss_weights`` (saved with the model config).
        eval_fn: ``model -> {metric: value}`` run every ``eval_every`` steps and at the end;
            the best value of ``metric`` (``mode`` ``"min"`` / ``"max"``) is saved as
            ``checkpoint_dir/best`` (model weights, no optimiser state: for evaluation).
        checkpoint_dir: where ``step_*`` checkpoints go (``None``: no checkpoints, no resume).
        checkpoint_every: save every n steps (0: only at the end / on SIGTERM / SIGINT).
        keep_last: ``step_*`` checkpoints kept.
        resume: continue from the latest intact checkpoint in ``checkpoint_dir`` when there is
            one (a checkpoint of a run with other ``steps`` is refused: the schedule spans them).
        seed: seeds python / numpy / torch at a fresh start (a resume restores the saved RNG).
        stages: staged training (:class:`~echomoe.train.optim.Stage`): each stage trains its
            ``trainable`` parameters at ``lr * schedule(step) * stage.lr_scale`` (every
            parameter group, times the group's own scale; the schedule spans all ``steps``,
            see :class:`~echomoe.train.optim.StagedSchedule`).  ``None`` keeps the model's
            ``requires_grad`` flags as they are (e.g. after ``apply_lora``).
        stop_at: stop after this step with a checkpoint, without changing the schedule (for
            time-sliced jobs); ``None``: run to ``steps``.
        log_fn: ``log_fn(step, record)`` after every step (records as in the history).
        progress: show a tqdm progress bar.
        handle_sigterm: on SIGTERM or SIGINT (Ctrl-C) finish the current step, save a
            checkpoint and return with ``history.interrupted = True`` (main thread only); a
            second SIGINT while it finishes raises ``KeyboardInterrupt`` at once.
        deepspeed: a DeepSpeed config (dict or JSON path): train with DeepSpeed ZeRO (see
            :class:`echomoe.train.deepspeed.DeepSpeed`), in one process or under
            ``torchrun``.
        ep_size: expert parallelism under ``torchrun`` (``None``: shard the experts built with
            ``backend="expert_parallel"`` over all ranks; ``1``: off).

    **Several processes.**  Under ``torchrun --nproc_per_node P`` (or with ``deepspeed``) the
    same call trains data-parallel: each rank reads its shard of the global batch (batch
    ``i * P + r`` of ``train_batches`` at step ``i``), gradients are averaged (DDP or DeepSpeed),
    losses in the history are averaged over ranks, and a step equals a one-process step with
    ``P x grad_accum`` micro-batches.  ``eval_fn`` runs on every rank (expert parallelism and
    ZeRO-3 need all ranks in a forward); ``log_fn`` and the progress bar run on rank 0; rank 0
    writes the consolidated weights of a checkpoint and each rank its own training state, so
    resuming needs the same number of processes (see :mod:`echomoe.distributed`).

    Each history record: ``step``, ``loss``, ``losses`` (raw named losses), ``lr``,
    ``grad_norm`` (before clipping), ``epoch``, ``stage``, ``step_time`` and, on evaluation
    steps, ``eval`` (the metrics).

    Raises:
        NonFiniteLossError: a loss or the gradient norm is NaN / inf (names the loss and step).
    """
    for name, value, low in (("steps", steps, 1), ("grad_accum", grad_accum, 1),
                             ("eval_every", eval_every, 0),
                             ("checkpoint_every", checkpoint_every, 0),
                             ("keep_last", keep_last, 1)):
        check_int(value, name, low)
    check_warmup(warmup, "warmup", steps)
    check_choice(mode, "mode", MODES)
    check_choice(schedule, "schedule", SCHEDULES)
    betas = check_betas(betas)
    check_positive(eps, "eps")
    if eval_every and eval_fn is None:
        raise ValueError("eval_every is set but no eval_fn was given")
    check_precision(precision)
    if loss_weights:
        set_loss_weights(model, loss_weights)

    # -- set-up: strategy, optimiser, schedule -------------------------------------------
    source = as_batch_source(train_batches)
    device = next(model.parameters()).device
    strategy = make_strategy(deepspeed=deepspeed, ep_size=ep_size,
                             micro_batch_size=getattr(source, "batch_size", None))
    forward_precision = strategy.prepare(model, precision=precision, grad_accum=grad_accum,
                                         clip=clip, staged=bool(stages))
    optimizer = build_optimizer(model, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps,
                                expert_lr_scale=expert_lr_scale, **strategy.optimizer_options)
    scheduler = build_scheduler(optimizer, schedule=schedule, warmup=warmup, total=steps,
                                min_ratio=min_lr_ratio, stages=tuple(stages) if stages else None)
    train_model, optimizer, scheduler = strategy.wrap(model, optimizer, scheduler)
    module = strategy.module
    main = strategy.world.is_main
    source = strategy.shard(source)
    history = History()
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    step, data_state, best = 0, {"epoch": 0, "index": 0}, None
    latest = None
    if ckpt_dir is not None:
        if main:
            remove_stale_tmp(ckpt_dir)
        barrier()
        latest = latest_valid_checkpoint(ckpt_dir) if resume else None
    if latest is not None:
        saved_steps = read_meta(latest)["extra"].get("steps")
        if saved_steps is not None and saved_steps != steps:
            raise ValueError(
                f"{latest} was saved by a run of {saved_steps} steps and this one asks for "
                f"{steps}: the learning-rate schedule spans all the steps, so resuming would "
                f"bend it mid-run.  Resume with steps={saved_steps} (train.steps), or start a "
                "new run (another checkpoint_dir / output_dir, or resume=False)")
        info = strategy.load(latest)
        step, data_state = info["step"], info["data_state"]
        best = info["extra"].get("best")
        if info["extra"].get("seed", seed) != seed:
            warnings.warn(f"resuming {latest} (seed {info['extra']['seed']}) with seed {seed};"
                          " the saved RNG state wins", stacklevel=2)
        history.resumed_from = latest
    else:
        seed_everything(seed)
    history.best = best
    cursor = BatchCursor(source, **data_state)
    end = min(steps, stop_at) if stop_at is not None else steps

    stop = {"signal": None}
    previous_handlers: dict[int, Any] = {}
    if handle_sigterm and threading.current_thread() is threading.main_thread():
        def _on_signal(signum, frame):
            if signum == signal.SIGINT and stop["signal"] is not None:
                raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the checkpoint
            stop["signal"] = signum
        previous_handlers = {sig: signal.signal(sig, _on_signal) for sig in _STOP_SIGNALS}
    elif handle_sigterm:
        warnings.warn("train() runs outside the main thread: no SIGTERM / SIGINT handler "
                      "installed", stacklevel=2)

    def save(at: int, stage_name: str | None) -> None:
        extra = {"best": best, "seed": seed, "stage": stage_name, "steps": steps}
        history.last_checkpoint = strategy.save(
            ckpt_dir / step_dirname(at), step=at, data_state=cursor.state(), extra=extra)
        if main:
            prune_checkpoints(ckpt_dir, keep_last)
        barrier()

    from tqdm.auto import tqdm

    bar = tqdm(total=end, initial=step, desc="train", disable=not (progress and main),
               dynamic_ncols=True)
    stage_index, stage_name = None, None
    module.train()
    try:
        while step < end:
            if stages:
                index, stage = stage_at(stages, step)
                if index != stage_index:
                    apply_stage(module, stage)
                    train_model = strategy.on_stage_change()
                    stage_index, stage_name = index, stage.name
            params = [p for p in module.parameters() if p.requires_grad]
            if not params:
                raise ValueError("no trainable parameter (everything is frozen)")
            started = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            total, sums, counts = 0.0, {}, {}
            for micro in range(grad_accum):
                last = micro == grad_accum - 1
                batch = _to_device(cursor.next(), device)
                position = {"epoch": cursor.epoch, "index": cursor.index - 1}
                with strategy.no_sync(last):  # DDP: all-reduce in the last backward only
                    with autocast(forward_precision, device):
                        out = train_model(**batch)
                    _check_loss(out, step=step + 1, micro=micro, grad_accum=grad_accum,
                                position=position)
                    loss = _field(out, "loss")
                    strategy.backward(loss, grad_accum=grad_accum, last=last)
                total += loss.item() / grad_accum
                for name, value in (_field(out, "losses") or {}).items():
                    sums[name] = sums.get(name, 0.0) + value.item()
                    counts[name] = counts.get(name, 0) + 1
            epoch = cursor.epoch  # of the step's last batch
            grad_norm = strategy.clip_grad_norm(params, clip)  # None: DeepSpeed clips in step
            if grad_norm is not None and not math.isfinite(grad_norm):
                raise NonFiniteLossError(
                    f"non-finite gradient norm ({grad_norm}) at step {step + 1} with finite "
                    f"loss {total}; training stopped before the optimiser step.",
                    step=step + 1, names=["grad_norm"])
            current_lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            if grad_norm is None:
                grad_norm = strategy.grad_norm()
            step += 1
            total, means = strategy.reduce_record(total, sums, counts)
            record = {"step": step, "loss": total, "losses": means, "lr": current_lr,
                      "grad_norm": grad_norm, "epoch": epoch, "stage": stage_name,
                      "step_time": time.perf_counter() - started}
            if eval_fn is not None and ((eval_every and step % eval_every == 0) or step == steps):
                record["eval"] = metrics = _evaluate(module, eval_fn)
                if metric not in metrics:
                    raise KeyError(f"eval metric {metric!r} not in eval_fn's result; it has: "
                                   f"{sorted(metrics)}")
                value = metrics[metric]
                better = math.isfinite(value) and (
                    best is None or (value < best["value"] if mode == "min"
                                     else value > best["value"]))
                if better:
                    best = {"step": step, "metric": metric, "value": value}
                    history.best = best
                    if ckpt_dir is not None:
                        strategy.save(ckpt_dir / BEST_DIRNAME, step=step,
                                      data_state=cursor.state(), extra={"best": best},
                                      weights_only=True)
            history.append(record)
            if log_fn is not None and main:
                log_fn(step, dict(record))
            bar.update(1)
            bar.set_postfix(loss=f"{total:.4f}", lr=f"{current_lr:.2e}")
            interrupted = strategy.any_rank(stop["signal"] is not None)
            periodic = checkpoint_every and step % checkpoint_every == 0
            if ckpt_dir is not None and (periodic or interrupted or step == end):
                save(step, stage_name)
            if interrupted:
                history.interrupted = True
                if ckpt_dir is None:
                    name = signal.Signals(stop["signal"]).name if stop["signal"] else "a signal"
                    warnings.warn(f"{name}: stopping without a checkpoint (no checkpoint_dir)",
                                  stacklevel=2)
                break
    finally:
        bar.close()
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
    return history
