"""Differentiable ``all_to_all_single`` with uneven splits (the token exchange of expert
parallelism).

Rank ``r`` sends rows ``input[sum(in_splits[:s]) : sum(in_splits[:s + 1])]`` to rank ``s`` and
receives ``out_splits[s]`` rows from rank ``s``; the backward pass sends the gradients back
along the same routes (an all-to-all with the splits swapped).  Works with ``gloo`` (CPU) and
``nccl``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor


def _exchange(x: Tensor, out_splits: Sequence[int], in_splits: Sequence[int], group) -> Tensor:
    out = x.new_empty((int(sum(out_splits)), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), list(out_splits), list(in_splits), group=group)
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, out_splits: list[int], in_splits: list[int], group) -> Tensor:
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        return _exchange(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _exchange(grad, ctx.in_splits, ctx.out_splits, ctx.group), None, None, None


def all_to_all(x: Tensor, out_splits: Sequence[int], in_splits: Sequence[int],
               group=None) -> Tensor:
    """Exchange row blocks of ``x (sum(in_splits), ...)`` between the ranks of ``group``.

    Args:
        x: rows to send, grouped by destination rank.
        out_splits: rows received from each rank (``len == group size``).
        in_splits: rows sent to each rank (``len == group size``).
        group: process group (``None``: the default group).

    Returns ``(sum(out_splits), ...)``, grouped by source rank.  Differentiable: the gradient
    of the output returns to the rank each row came from.
    """
    if x.shape[0] != sum(in_splits):
        raise ValueError(f"x has {x.shape[0]} rows but in_splits sum to {sum(in_splits)}")
    return _AllToAll.apply(x, [int(s) for s in out_splits], [int(s) for s in in_splits], group)


def exchange_counts(counts: Tensor, group=None) -> Tensor:
    """All-to-all of a ``(P, ...)`` integer tensor: row ``s`` goes to rank ``s``; returns the
    ``(P, ...)`` rows received (row ``s`` from rank ``s``).  Not differentiable."""
    out = torch.empty_like(counts)
    dist.all_to_all_single(out, counts.contiguous(), group=group)
    return out
