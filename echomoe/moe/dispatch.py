"""Sorted, grouped-GEMM dispatch of tokens to experts.

The ``grouped_mm`` backend sorts the ``N * k`` (token, expert) assignments by expert, runs one
grouped GEMM per projection over the jagged groups, and un-permutes the results back to
``(N, k, D)`` to sum them.  Three small autograd functions keep it lean:

* :class:`_DispatchRows` gathers token rows into expert order; its backward un-permutes the
  gradient and sums the ``k`` copies (a permutation gather plus a reduction, instead of the
  scatter-add that autograd would use for a duplicated index).
* :class:`_GroupedLinear` wraps ``torch.nn.functional.grouped_mm``.  Its backward issues one
  grouped GEMM for the input gradient and one for the weight gradient; it also makes the
  incoming gradient contiguous (an expanded, stride-0 gradient makes the built-in backward fail)
  and pads unaligned sizes (grouped GEMM needs inner dimensions that are multiples of 16 bytes).
* :class:`_SwiGLU` computes ``silu(gate) * up`` from the fused ``[gate | up]`` projection and
  writes both halves of its gradient into one buffer.

Axis legend: ``N`` tokens, ``k`` experts per token, ``S = N * k`` assignments, ``D`` hidden size,
``F`` expert width, ``E`` experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

_ALIGN_BYTES = 16


class _DispatchRows(torch.autograd.Function):
    """``x[src]`` where ``src = order // k``; backward sums the ``k`` copies of each token."""

    @staticmethod
    def forward(ctx, x: Tensor, src: Tensor, inverse: Tensor, k: int) -> Tensor:
        ctx.save_for_backward(inverse)
        ctx.k = k
        return x.index_select(0, src)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (inverse,) = ctx.saved_tensors
        grad = grad.index_select(0, inverse)  # back to (token, slot) order
        return grad.view(-1, ctx.k, grad.shape[-1]).sum(dim=1), None, None, None


class _PermuteRows(torch.autograd.Function):
    """``x[index]`` for a permutation ``index`` whose inverse is ``inverse``."""

    @staticmethod
    def forward(ctx, x: Tensor, index: Tensor, inverse: Tensor) -> Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


class _GroupedLinear(torch.autograd.Function):
    """``y[rows of group e] = x[rows of group e] @ weight[e].T`` for ``weight (E, out, in)``."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, offsets: Tensor) -> Tensor:
        ctx.save_for_backward(x, weight, offsets)
        return F.grouped_mm(x, weight.transpose(1, 2), offs=offsets)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight, offsets = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = F.grouped_mm(grad, weight, offs=offsets)  # (S, in)
        if ctx.needs_input_grad[1]:
            grad_w = F.grouped_mm(grad.t(), x, offs=offsets)  # (E, out, in); empty groups -> 0
        return grad_x, grad_w, None


class _SwiGLU(torch.autograd.Function):
    """``silu(h[:, :F]) * h[:, F:]`` with a single-buffer backward."""

    @staticmethod
    def forward(ctx, h: Tensor) -> Tensor:
        gate, up = h.chunk(2, dim=-1)
        ctx.save_for_backward(h)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: Tensor):
        (h,) = ctx.saved_tensors
        gate, up = h.chunk(2, dim=-1)
        sig = torch.sigmoid(gate)
        out = torch.empty_like(h)
        d_gate, d_up = out.chunk(2, dim=-1)
        torch.mul(gate, sig, out=d_up)
        d_up.mul_(grad)  # d/d_up = silu(gate)
        torch.mul(gate, 1.0 - sig, out=d_gate)
        d_gate.add_(1.0).mul_(sig).mul_(up).mul_(grad)  # silu'(g) = s * (1 + g * (1 - s))
        return out


def swiglu(h: Tensor) -> Tensor:
    """``silu(gate) * up`` for a fused ``(..., 2F)`` projection ``[gate | up]``."""
    return _SwiGLU.apply(h)


def gated_activation(h: Tensor, activation: str) -> Tensor:
    """Apply a gated (``swiglu``/``geglu``) or plain (``gelu``/``relu``/``silu``) activation."""
    if activation == "swiglu":
        return swiglu(h)
    if activation == "geglu":
        gate, up = h.chunk(2, dim=-1)
        return F.gelu(gate) * up
    if activation == "gelu":
        return F.gelu(h)
    if activation == "relu":
        return F.relu(h)
    return F.silu(h)


def _pad_multiple(size: int, multiple: int) -> int:
    return -size % multiple


def grouped_linear(x: Tensor, weight: Tensor, offsets: Tensor, out_groups: int = 1) -> Tensor:
    """Grouped ``x @ weight[e].T`` over row groups ending at ``offsets`` (int32, ``(E,)``).

    Handles grouped GEMM's alignment rule (row strides must be multiples of 16 bytes) by
    zero-padding the inner and output dimensions, and its empty-input case.  ``out_groups``
    says how many equal blocks the output dimension is made of (2 for a fused ``[gate | up]``
    weight), so padding keeps the blocks aligned with each other.

    Args:
        x: ``(S, in)`` rows sorted by group.
        weight: ``(E, out, in)``.
        offsets: ``(E,)`` cumulative row counts; ``offsets[-1] == S``.

    Returns ``(S, out)``.
    """
    num_rows, n_in = x.shape
    num_groups, n_out, _ = weight.shape
    if num_rows == 0:
        return x.new_zeros(0, n_out) + 0.0 * weight.sum()
    multiple = max(1, _ALIGN_BYTES // x.element_size())
    block = n_out // out_groups
    pad_in, pad_block = _pad_multiple(n_in, multiple), _pad_multiple(block, multiple)
    if pad_in == 0 and pad_block == 0:
        return _GroupedLinear.apply(x.contiguous(), weight, offsets)
    x = F.pad(x, (0, pad_in))
    w = weight.view(num_groups, out_groups, block, n_in)
    w = F.pad(w, (0, pad_in, 0, pad_block)).view(num_groups, out_groups * (block + pad_block), -1)
    y = _GroupedLinear.apply(x, w, offsets)
    return y.view(num_rows, out_groups, block + pad_block)[..., :block].reshape(num_rows, n_out)


def sort_assignments(expert_ids: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """Order ``(N, k)`` assignments by expert.

    Returns ``(order, inverse, offsets)``: ``order (S,)`` lists flat assignment indices sorted by
    expert (stable, so token order is kept within an expert), ``inverse`` is its inverse
    permutation, and ``offsets (E,)`` int32 are the cumulative group sizes.  Dropped
    assignments (``-1``) sort last, after ``offsets[-1]``.
    """
    flat = expert_ids.reshape(-1)
    flat = torch.where(flat < 0, num_experts, flat)
    order = flat.argsort(stable=True)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    counts = torch.bincount(flat, minlength=num_experts + 1)[:num_experts]
    return order, inverse, counts.cumsum(0).to(torch.int32)


def grouped_experts_forward(
    x: Tensor,
    expert_ids: Tensor,
    weights: Tensor,
    w_in: Tensor,
    w_out: Tensor,
    b_in: Tensor | None,
    b_out: Tensor | None,
    activation: str,
    linear=grouped_linear,
) -> Tensor:
    """Run ``N`` tokens through their ``k`` experts with grouped GEMMs and combine.

    Args:
        x: ``(N, D)`` tokens.
        expert_ids: ``(N, k)`` int64 expert per slot, ``-1`` = dropped.
        weights: ``(N, k)`` combine weights.
        w_in: ``(E, 2F, D)`` for gated activations (``[gate | up]``), ``(E, F, D)`` otherwise.
        w_out: ``(E, D, F)``.
        b_in, b_out: optional ``(E, 2F | F)`` and ``(E, D)`` biases.
        activation: see :func:`gated_activation`.
        linear: the grouped GEMM ``(x, weight, offsets, out_groups) -> y`` (default
            :func:`grouped_linear`; the megablocks backend passes its own kernel).

    Returns ``(N, D)``: ``sum_j weights[n, j] * expert_{ids[n, j]}(x[n])``.
    """
    num_tokens, top_k = expert_ids.shape
    num_experts, hidden = w_out.shape[0], w_out.shape[1]
    gated = activation in ("swiglu", "geglu")
    order, inverse, offsets = sort_assignments(expert_ids, num_experts)
    num_kept = int(offsets[-1]) if expert_ids.numel() else 0
    num_assign = order.numel()
    if num_kept < num_assign:  # capacity drops: compute the kept rows only
        order_kept = order[:num_kept]
    else:
        order_kept = order
    xs = _DispatchRows.apply(x, order_kept // top_k, inverse, top_k) if num_kept == num_assign \
        else x.index_select(0, order_kept // top_k)
    h = linear(xs, w_in, offsets, 2 if gated else 1)
    group_of_row = None
    if b_in is not None or b_out is not None:
        group_of_row = expert_ids.reshape(-1).index_select(0, order_kept)
    if b_in is not None:
        h = h + b_in.index_select(0, group_of_row)
    a = gated_activation(h, activation)
    row_weight = weights.reshape(-1).index_select(0, order_kept).unsqueeze(-1)
    # Apply the combine weight on the narrower side of the down projection.
    fold = b_out is None and a.shape[-1] <= hidden
    if fold:
        a = a * row_weight
    y = linear(a, w_out, offsets, 1)
    if b_out is not None:
        y = y + b_out.index_select(0, group_of_row)
    if not fold:
        y = y * row_weight
    if num_kept < num_assign:
        y = torch.cat([y, y.new_zeros(num_assign - num_kept, hidden)])
    out = _PermuteRows.apply(y, inverse, order)  # (S, D) back in (token, slot) order
    return out.view(num_tokens, top_k, hidden).sum(dim=1)
