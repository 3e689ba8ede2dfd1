"""Value rules, each written once: the config loader and the functions its fields feed call them.

A rule ``check_*(value, name)`` returns the value (normalised: ``betas`` as a tuple of floats)
or raises ``ValueError("<name> must be ..., got <value>")``.  :func:`echomoe.train.train`,
:func:`~echomoe.train.optim.build_optimizer`, :class:`~echomoe.config.schema.Stage` and the
schedules call them with their argument name (``betas``); the loader
(:func:`echomoe.config.validate`) with the dotted field (``train.betas``), and adds the file.
So a YAML value and the same value passed in a notebook are refused by the same rule, with the
same words.  The module imports nothing but the standard library.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

SCHEDULES: tuple[str, ...] = ("cosine", "linear", "constant")
"""Learning-rate schedules after the warmup (:func:`echomoe.train.optim.lr_schedule`)."""

PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16")
"""Values of ``train(precision=...)`` (:func:`echomoe.train.precision.resolve_precision`)."""

MODES: tuple[str, ...] = ("min", "max")
"""Whether a lower or a higher value of the best-checkpoint metric is better."""


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_choice(value: Any, name: str, choices: Sequence[str]) -> str:
    """``value`` when it is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def check_int(value: Any, name: str, low: int = 0) -> int:
    """``value`` when it is an int ``>= low`` (a bool is not an int here)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def check_positive(value: Any, name: str) -> float:
    """``value`` when it is a finite number ``> 0``."""
    if not (_is_number(value) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return value


def check_non_negative(value: Any, name: str) -> float:
    """``value`` when it is a finite number ``>= 0``."""
    if not (_is_number(value) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return value


def check_fraction(value: Any, name: str, closed: bool = True) -> float:
    """``value`` when it is a number in ``[0, 1]`` (``closed=False``: ``[0, 1)``)."""
    ok = _is_number(value) and 0.0 <= value and (value <= 1.0 if closed else value < 1.0)
    if not ok:
        raise ValueError(f"{name} must be a number in [0, 1{']' if closed else ')'}, "
                         f"got {value!r}")
    return value


def check_betas(betas: Any, name: str = "betas") -> tuple[float, float]:
    """``betas`` as a ``(beta1, beta2)`` tuple of floats in ``[0, 1)`` (AdamW's moment decay
    rates)."""
    ok = (isinstance(betas, Sequence) and not isinstance(betas, str) and len(betas) == 2
          and all(_is_number(b) and 0.0 <= b < 1.0 for b in betas))
    if not ok:
        raise ValueError(f"{name} must be two numbers in [0, 1), got {betas!r}")
    return float(betas[0]), float(betas[1])


def check_warmup(warmup: Any, name: str, steps: int, steps_name: str = "steps") -> int:
    """``warmup`` when it is an int in ``[0, steps]``."""
    check_int(warmup, name, 0)
    if warmup > steps:
        raise ValueError(f"{name} ({warmup}) exceeds {steps_name} ({steps})")
    return warmup


def check_stage(name: str, steps: Any, trainable: Any, lr_scale: Any) -> None:
    """The fields of one training stage: ``steps`` an int >= 1 or ``None``, ``trainable`` a
    non-empty sequence of patterns, ``lr_scale`` a finite number > 0 (errors start with
    ``stage '<name>':``)."""
    label = f"stage {name!r}:"
    if steps is not None:
        check_int(steps, f"{label} steps", 1)
    if isinstance(trainable, str) or not isinstance(trainable, Sequence) or not trainable:
        raise ValueError(f"{label} trainable must be a non-empty list of patterns, got "
                         f"{trainable!r}")
    check_positive(lr_scale, f"{label} lr_scale")


def check_stage_plan(stage_steps: Sequence[int | None], name: str, total: int,
                     total_name: str = "steps") -> None:
    """The steps of a whole staged run: only the last stage may run to the end (``None``),
    and the stages cover exactly ``total`` steps (with a last ``None`` stage: fewer, so it
    gets some)."""
    if not stage_steps:
        return
    for i, steps in enumerate(stage_steps[:-1]):
        if steps is None:
            raise ValueError(f"{name}[{i}].steps may be null only in the last stage")
    fixed = sum(s or 0 for s in stage_steps)
    if stage_steps[-1] is None:
        if fixed >= total:
            raise ValueError(f"{name} leave no steps for the last stage ({fixed} >= "
                             f"{total_name} {total})")
    elif fixed != total:
        raise ValueError(f"{name} steps sum to {fixed}, but {total_name} is {total}")
