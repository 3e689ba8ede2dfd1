"""DeepSpeed ZeRO as a training strategy of :func:`echomoe.train.train` (``deepspeed=``).

The loop builds echomoe's own torch AdamW (expert / non-expert and decay / no-decay groups,
DeepSpeed-MoE parameters in ``"moe": True`` groups) and warmup + decay schedule, and
:meth:`DeepSpeed.wrap` hands them to ``deepspeed.initialize``; the config's ``"auto"`` values
are filled from the training arguments.  DeepSpeed clips, updates, steps the schedule and zeroes
the gradients inside ``engine.step()``: the optimizer and scheduler :meth:`DeepSpeed.wrap`
returns (:class:`EngineOptimizer`, :class:`EngineScheduler`) route the loop's
``optimizer.step()`` there, so the loop reads the same for every strategy.
Checkpoints hold the consolidated weights (``model.safetensors``, rank 0) next to DeepSpeed's
own sharded state (``deepspeed/``), so a run resumes with the same number of processes and
its weights load anywhere.  ZeRO-3 works with every echomoe MoE variant
(:func:`~echomoe.distributed.zero.register_moe_parameters_for_zero3`).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from echomoe.distributed.checkpoint import full_state_dict
from echomoe.distributed.expert_parallel import has_expert_parallel_backend
from echomoe.distributed.runtime import init_distributed
from echomoe.distributed.zero import register_moe_parameters_for_zero3
from echomoe.train.checkpoint import load_training_state, read_meta, rng_state, set_rng_state
from echomoe.train.precision import check_precision, resolve_precision
from echomoe.train.strategy import DistributedBase


def deepspeed_precision(config: dict, precision: str, device: torch.device | str) -> str:
    """Reconcile ``train(precision=...)`` with a DeepSpeed ``config`` and return the precision
    the config trains in (``"bf16"``, ``"fp16"`` or ``"fp32"``).

    ``"enabled": "auto"`` in the config's ``bf16`` section becomes ``precision`` resolved on
    ``device`` (:func:`~echomoe.train.precision.resolve_precision`; ``fp16`` ``"auto"``
    becomes off); ``config`` is changed in place.  Then the config governs: ``"auto"`` accepts
    it, an explicit ``"bf16"`` / ``"fp32"`` that disagrees with it raises ``ValueError``.
    """
    wanted = resolve_precision(check_precision(precision), device)
    enabled = {}
    for section in ("bf16", "fp16"):
        value = config.get(section)
        if isinstance(value, Mapping) and value.get("enabled") == "auto":
            value["enabled"] = section == "bf16" and wanted == "bf16"
        enabled[section] = isinstance(value, Mapping) and value.get("enabled") is True
    used = "bf16" if enabled["bf16"] else "fp16" if enabled["fp16"] else "fp32"
    if precision != "auto" and used != precision:
        raise ValueError(
            f"precision={precision!r} conflicts with the DeepSpeed config, which trains in "
            f"{used} (bf16.enabled={enabled['bf16']}, fp16.enabled={enabled['fp16']}). Under "
            "DeepSpeed the config's bf16 section sets the precision: use a matching config "
            "(configs/deepspeed/*_bf16.json for bf16), set \"bf16\": {\"enabled\": \"auto\"} "
            "in it, or pass precision=\"auto\".")
    return used


class EngineOptimizer:
    """The optimizer the loop sees under DeepSpeed: ``step()`` is ``engine.step()`` (clipping,
    the update, the schedule and zeroing included), ``zero_grad()`` does nothing (the engine
    zeroes in its step) and ``param_groups`` are the engine optimiser's (for the rate)."""

    def __init__(self, engine) -> None:
        self.engine = engine

    @property
    def param_groups(self) -> list[dict]:
        """The parameter groups of the engine's optimiser (``lr`` is the rate in force)."""
        return self.engine.optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing: ``engine.step()`` zeroes the gradients."""

    def step(self) -> None:
        """``engine.step()`` at the gradient-accumulation boundary."""
        self.engine.step()


class EngineScheduler:
    """The scheduler the loop sees under DeepSpeed: ``engine.step()`` steps the real one, so
    ``step()`` does nothing."""

    def step(self) -> None:
        """Nothing: the engine steps the schedule."""


class DeepSpeed(DistributedBase):
    """DeepSpeed ZeRO (stage 0-3, bf16) around echomoe's AdamW and schedule.

    Args:
        config: a DeepSpeed config dict or JSON path.  ``"auto"`` values are filled in:
            ``gradient_accumulation_steps`` <- ``grad_accum``, ``gradient_clipping`` <-
            ``clip`` (0 = off), ``train_micro_batch_size_per_gpu`` <- ``micro_batch_size``.
            Its ``optimizer`` / ``scheduler`` sections are refused: echomoe passes its own
            torch AdamW (expert / non-expert groups, no fused-Adam build) and schedule.
        micro_batch_size: the per-rank batch size (DeepSpeed's bookkeeping only).

    **Precision.**  The config's ``bf16`` / ``fp16`` sections set the precision (no
    ``torch.autocast`` is added: DeepSpeed casts the model itself).  ``train(precision=...)``
    must agree with them: ``bf16.enabled: "auto"`` becomes ``precision`` resolved on this
    rank's device (``"auto"``: bf16 on CUDA, fp32 elsewhere); ``precision="auto"`` accepts
    whatever the config says; ``"bf16"`` with a config without bf16 enabled (or ``"fp32"``
    with bf16 / fp16 enabled) is a ``ValueError`` naming both (:func:`deepspeed_precision`).

    Works in one process too (a world of one is initialised).  Expert parallelism is not
    combined with DeepSpeed here: echomoe's experts are replicated (ZeRO partitions their
    optimiser state, gradients and, at stage 3, the weights themselves), so every MoE variant
    trains under ZeRO-3.  For expert parallelism use ``torchrun`` without ``deepspeed=``.
    """

    name = "deepspeed"
    optimizer_options: Mapping[str, Any] = {"trainable_only": True, "moe_groups": True}

    def __init__(self, config: dict | str | os.PathLike, *, micro_batch_size: int | None = None):
        init_distributed(force=True)
        super().__init__()
        if not isinstance(config, Mapping):
            config = json.loads(Path(config).read_text())
        for section in ("optimizer", "scheduler"):
            if section in config:
                raise ValueError(
                    f"remove the {section!r} section from the DeepSpeed config: echomoe passes "
                    "its own torch AdamW (expert / non-expert parameter groups) and warmup-cosine"
                    " schedule (a DeepSpeed-config AdamW would also JIT-compile fused Adam)")
        self.config = json.loads(json.dumps(config))
        self.micro_batch_size = micro_batch_size
        self.engine = None
        self.precision = "fp32"

    def _fill(self, grad_accum: int, clip: float | None, precision: str = "auto") -> dict:
        cfg = self.config
        fill = {"gradient_accumulation_steps": grad_accum,
                "gradient_clipping": float(clip or 0.0),
                "train_micro_batch_size_per_gpu": self.micro_batch_size or 1}
        for key, value in fill.items():
            if cfg.get(key, "auto") == "auto":
                cfg[key] = value
        if cfg["gradient_accumulation_steps"] != grad_accum:
            raise ValueError(f"DeepSpeed gradient_accumulation_steps="
                             f"{cfg['gradient_accumulation_steps']} but grad_accum={grad_accum}; "
                             "set it to \"auto\"")
        if cfg.get("train_batch_size") == "auto":
            del cfg["train_batch_size"]
        self.precision = deepspeed_precision(cfg, precision, self.world.device)
        return cfg

    @property
    def zero_stage(self) -> int:
        """The ZeRO stage of the config (0-3; 0 when it has no ``zero_optimization``)."""
        return int(self.config.get("zero_optimization", {}).get("stage", 0))

    def prepare(self, model: nn.Module, *, precision: str, grad_accum: int,
                clip: float | None, staged: bool = False) -> str:
        """Fill the config and check ``precision`` against it (:attr:`precision` is then the
        precision DeepSpeed trains in); returns ``"fp32"``: no autocast is added, the engine
        casts the model itself."""
        if staged:
            raise ValueError("staged training (train.stages) is not supported with DeepSpeed: "
                             "DeepSpeed fixes the trainable parameters when the engine is "
                             "built. Run one job per stage instead.")
        if has_expert_parallel_backend(model) and self.world.world_size > 1:
            warnings.warn("backend='expert_parallel' under DeepSpeed: the experts stay "
                          "replicated on every rank (ZeRO partitions them); launch without "
                          "deepspeed= for expert parallelism", stacklevel=3)
        self._fill(grad_accum, clip, precision)
        scalars = [n for n, p in model.named_parameters() if p.dim() == 0]
        if scalars:
            raise ValueError(f"DeepSpeed cannot train 0-d parameters ({', '.join(scalars)}): it "
                             "broadcasts and partitions every parameter as a byte view, which "
                             "fails for 0-d tensors. Give them shape (1,).")
        return "fp32"

    def wrap(self, model: nn.Module, optimizer, scheduler) -> tuple[nn.Module, Any, Any]:
        """``deepspeed.initialize`` around ``model``, echomoe's ``optimizer`` (built with
        :attr:`optimizer_options`: trainable parameters only, MoE groups) and ``scheduler``;
        returns ``(engine, EngineOptimizer, EngineScheduler)``."""
        import deepspeed

        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.config)
        self.model = self.engine
        if self.zero_stage == 3:
            register_moe_parameters_for_zero3(model)
        return self.engine, EngineOptimizer(self.engine), EngineScheduler()

    @property
    def module(self) -> nn.Module:
        return self.engine.module

    def on_stage_change(self) -> nn.Module:
        raise ValueError("staged training (train.stages) is not supported with DeepSpeed")

    def backward(self, loss: torch.Tensor, *, grad_accum: int, last: bool) -> None:
        """``engine.backward(loss)`` (0-d ``loss``); before the ``last`` micro-batch also
        ``engine.step()``, which only counts the micro-batch."""
        self.engine.backward(loss)  # divides by gradient_accumulation_steps itself
        if not last:
            self.engine.step()  # counts the micro-batch; no update before the boundary

    def clip_grad_norm(self, params, max_norm) -> None:
        """``None``: DeepSpeed clips inside its step (``gradient_clipping``)."""
        return None

    def grad_norm(self) -> float:
        """The global gradient norm DeepSpeed computed in the last step (NaN when it did
        not)."""
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def _full_state(self) -> dict | None:
        return full_state_dict(self.module, self.engine)

    def _write_training_state(self, tmp: Path) -> None:
        self.engine.save_checkpoint(str(tmp / "deepspeed"), tag="state", save_latest=False)
        torch.save({"rng": rng_state()}, self._state_file(tmp))

    def _read_training_state(self, path: Path) -> None:
        self.engine.load_checkpoint(str(path / "deepspeed"), tag="state")
        set_rng_state(load_training_state(self._state_file(path))["rng"])

    def load(self, path: Path) -> dict:
        """Restore the DeepSpeed state (module, optimiser, schedule) and the RNG of a
        checkpoint written by the same number of processes; returns ``{"step", "data_state",
        "extra", "path"}``."""
        meta = read_meta(path)
        if meta.get("world_size", 1) != self.world.world_size:
            raise ValueError(f"{path} was written by {meta.get('world_size')} processes, "
                             f"this run has {self.world.world_size}")
        self._read_training_state(path)  # module, optimiser and schedule from DeepSpeed
        return {"step": meta["step"], "data_state": meta["data_state"],
                "extra": meta["extra"], "path": path}
