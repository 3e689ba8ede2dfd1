"""Image sizes: the one normaliser of ``int | (H, W)`` used by the encoders, heads and collators."""

from __future__ import annotations

import numbers
from collections.abc import Sequence


def image_hw(size: int | Sequence[int], name: str = "image_size") -> tuple[int, int]:
    """``int`` or ``(H, W)`` -> ``(H, W)`` of positive ints.

    ``ValueError`` naming ``name`` for anything else (a bool, a float, three numbers, zero).
    """
    if isinstance(size, numbers.Integral) and not isinstance(size, bool):
        hw = (int(size), int(size))
    elif (isinstance(size, Sequence) or hasattr(size, "__len__")) and not isinstance(size, str):
        if len(size) != 2 or not all(isinstance(s, numbers.Integral) and not isinstance(s, bool)
                                     for s in size):
            raise ValueError(f"{name} must be an int or (height, width), got {size!r}")
        hw = (int(size[0]), int(size[1]))
    else:
        raise ValueError(f"{name} must be an int or (height, width), got {size!r}")
    if min(hw) < 1:
        raise ValueError(f"{name} must be >= 1, got {size!r}")
    return hw
