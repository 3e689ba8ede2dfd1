"""The precision of a training forward: fp32, or bf16 autocast around forward + loss.

``precision="bf16"`` runs each training forward (and the loss inside it) under
``torch.autocast(device_type, dtype=torch.bfloat16)``; the weights, gradients and optimiser
state stay fp32 and backward runs outside autocast.  ``"auto"`` is bf16 on CUDA and fp32
elsewhere (bf16 autocast is slower than fp32 on CPU).  Under DeepSpeed the config's ``bf16``
section sets the precision instead (:func:`echomoe.train.deepspeed.deepspeed_precision`).
"""

from __future__ import annotations

import contextlib

import torch

from echomoe.config.rules import PRECISIONS, check_choice


def check_precision(precision: str) -> str:
    """``precision`` when it is one of :data:`~echomoe.config.rules.PRECISIONS`, else a
    ``ValueError`` naming it."""
    return check_choice(precision, "precision", PRECISIONS)


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``"fp32"`` or ``"bf16"``: ``"auto"`` is bf16 on a CUDA ``device`` and fp32 elsewhere;
    the others pass through."""
    check_precision(precision)
    if precision == "auto":
        return "bf16" if torch.device(device).type == "cuda" else "fp32"
    return precision


def autocast(precision: str, device: torch.device | str):
    """The context of a training forward: ``torch.autocast(device.type, torch.bfloat16)`` for
    ``"bf16"``, a no-op for ``"fp32"`` (``precision`` already resolved)."""
    if precision == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
