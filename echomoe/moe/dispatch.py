"""Sorted, grouped-GEMM dispatch of tokens to experts.

The ``grouped_mm`` backend sorts the ``N * k`` (token, expert) assignments by expert, gathers
the token rows in that order (``index_select``), runs one grouped GEMM per projection over the
jagged groups, and sums each token's rows back with ``index_add`` (no ``(S, D)`` un-permuted
copy; the backward of each is the other).  Two small autograd functions keep it lean:

* :class:`_GroupedLinear` wraps ``torch.nn.functional.grouped_mm``.  Its backward issues one
  grouped GEMM for the input gradient and one for the weight gradient; it also makes the
  incoming gradient contiguous (an expanded, stride-0 gradient makes the built-in backward fail)
  and pads unaligned sizes (grouped GEMM needs inner dimensions that are multiples of 16 bytes).
* :class:`_SwiGLU` computes ``silu(gate) * up`` from the fused ``[gate | up]`` projection and
  writes both halves of its gradient into one buffer.

A handful of tokens (a decoding step: one token per sequence) takes a lean path on the CPU
(:func:`few_tokens_forward`): the same sort and grouped GEMMs without the chunking and padding
bookkeeping, or, when practically every expert is hit anyway, every expert on every token with
zero combine weight where a token did not pick it (no sort, no scatter, no host sync).

Axis legend: ``N`` tokens, ``k`` experts per token, ``S = N * k`` assignments, ``D`` hidden size,
``F`` expert width, ``E`` experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

_ALIGN_BYTES = 16


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
        act = F.silu(gate)
        ctx.save_for_backward(h, act)  # like a dense SwiGLU's autograd: no recomputation
        return act * up

    @staticmethod
    def backward(ctx, grad: Tensor):
        h, act = ctx.saved_tensors
        gate, up = h.chunk(2, dim=-1)
        out = torch.empty_like(h)
        d_gate, d_up = out.chunk(2, dim=-1)
        torch.mul(act, grad, out=d_up)  # d/d_up = silu(gate)
        torch.mul(grad, up, out=d_gate)
        # d/d_gate = grad * up * silu'(gate), in one fused kernel
        torch.ops.aten.silu_backward.grad_input(d_gate, gate, grad_input=d_gate)
        return out


def swiglu(h: Tensor) -> Tensor:
    """``silu(gate) * up`` for a fused ``(..., 2F)`` projection ``[gate | up]``."""
    if torch.is_grad_enabled() and h.requires_grad:
        return _SwiGLU.apply(h)
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate).mul_(up)


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


def sort_assignments(expert_ids: Tensor, num_experts: int) -> tuple[Tensor, Tensor]:
    """Order ``(N, k)`` assignments by expert.

    Returns ``(order, offsets)``: ``order (S,)`` lists flat assignment indices sorted by expert
    (stable, so tokens stay in order within an expert) and ``offsets (E,)`` int32 are the
    cumulative group sizes.  Dropped assignments (``-1``) sort last, after ``offsets[-1]``.
    """
    flat = expert_ids.reshape(-1)
    flat = torch.where(flat < 0, num_experts, flat)
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=num_experts + 1)[:num_experts]
    return order, counts.cumsum(0).to(torch.int32)


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
    if linear is grouped_linear and use_few_tokens_path(x, expert_ids, w_in, w_out, b_in, b_out):
        return few_tokens_forward(x, expert_ids, weights, w_in, w_out, activation)
    num_tokens, top_k = expert_ids.shape
    num_experts, hidden = w_out.shape[0], w_out.shape[1]
    order, offsets = sort_assignments(expert_ids, num_experts)
    num_kept = int(offsets[-1]) if num_experts else 0
    if num_kept < order.numel():  # capacity drops: compute the kept rows only
        order = order[:num_kept]
    token = order // top_k  # (S,) source token of each sorted row
    row_weight = weights.reshape(-1).index_select(0, order).unsqueeze(-1)
    group_of_row = None
    if b_in is not None or b_out is not None:
        group_of_row = expert_ids.reshape(-1).index_select(0, order)
    out = x.new_zeros(num_tokens, hidden)
    row_bytes = max(w_in.shape[1], hidden) * x.element_size()
    chunks = list(_chunks(offsets, row_bytes, x.device))
    # One split (not a slice per chunk): its backward concatenates the chunks' weight grads once.
    # A single chunk uses the weights as they are (no split, no concatenation).
    sizes = [e.stop - e.start for e, _ in chunks]
    w_in_parts = w_in.split(sizes) if len(sizes) > 1 else (w_in,)
    w_out_parts = w_out.split(sizes) if len(sizes) > 1 else (w_out,)
    for (experts, rows), w1, w2 in zip(chunks, w_in_parts, w_out_parts, strict=True):
        tok = token[rows]
        y = _expert_rows(
            x.index_select(0, tok),
            w1,
            w2,
            offsets[experts] - rows.start,
            None if b_in is None else b_in.index_select(0, group_of_row[rows]),
            None if b_out is None else b_out.index_select(0, group_of_row[rows]),
            row_weight[rows],
            activation,
            linear,
        )
        out = out.index_add(0, tok, y.to(x.dtype))
    return out


# Above this many bytes for one intermediate, CPU allocations go to fresh mmap'd pages (glibc's
# largest mmap threshold is 32 MiB) and page faults dominate; chunks stay below it.
_CPU_CHUNK_BYTES = 16 * 2**20


def _chunks(offsets: Tensor, row_bytes: int, device: torch.device):
    """Split experts into consecutive chunks whose rows fit in :data:`_CPU_CHUNK_BYTES`.

    Yields ``(expert_slice, row_slice)``.  On accelerators, one chunk (no host sync).
    """
    num_experts = offsets.shape[0]
    if device.type != "cpu":
        yield slice(0, num_experts), slice(0, None)
        return
    ends = offsets.tolist()
    max_rows = max(1, _CPU_CHUNK_BYTES // row_bytes)
    first, start = 0, 0
    for e in range(num_experts):
        last = e == num_experts - 1
        if last or ends[e + 1] - start > max_rows:
            yield slice(first, e + 1), slice(start, ends[e])
            first, start = e + 1, ends[e]


def _expert_rows(xs, w_in, w_out, offsets, b_in, b_out, row_weight, activation, linear):
    """Expert MLPs on rows sorted by expert: ``(S_c, D) -> (S_c, D)``, weighted."""
    hidden = w_out.shape[1]
    h = linear(xs, w_in, offsets, 2 if activation in ("swiglu", "geglu") else 1)
    if b_in is not None:
        h = h + b_in
    a = gated_activation(h, activation)
    # Apply the combine weight on the narrower side of the down projection.
    fold = b_out is None and a.shape[-1] <= hidden
    if fold:
        a = a * row_weight
    y = linear(a, w_out, offsets, 1)
    if b_out is not None:
        y = y + b_out
    return y if fold else y * row_weight


# At most this many (token, expert) assignments take the few-token path on the CPU: a decoding
# step of a batch of up to 64 sequences with top-2 routing, or 16 with top-8.
FEW_TOKENS_MAX_ASSIGNMENTS = 128


def use_few_tokens_path(
    x: Tensor, expert_ids: Tensor, w_in: Tensor, w_out: Tensor, b_in: Tensor | None,
    b_out: Tensor | None,
) -> bool:
    """Whether :func:`grouped_experts_forward` hands this call to :func:`few_tokens_forward`.

    CPU tensors, at most :data:`FEW_TOKENS_MAX_ASSIGNMENTS` assignments, no biases, and sizes
    grouped GEMM takes without padding (hidden and expert widths multiples of 16 bytes).
    """
    if x.device.type != "cpu" or not 0 < expert_ids.numel() <= FEW_TOKENS_MAX_ASSIGNMENTS:
        return False
    if b_in is not None or b_out is not None:
        return False
    multiple = max(1, _ALIGN_BYTES // x.element_size())
    return w_out.shape[1] % multiple == 0 and w_out.shape[2] % multiple == 0


def _aligned_linear(x: Tensor, weight: Tensor, offsets: Tensor, out_groups: int = 1) -> Tensor:
    return _GroupedLinear.apply(x.contiguous(), weight, offsets)


def few_tokens_forward(
    x: Tensor, expert_ids: Tensor, weights: Tensor, w_in: Tensor, w_out: Tensor, activation: str
) -> Tensor:
    """:func:`grouped_experts_forward` for a handful of tokens: same result, less overhead.

    One sort of the ``S = N * k`` assignments, one grouped GEMM per projection over the experts
    that received tokens (each weight read once), the combine weight folded in on the narrower
    side of the down projection, and one ``index_add``; differentiable.  Sizes must be aligned
    (see :func:`use_few_tokens_path`); biases are not supported.

    With SwiGLU experts and at least two assignments per expert on average (``S >= 2 E``, so
    that practically every expert is hit and every expert's weights are read anyway), it runs
    every expert on every token instead (one GEMM over the fused ``gate_up_proj``, one batched
    GEMM over ``down_proj``) and combines with zero weight where a token did not pick an
    expert: no sort, no gather, no scatter, no host sync.  A decoding step is bound by reading
    the weights, so the extra ``E / k`` arithmetic costs less than the dispatch it saves.

    Args:
        x: ``(N, D)``; expert_ids: ``(N, k)`` int64 (``-1`` = dropped); weights: ``(N, k)``;
        w_in: ``(E, 2F | F, D)``; w_out: ``(E, D, F)``.

    Returns ``(N, D)``.
    """
    num_tokens, top_k = expert_ids.shape
    num_experts, hidden = w_out.shape[0], w_out.shape[1]
    if activation == "swiglu" and num_tokens * top_k >= 2 * num_experts:
        return _every_expert_forward(x, expert_ids, weights, w_in, w_out)
    flat = expert_ids.reshape(-1)
    order = flat.argsort(stable=True)  # dropped (-1) first, then by expert, token order kept
    counts = torch.bincount(flat + 1, minlength=num_experts + 1)  # (E + 1,), [0] = dropped
    dropped = int(counts[0])
    if dropped:
        order = order[dropped:]
    offsets = counts[1:].cumsum(0).to(torch.int32)
    token = order // top_k
    row_weight = weights.reshape(-1, 1).index_select(0, order)
    linear = _aligned_linear if order.numel() else grouped_linear  # all dropped: empty groups
    y = _expert_rows(x.index_select(0, token), w_in, w_out, offsets, None, None, row_weight,
                     activation, linear)
    return x.new_zeros(num_tokens, hidden).index_add(0, token, y.to(x.dtype))


def _every_expert_forward(
    x: Tensor, expert_ids: Tensor, weights: Tensor, w_in: Tensor, w_out: Tensor
) -> Tensor:
    """Every expert on every token, combined with zero weight where a token did not pick it.

    ``(N, D) -> (N, D)``; SwiGLU experts; dropped slots (``-1``) and unpicked experts weigh 0.
    """
    num_tokens = x.shape[0]
    num_experts, hidden, width = w_out.shape
    combine = x.new_zeros(num_tokens, num_experts + 1)  # column E collects dropped (-1) slots
    combine = combine.scatter_add(1, expert_ids % (num_experts + 1), weights)[:, :num_experts]
    h = F.linear(x, w_in.reshape(num_experts * 2 * width, hidden))  # (N, E * 2F)
    a = swiglu(h.view(num_tokens, num_experts, 2 * width)) * combine.unsqueeze(-1)  # (N, E, F)
    y = torch.bmm(a.transpose(0, 1), w_out.transpose(1, 2))  # (E, N, D)
    return y.sum(0)
