"""Plan a training run: parameters, and per-GPU memory under ZeRO x expert parallelism.

The model is built on the ``meta`` device (no memory, instant even at billions of parameters),
so the counts are those of the real model: :func:`~echomoe.models.builders.count_parameters`
for ``total`` / ``active`` / ``router``, and the routed experts' share (``expert``) for the
memory model below.

Memory per GPU (bytes; ``P_d`` dense parameters, ``P_e`` routed-expert parameters, ``G`` GPUs,
``ep`` the expert-parallel size, each GPU holding ``P_e / ep`` experts' parameters, as DeepSpeed
MoE does):

* per parameter: ``w`` weights, ``g`` gradients, ``o`` optimizer states.  Mixed precision
  (``bf16`` / ``fp16``) with Adam: ``w = 2``, ``g = 2``, ``o = 12`` (fp32 master copy, first and
  second moments); ``fp32``: ``4, 4, 8``;
* dense parameters shard over the data-parallel group of all ``G`` GPUs, expert parameters over
  the expert-data-parallel group of ``G / ep`` GPUs (each holding the same experts);
* ZeRO-0: ``(w + g + o) P``; ZeRO-1: ``(w + g) P + o P / n``; ZeRO-2: ``w P + (g + o) P / n``;
  ZeRO-3: ``(w + g + o) P / n``, with ``(P, n)`` = ``(P_d, G)`` and ``(P_e / ep, G / ep)``.

Activations are an *estimate* (Korthikanti et al., 2022, 16-bit, per decoder layer of hidden
``h``, ``a`` heads, ``s`` tokens, micro-batch ``b``): ``s b h (34 + 5 a s / h)`` bytes without
activation checkpointing, ``2 s b h`` (the layer input) with it; the vision tower, heads and
framework buffers are not included.  The weight / gradient / optimizer figures are exact.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

BYTES = {"bf16": (2, 2, 12), "fp16": (2, 2, 12), "fp32": (4, 4, 8)}  # (w, g, o) per parameter
GIB = 1024 ** 3


def expert_parameters(model: nn.Module) -> int:
    """Parameters of every routed expert bank (``GroupedExperts``) in ``model``."""
    from echomoe.moe.experts import GroupedExperts

    return sum(p.numel() for m in model.modules() if isinstance(m, GroupedExperts)
               for p in m.parameters())


def model_memory(dense: int, expert: int, *, gpus: int = 1, zero: int = 0, ep: int = 1,
                 num_experts: int | None = None, dtype: str = "bf16") -> dict[str, float]:
    """Per-GPU bytes of weights, gradients and optimizer states (the formula above).

    Raises a ``ValueError`` naming the field for ``zero`` not in 0..3, ``gpus < 1``, an ``ep``
    that does not divide ``gpus`` (or ``num_experts``), or an unknown ``dtype``.
    """
    if zero not in (0, 1, 2, 3):
        raise ValueError(f"zero must be 0, 1, 2 or 3, got {zero}")
    if gpus < 1:
        raise ValueError(f"gpus must be >= 1, got {gpus}")
    if ep < 1 or gpus % ep:
        raise ValueError(f"ep={ep} must divide gpus={gpus}")
    if num_experts is not None and num_experts % ep:
        raise ValueError(f"ep={ep} must divide num_experts={num_experts}")
    if dtype not in BYTES:
        raise ValueError(f"dtype must be one of {', '.join(BYTES)}, got {dtype!r}")
    w, g, o = BYTES[dtype]
    figures = {"weights": 0.0, "gradients": 0.0, "optimizer": 0.0}
    for params, group in ((dense, gpus), (expert / ep, gpus // ep)):
        shard = [1.0, 1.0, 1.0]  # fraction of (w, g, o) a GPU keeps
        for stage in range(1, zero + 1):
            shard[3 - stage] = 1.0 / group  # ZeRO-1: o, ZeRO-2: + g, ZeRO-3: + w
        figures["weights"] += w * params * shard[0]
        figures["gradients"] += g * params * shard[1]
        figures["optimizer"] += o * params * shard[2]
    figures["total"] = figures["weights"] + figures["gradients"] + figures["optimizer"]
    return figures


def activation_memory(text_config, *, micro_batch: int, seq_len: int,
                      checkpointing: bool) -> float:
    """Estimated activation bytes of the LM's decoder layers (see the module docstring)."""
    h, a = text_config.hidden_size, text_config.num_attention_heads
    layers = text_config.num_hidden_layers
    per_layer = seq_len * micro_batch * h * (2 if checkpointing else 34 + 5 * a * seq_len / h)
    return float(per_layer * layers)


def plan(config, *, gpus: int = 1, zero: int = 0, ep: int = 1, dtype: str = "bf16",
         micro_batch: int = 1, seq_len: int = 2048, checkpointing: bool = True) -> dict[str, Any]:
    """Parameters and per-GPU memory of training ``config`` (an ``EchoMoEConfig``; weights
    are never read: a ``language_model_path`` or ``backbone`` path counts by its config).

    Returns ``{"parameters": {"total", "active", "router", "expert", "dense",
    "language_model"}, "memory_bytes":
    {...model_memory, "activations_estimate"}, "memory_gib": ..., "setup": {...}}``.
    """
    from echomoe.models.builders import count_parameters
    from echomoe.models.modeling import EchoMoEForConditionalGeneration

    config = copy.deepcopy(config)
    config.language_model_path = None  # structure only: text_config already holds it
    if getattr(config, "backbone", None):
        config.backbone = {**config.backbone, "path": None}  # its "config" holds the structure
    with torch.device("meta"):
        model = EchoMoEForConditionalGeneration(config)
    counts = count_parameters(model)
    expert = expert_parameters(model)
    moe = config.moe_config or {}
    memory = model_memory(counts["total"] - expert, expert, gpus=gpus, zero=zero, ep=ep,
                          num_experts=moe.get("num_experts"), dtype=dtype)
    memory["activations_estimate"] = activation_memory(
        config.text_config, micro_batch=micro_batch, seq_len=seq_len, checkpointing=checkpointing)
    return {
        "parameters": {**counts, "expert": expert, "dense": counts["total"] - expert,
                       "language_model": sum(p.numel() for p in
                                             model.language_model.parameters())},
        "memory_bytes": memory,
        "memory_gib": {k: round(v / GIB, 3) for k, v in memory.items()},
        "setup": {"gpus": gpus, "zero": zero, "ep": ep, "dtype": dtype,
                  "micro_batch": micro_batch, "seq_len": seq_len,
                  "checkpointing": checkpointing},
    }
