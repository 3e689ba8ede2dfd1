"""The training recipe: one explicit loop (setup -> steps -> eval / checkpoint), no Trainer.

::

    from echomoe.train import MultiTaskBatches, train
    batches = MultiTaskBatches(samples, collator=collator, rates={"report": 1, "segment": 1},
                               batch_size=4, seed=0)
    history = train(model, batches, steps=200, lr=1e-3, warmup=20, grad_accum=2, clip=1.0,
                    checkpoint_dir="runs/a/checkpoints", checkpoint_every=50, seed=0)

**Data order.**  A batch source maps ``(epoch, position)`` to a batch.
:class:`MultiTaskBatches` permutes the samples with ``default_rng([seed, epoch])`` and draws each
sample's task with :class:`~echomoe.data.collate.TaskTransform` (key ``(epoch, sample id)``), so a
batch depends only on ``(seed, epoch, position)``: a resumed run sees exactly the batches the
uninterrupted run would have seen.  A plain callable ``epoch -> iterable of batches`` works too
(it is fast-forwarded on resume, so it must be deterministic in ``epoch``).

**Losses.**  The model weights its raw named losses with ``config.loss_weights`` into
``out.loss`` (the quantity optimised); the loop records ``loss`` (that total) and ``losses`` (the
raw dict, MoE aux losses included), each averaged over the micro-batches of a step.

**Precision.**  ``precision="bf16"`` runs each training forward (and its loss) under
``torch.autocast(device, dtype=torch.bfloat16)``: weights, gradients and optimiser state stay
fp32, backward runs outside autocast, evaluation runs in fp32.  ``"auto"`` is bf16 on CUDA and
fp32 on CPU (where bf16 autocast is slower); with ``deepspeed=`` the config's ``bf16`` section
decides (see :class:`~echomoe.distributed.zero.DeepSpeed`).

**Order within a step**: forward/backward x ``grad_accum`` -> clip -> optimiser and scheduler
step -> record + ``log_fn`` -> evaluation (every ``eval_every``; RNG state restored afterwards,
so evaluating never changes the training curve) -> checkpoint (every ``checkpoint_every``, at the
end, and on SIGTERM).  A resumed run continues after the last saved step with identical losses.
"""

from __future__ import annotations

import itertools
import math
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

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
from echomoe.train.optim import SCHEDULES, Stage, apply_stage, check_betas, stage_at

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


# ----------------------------------------------------------------------------- batches
class IndexedBatches:
    """Batches of a random-access ``dataset`` with a per-epoch permutation.

    Batch ``index`` of ``epoch`` holds the items at positions ``index * batch_size ...`` of
    ``default_rng([seed, epoch]).permutation(len(dataset))`` (or of ``range`` without
    ``shuffle``), passed through ``collate_fn``.

    Args:
        dataset: anything with ``__len__`` and ``__getitem__(int)``.
        collate_fn: list of items -> batch dict of tensors.
        batch_size: items per batch.
        seed: permutation seed.
        shuffle: permute per epoch.
        drop_last: drop the last incomplete batch of an epoch.
    """

    def __init__(self, dataset, *, collate_fn: Callable[[list], dict], batch_size: int,
                 seed: int = 0, shuffle: bool = True, drop_last: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset = dataset
        self.collate_fn = collate_fn
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.drop_last = drop_last
        if len(self) == 0:
            raise ValueError(f"{len(dataset)} items make no batch of {batch_size}"
                             + (" (drop_last=True)" if drop_last else ""))
        self._order: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def order(self, epoch: int) -> np.ndarray:
        """Dataset positions in the order of ``epoch``."""
        if self._order is None or self._order[0] != epoch:
            n = len(self.dataset)
            order = (np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle
                     else np.arange(n))
            self._order = (epoch, self.arrange(order, epoch))
        return self._order[1]

    def arrange(self, order: np.ndarray, epoch: int) -> np.ndarray:
        """Rearrange the positions of ``epoch`` before they are cut into batches (a hook for
        subclasses; here unchanged)."""
        return order

    def item(self, position: int, epoch: int) -> Any:
        """One dataset item (override to transform items per epoch)."""
        return self.dataset[position]

    def batch(self, epoch: int, index: int) -> dict:
        """Batch ``index`` of ``epoch``."""
        if not 0 <= index < len(self):
            raise IndexError(f"batch index {index} out of range for {len(self)} batches")
        chosen = self.order(epoch)[index * self.batch_size:(index + 1) * self.batch_size]
        return self.collate_fn([self.item(int(i), epoch) for i in chosen])

    def iterate(self, epoch: int, start: int = 0) -> Iterator[dict]:
        """Batches ``start, start + 1, ...`` of ``epoch``."""
        return (self.batch(epoch, i) for i in range(start, len(self)))


class MultiTaskBatches(IndexedBatches):
    """Multi-task batches from :class:`~echomoe.data.schema.UltrasoundSample` objects.

    Each sample's task is drawn by a :class:`~echomoe.data.tasks.TaskSampler` with the given
    sampling ``rates`` (relative weights) through
    :class:`~echomoe.data.collate.TaskTransform` with key ``(epoch, crc32(sample id))``; the
    items go through ``collator`` (a :class:`~echomoe.data.collate.VLMCollator`).  Samples that
    support none of the tasks with a positive rate are left out (``skipped`` counts them).

    With ``group_by_length`` (as ``transformers``' ``group_by_length``), each epoch's
    permutation is cut into windows of ``group_window`` batches; a window's samples are sorted
    by sequence length (``collator.sequence_length(item)``, the tokens of this epoch's task)
    and cut into batches, and the epoch's full batches are shuffled.  Batches then hold
    samples of similar length, so far less padding, while every sample is still seen once
    per epoch in an order that depends only on ``(seed, epoch)``; an incomplete last batch
    stays last.  Windows of a few batches (the default, 4) keep some task mix in a batch.

    Grouping changes what a batch holds, not only its padding: a grouped batch holds fewer
    tasks, which in the demo cost the MoE variants quality (see the README) while the dense
    model was unaffected.  Off by default.
    """

    def __init__(self, samples: Sequence, *, collator: Callable[[list], dict],
                 rates: Mapping[str, float], batch_size: int, seed: int = 0,
                 drop_last: bool = True, group_by_length: bool = False,
                 group_window: int = 4):
        from echomoe.data.collate import TaskTransform
        from echomoe.data.tasks import TaskSampler

        if group_by_length and not callable(getattr(collator, "sequence_length", None)):
            raise TypeError(f"group_by_length needs a collator with sequence_length(item) "
                            f"(e.g. VLMCollator); got {type(collator).__name__}")
        if group_window < 1:
            raise ValueError(f"group_window must be >= 1 batch, got {group_window}")
        sampler = TaskSampler(rates, seed=seed)
        kept = [s for s in samples if sampler.supported(s)]
        self.skipped = len(samples) - len(kept)
        if not kept:
            raise ValueError(f"none of the {len(samples)} samples supports a task with a "
                             f"positive rate in {dict(rates)}")
        self.transform = TaskTransform(sampler)
        self.group_by_length = group_by_length
        self.group_window = int(group_window)
        super().__init__(kept, collate_fn=collator, batch_size=batch_size, seed=seed,
                         drop_last=drop_last)

    def item(self, position: int, epoch: int) -> dict:
        self.transform.set_epoch(epoch)
        return self.transform.example(self.dataset[position])

    def arrange(self, order: np.ndarray, epoch: int) -> np.ndarray:
        """Group by length when asked (see the class docstring)."""
        if not self.group_by_length:
            return order
        bs = self.batch_size
        full, rest = np.split(order, [len(order) // bs * bs])
        length_of = self.collate_fn.sequence_length
        lengths = np.array([length_of(self.item(int(i), epoch)) for i in full])
        window = self.group_window * bs
        batches = []
        for start in range(0, len(full), window):
            by_length = np.argsort(-lengths[start:start + window], kind="stable")
            batches.extend(np.split(full[start:start + window][by_length],
                                    len(by_length) // bs))
        shuffle = np.random.default_rng([self.seed, epoch, 1]).permutation(len(batches))
        return np.concatenate([*(batches[i] for i in shuffle), rest])


class FactoryBatches:
    """Wrap ``factory(epoch) -> iterable of batches``; resuming skips the consumed batches
    (so ``factory`` must give the same batches for the same epoch)."""

    def __init__(self, factory: Callable[[int], Iterable[dict]]):
        self.factory = factory

    def iterate(self, epoch: int, start: int = 0) -> Iterator[dict]:
        """Batches ``start, start + 1, ...`` of ``factory(epoch)`` (the first ``start`` are
        drawn and dropped)."""
        return itertools.islice(iter(self.factory(epoch)), start, None)


def as_batch_source(batches) -> IndexedBatches | FactoryBatches:
    """An object with ``iterate(epoch, start)``: batch sources pass through, a callable
    becomes :class:`FactoryBatches`."""
    if hasattr(batches, "iterate"):
        return batches
    if callable(batches):
        return FactoryBatches(batches)
    raise TypeError("train_batches must be a batch source (IndexedBatches / MultiTaskBatches) "
                    f"or a callable epoch -> iterable of batches, got {type(batches).__name__}")


class _Cursor:
    """Position ``(epoch, index)`` in a batch source; ``next()`` moves across epochs."""

    def __init__(self, source, epoch: int = 0, index: int = 0):
        self.source, self.epoch, self.index = source, int(epoch), int(index)
        self._it: Iterator[dict] | None = None

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def next(self) -> dict:
        for _ in range(2):
            if self._it is None:
                self._it = self.source.iterate(self.epoch, self.index)
            try:
                batch = next(self._it)
            except StopIteration:
                if self.index == 0:
                    break
                self.epoch, self.index, self._it = self.epoch + 1, 0, None
                continue
            self.index += 1
            return batch
        raise ValueError(f"the batch source yielded no batch for epoch {self.epoch}")


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
            ``schedule`` (:data:`~echomoe.train.optim.SCHEDULES`): ``"cosine"`` or
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
            :class:`echomoe.distributed.zero.DeepSpeed`), in one process or under
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
                             ("warmup", warmup, 0), ("eval_every", eval_every, 0),
                             ("checkpoint_every", checkpoint_every, 0),
                             ("keep_last", keep_last, 1)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    betas = check_betas(betas)
    if not (isinstance(eps, int | float) and math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
    if eval_every and eval_fn is None:
        raise ValueError("eval_every is set but no eval_fn was given")
    from echomoe.distributed.runtime import barrier
    from echomoe.distributed.strategy import check_precision, make_strategy

    check_precision(precision)
    if loss_weights:
        set_loss_weights(model, loss_weights)

    source = as_batch_source(train_batches)
    device = next(model.parameters()).device
    strategy = make_strategy(deepspeed=deepspeed, ep_size=ep_size,
                             micro_batch_size=getattr(source, "batch_size", None))
    if stages and strategy.name == "deepspeed":
        strategy.on_stage_change()  # raises: DeepSpeed fixes the trainable parameters
    staged = {"stages": tuple(stages)} if stages else {}  # (DeepSpeed refused them above)
    strategy.setup(model, lr=lr, weight_decay=weight_decay, expert_lr_scale=expert_lr_scale,
                   warmup=warmup, steps=steps, min_lr_ratio=min_lr_ratio,
                   grad_accum=grad_accum, clip=clip, betas=betas, eps=eps, schedule=schedule,
                   precision=precision, **staged)
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
    cursor = _Cursor(source, **data_state)
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
                    strategy.on_stage_change()
                    stage_index, stage_name = index, stage.name
            params = [p for p in module.parameters() if p.requires_grad]
            if not params:
                raise ValueError("no trainable parameter (everything is frozen)")
            started = time.perf_counter()
            strategy.zero_grad()
            total, sums, counts = 0.0, {}, {}
            for micro in range(grad_accum):
                last = micro == grad_accum - 1
                batch = cursor.next()
                position = {"epoch": cursor.epoch, "index": cursor.index - 1}
                out = strategy.forward(_to_device(batch, device), last=last)
                _check_loss(out, step=step + 1, micro=micro, grad_accum=grad_accum,
                            position=position)
                loss = _field(out, "loss")
                strategy.backward(loss, grad_accum=grad_accum, last=last)
                total += loss.item() / grad_accum
                for name, value in (_field(out, "losses") or {}).items():
                    sums[name] = sums.get(name, 0.0) + value.item()
                    counts[name] = counts.get(name, 0) + 1
            epoch = cursor.epoch  # of the step's last batch
            grad_norm = strategy.clip(params, clip)
            if grad_norm is not None and not math.isfinite(grad_norm):
                raise NonFiniteLossError(
                    f"non-finite gradient norm ({grad_norm}) at step {step + 1} with finite "
                    f"loss {total}; training stopped before the optimiser step.",
                    step=step + 1, names=["grad_norm"])
            current_lr = strategy.lr()
            strategy.step()
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
