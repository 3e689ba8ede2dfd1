"""How :func:`echomoe.train.train` spreads a step over processes: one process, DDP, DeepSpeed.

The loop owns the step (optimiser, schedule, autocast, clipping); a strategy only

* prepares the model (expert sharding) and wraps it with its optimiser and schedule
  (:meth:`Local.wrap`, like ``deepspeed.initialize``),
* runs backward (``no_sync`` between micro-batches, expert-gradient reduction),
* measures the gradient norm over all ranks,
* shards the batch source, reduces the logged losses and saves / loads checkpoints.

:func:`~echomoe.train.loop.make_strategy` picks one (``train()`` calls it; users never
need to):

=================== =========================================================================
:class:`Local`      one process (the default): the plain single-process step
:class:`DDP`        ``torchrun`` without DeepSpeed: ``DistributedDataParallel`` for the shared
                    parameters, optional expert parallelism for the experts
:class:`~echomoe.train.deepspeed.DeepSpeed`
                    a DeepSpeed JSON (``deepspeed=``): ZeRO-1/2/3, bf16 (one or more processes)
=================== =========================================================================

**Equivalence.**  With ``P`` data-parallel ranks each rank reads its shard of the global batch
(:class:`~echomoe.distributed.data.ShardedBatches`); gradients are averaged over ranks, so a
``P``-process step equals a one-process step with ``P x grad_accum`` micro-batches (same
losses, same update, up to float summation order).  Logged losses are averaged over ranks.

**Expert parallelism (DDP).**  Sharded expert parameters are excluded from DDP's all-reduce;
their gradient (already summed over the expert-parallel group by the all-to-all backward) is
divided by the world size and all-reduced only across ranks holding the same experts.  The
clipping norm adds the expert shards' squared norms over the expert-parallel group, so it is
the norm of the whole model's gradient.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from echomoe.distributed.checkpoint import full_state_dict, load_consolidated, write_safetensors
from echomoe.distributed.data import ShardedBatches
from echomoe.distributed.expert_parallel import (
    expert_parallel_layers,
    expert_parallel_params,
    has_expert_parallel_backend,
    shard_experts,
)
from echomoe.distributed.runtime import (
    barrier,
    broadcast_object,
    is_distributed,
    world_info,
)
from echomoe.train.checkpoint import (
    CHECKPOINT_FORMAT,
    META_FILE,
    MODEL_FILE,
    STATE_FILE,
    load_checkpoint,
    load_training_state,
    read_meta,
    rng_state,
    save_checkpoint,
    set_rng_state,
    swap_in_dir,
)
from echomoe.train.optim import clip_gradients
from echomoe.train.precision import resolve_precision


class Local:
    """One process: the model as it is, ``clip_grad_norm_``, checkpoints via
    :mod:`echomoe.train.checkpoint`."""

    name = "local"
    distributed = False
    optimizer_options: Mapping[str, Any] = {}
    """Extra arguments of :func:`~echomoe.train.optim.build_optimizer` this strategy needs."""

    def __init__(self) -> None:
        self.world = world_info()
        self.model: nn.Module | None = None
        self.optimizer = self.scheduler = None

    # -- set-up -------------------------------------------------------------------------
    def prepare(self, model: nn.Module, *, precision: str, grad_accum: int,
                clip: float | None, staged: bool = False) -> str:
        """Get ``model`` ready before its optimiser is built (e.g. shard its experts) and
        return the precision of the training forward's autocast (``"fp32"`` / ``"bf16"``,
        ``precision`` resolved on the model's device)."""
        return resolve_precision(precision, next(model.parameters()).device)

    def wrap(self, model: nn.Module, optimizer, scheduler) -> tuple[nn.Module, Any, Any]:
        """``(model to call in training, optimizer, scheduler)``: here the three unchanged."""
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        return model, optimizer, scheduler

    @property
    def module(self) -> nn.Module:
        """The plain model (for evaluation and saving)."""
        return self.model

    def shard(self, source):
        """This rank's view of the batch source."""
        return source

    def on_stage_change(self) -> nn.Module:
        """Called after the trainable parameters changed; returns the model to call."""
        return self.model

    # -- a step -------------------------------------------------------------------------
    def no_sync(self, last: bool):
        """The context of one micro-batch's forward + backward (``last``: the step's last)."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, *, grad_accum: int, last: bool) -> None:
        """Accumulate the gradient of ``loss / grad_accum`` (``loss`` 0-d, outside autocast)."""
        (loss / grad_accum).backward()

    def clip_grad_norm(self, params: list[nn.Parameter], max_norm: float | None) -> float | None:
        """Clip and return the norm before clipping (``None``: known only after the optimiser
        step, see :meth:`grad_norm`)."""
        return clip_gradients(params, max_norm)

    def grad_norm(self) -> float:
        """The gradient norm of the last step when :meth:`clip_grad_norm` could not give it
        (never the case here: raises)."""
        raise RuntimeError("the local strategy reports the norm from clip_grad_norm()")

    def reduce_record(self, total: float, sums: dict, counts: dict) -> tuple[float, dict]:
        """``(loss, {name: mean})`` over the step's micro-batches (of all ranks)."""
        return total, {k: sums[k] / counts[k] for k in sums}

    def any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any rank (e.g. a SIGTERM reached one of them)."""
        return flag

    # -- checkpoints --------------------------------------------------------------------
    def save(self, path: Path, *, step: int, data_state: dict, extra: dict,
             weights_only: bool = False) -> Path:
        """Write a checkpoint at ``path`` (model, and unless ``weights_only`` optimiser,
        scheduler and RNG state; ``data_state`` and ``extra`` go to ``meta.json``); returns
        ``path``."""
        if weights_only:
            return save_checkpoint(path, self.model, step=step, data_state=data_state,
                                   extra=extra)
        return save_checkpoint(path, self.model, self.optimizer, self.scheduler, step=step,
                               data_state=data_state, extra=extra)

    def load(self, path: Path) -> dict:
        """Restore the checkpoint at ``path`` into the model, optimiser and scheduler; returns
        ``{"step", "data_state", "extra", "path"}``."""
        saved_world = read_meta(path).get("world_size", 1)
        if saved_world != 1:
            raise ValueError(f"{path} was written by {saved_world} processes; resume it with "
                             f"`torchrun --nproc_per_node {saved_world}` (its model.safetensors "
                             "holds the full weights for a new run)")
        return load_checkpoint(path, self.model, self.optimizer, self.scheduler)


class DistributedBase(Local):
    """Shared parts of the multi-process strategies: sharded data, reduced logs, collective
    checkpoints (rank 0 writes the consolidated weights and ``meta.json``; every rank writes its
    own training state)."""

    distributed = True

    def shard(self, source):
        if self.world.world_size == 1:
            return source
        return ShardedBatches(source, rank=self.world.rank, world_size=self.world.world_size)

    def reduce_record(self, total: float, sums: dict, counts: dict) -> tuple[float, dict]:
        if self.world.world_size == 1:
            return super().reduce_record(total, sums, counts)
        names = sorted(set().union(*[set(s) for s in _all_gather_object(list(sums))]))
        t = torch.tensor([total] + [sums.get(n, 0.0) for n in names]
                         + [float(counts.get(n, 0)) for n in names], dtype=torch.float64)
        dist.all_reduce(t)
        k = len(names)
        means = {n: float(t[1 + i] / t[1 + k + i]) for i, n in enumerate(names)}
        return float(t[0]) / self.world.world_size, means

    def any_rank(self, flag: bool) -> bool:
        if self.world.world_size == 1:
            return flag
        t = torch.tensor([int(flag)])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def _state_file(self, path: Path) -> Path:
        r = self.world.rank
        return path / (STATE_FILE if r == 0 else STATE_FILE.replace(".pt", f"_rank{r}.pt"))

    def _write_training_state(self, tmp: Path) -> None:
        torch.save({"optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(), "rng": rng_state()},
                   self._state_file(tmp))

    def _read_training_state(self, path: Path) -> None:
        state = load_training_state(self._state_file(path))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])

    def _full_state(self) -> dict | None:
        return full_state_dict(self.module)

    def save(self, path: Path, *, step: int, data_state: dict, extra: dict,
             weights_only: bool = False) -> Path:
        """Collective checkpoint at ``path``: rank 0 writes the consolidated
        ``model.safetensors`` and ``meta.json``, each rank its training state (unless
        ``weights_only``); every rank must call it.  Returns ``path``."""
        path = Path(path)
        token = broadcast_object(f"{os.getpid()}-{uuid.uuid4().hex[:8]}")
        tmp = path.parent / f".{path.name}.tmp-{token}"
        if self.world.is_main:
            tmp.mkdir(parents=True)
        barrier()
        if not weights_only:
            self._write_training_state(tmp)
        state = self._full_state()  # collective
        if self.world.is_main:
            write_safetensors(state, tmp / MODEL_FILE)
            meta = {"format": CHECKPOINT_FORMAT, "step": int(step), "data_state": data_state,
                    "extra": extra, "world_size": self.world.world_size,
                    "strategy": self.name}
            (tmp / META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True))
        barrier()
        if self.world.is_main:
            swap_in_dir(tmp, path, token)
        barrier()
        return path

    def load(self, path: Path) -> dict:
        """Restore a checkpoint written by the same number of processes (every rank calls it);
        returns ``{"step", "data_state", "extra", "path"}``."""
        meta = read_meta(path)
        saved_world = meta.get("world_size", 1)
        if saved_world != self.world.world_size:
            raise ValueError(f"{path} was written by {saved_world} processes; resuming its "
                             f"optimiser state needs the same number, got "
                             f"{self.world.world_size}. Its model.safetensors holds the full "
                             "weights: start a new run from them instead.")
        load_consolidated(self.module, path / MODEL_FILE)
        self._read_training_state(path)
        return {"step": meta["step"], "data_state": meta["data_state"],
                "extra": meta["extra"], "path": path}


def _all_gather_object(obj) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class DDP(DistributedBase):
    """``torchrun`` data parallelism with ``torch.nn.parallel.DistributedDataParallel``.

    Args:
        ep_size: expert parallelism over this many ranks; ``None`` shards the expert banks
            built with ``backend="expert_parallel"`` over the whole world (and nothing else);
            ``1`` disables it.
        find_unused_parameters: DDP's flag (``True``: a batch without e.g. segmentation samples
            leaves the mask decoder without gradient).
    """

    name = "ddp"

    def __init__(self, ep_size: int | None = None, *, find_unused_parameters: bool = True):
        super().__init__()
        if not is_distributed():
            raise RuntimeError("the DDP strategy needs torch.distributed with more than one "
                               "process: launch with `torchrun --nproc_per_node N`")
        self.ep_size = ep_size
        self.find_unused_parameters = find_unused_parameters
        self.ddp = None
        self.expert_params: list[nn.Parameter] = []
        self.groups = None

    def prepare(self, model: nn.Module, *, precision: str, grad_accum: int,
                clip: float | None, staged: bool = False) -> str:
        """Shard the experts over the expert-parallel group (see the class docstring) before
        the optimiser is built; returns the autocast precision."""
        marked = has_expert_parallel_backend(model)
        if self.ep_size is not None and self.ep_size > 1:
            shard_experts(model, self.ep_size, only_marked=False)
        elif self.ep_size is None and marked:
            shard_experts(model, None, only_marked=True)
        self.expert_params = list(expert_parallel_params(model).values())
        layers = list(expert_parallel_layers(model).values())
        self.groups = layers[0].groups if layers else None
        return super().prepare(model, precision=precision, grad_accum=grad_accum, clip=clip)

    def wrap(self, model: nn.Module, optimizer, scheduler) -> tuple[nn.Module, Any, Any]:
        """``(DistributedDataParallel(model), optimizer, scheduler)``."""
        super().wrap(model, optimizer, scheduler)
        return self._wrap(), optimizer, scheduler

    def _wrap(self) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        names = list(expert_parallel_params(self.model))
        if names:
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self.model,
                                                                                names)
        device_ids = [self.world.local_rank] if self.world.device.type == "cuda" else None
        # buffers (rotary tables, ...) are identical on every rank: no per-forward broadcast
        params = inspect.signature(DistributedDataParallel).parameters
        no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in params
                   else {"broadcast_buffers": False})
        self.ddp = DistributedDataParallel(
            self.model, device_ids=device_ids,
            find_unused_parameters=self.find_unused_parameters, **no_sync)
        return self.ddp

    def on_stage_change(self) -> nn.Module:
        return self._wrap()  # DDP registers its hooks for the parameters trainable at wrapping

    def no_sync(self, last: bool):
        """DDP's ``no_sync()`` before the ``last`` micro-batch: its gradients are all-reduced
        only once, in the last backward."""
        return contextlib.nullcontext() if last else self.ddp.no_sync()

    def backward(self, loss: torch.Tensor, *, grad_accum: int, last: bool) -> None:
        """Backward of ``loss / grad_accum`` (0-d); on the ``last`` micro-batch the expert-
        parallel gradients are divided by the world size and all-reduced over the ranks that
        hold the same experts."""
        (loss / grad_accum).backward()
        if last and self.expert_params:
            world = self.world.world_size
            for p in self.expert_params:
                if p.grad is None:
                    continue
                p.grad.div_(world)
                if self.groups.expert_dp_size > 1:
                    dist.all_reduce(p.grad, group=self.groups.expert_dp_group)

    def clip_grad_norm(self, params: list[nn.Parameter], max_norm: float | None) -> float | None:
        """The norm of the whole model's gradient (expert shards summed over the expert-
        parallel group), clipped to ``max_norm``."""
        if not self.expert_params:
            return super().clip_grad_norm(params, max_norm)
        expert_ids = {id(p) for p in self.expert_params}
        grads = [p.grad for p in params if p.grad is not None]
        dense = [p.grad for p in params if p.grad is not None and id(p) not in expert_ids]
        local = [p.grad for p in params if p.grad is not None and id(p) in expert_ids]
        sq = torch.zeros((), dtype=torch.float64, device=self.world.device)
        for g in local:  # expert shards: disjoint within the EP group, summed over it
            sq += g.detach().double().pow(2).sum()
        dist.all_reduce(sq, group=self.groups.ep_group)  # every rank, even without gradients
        for g in dense:  # replicated (already averaged by DDP): counted once
            sq += g.detach().double().pow(2).sum()
        norm = float(sq.sqrt())
        if max_norm and norm == norm:
            coef = min(1.0, float(max_norm) / (norm + 1e-6))
            if coef < 1.0:
                for g in grads:
                    g.mul_(coef)
        return norm
