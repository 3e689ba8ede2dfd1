"""A bank of ``E`` feed-forward experts stored as 3-D weights, with interchangeable backends.

Weights use the transformers-v5 Mixtral layout, so they load into and from ``transformers`` MoE
blocks without conversion:

* gated activations (``swiglu``, ``geglu``): ``gate_up_proj [E, 2F, D]`` -- the ``F`` gate rows
  first, then the ``F`` up rows -- and ``down_proj [E, D, F]``;
* plain activations (``gelu``, ``relu``, ``silu``): ``up_proj [E, F, D]`` and
  ``down_proj [E, D, F]`` (optionally with biases, for upcycled ViT/CLIP MLPs).

Backends (same weights, same results) are entries of :data:`EXPERT_BACKENDS`, a
:class:`~echomoe.moe.registry.Registry` of :class:`ExpertBackend` (a function
``forward(experts, x, expert_ids, weights) -> (N, D)`` and an optional construction-time
``check()``); register one to add a kernel:

* ``loop``: one matmul pair per expert in a Python loop; the readable reference.
* ``grouped_mm``: sort assignments by expert and run one grouped GEMM per projection
  (:mod:`echomoe.moe.dispatch`); the default, runs on CPU and GPU.
* ``megablocks``: MegaBlocks' grouped GEMM kernels on CUDA; imported lazily, GPU only.
* ``expert_parallel``: computes like ``grouped_mm`` in one process; under ``torchrun`` the
  experts are split across ranks (:func:`echomoe.distributed.shard_experts`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from echomoe.moe.dispatch import gated_activation, grouped_experts_forward, grouped_linear
from echomoe.moe.registry import Registry

GATED_ACTIVATIONS = ("swiglu", "geglu")
PLAIN_ACTIVATIONS = ("gelu", "relu", "silu")
ACTIVATIONS = GATED_ACTIVATIONS + PLAIN_ACTIVATIONS


def check_choice(name: str, value: str, valid) -> None:
    """Raise a ``ValueError`` naming the valid choices when ``value`` is not one of them."""
    if value not in valid:
        raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(valid)}")


def _require_megablocks() -> None:
    if not torch.cuda.is_available():
        raise RuntimeError(
            "backend='megablocks' needs a CUDA GPU (and `pip install echomoe[megablocks]`); "
            "this machine has none. Use backend='grouped_mm': same weights, same results, "
            "runs on CPU."
        )
    try:
        import megablocks  # noqa: F401
    except ImportError as err:
        raise RuntimeError(
            "backend='megablocks' needs the megablocks package: pip install 'echomoe[megablocks]'"
            " (or use backend='grouped_mm')"
        ) from err


def _megablocks_linear(x: Tensor, weight: Tensor, offsets: Tensor, out_groups: int) -> Tensor:
    """MegaBlocks' grouped GEMM (``grouped_gemm.ops.gmm``) on the sorted layout.

    ``gmm`` takes per-group sizes as an int64 CPU tensor and ``weight (E, out, in)`` with
    ``trans_b=True``; it is differentiable.
    """
    from megablocks import grouped_gemm_util as gg

    counts = torch.diff(offsets, prepend=offsets.new_zeros(1)).to("cpu", torch.int64)
    return gg.ops.gmm(x.contiguous(), weight.contiguous(), counts, trans_b=True)


@dataclass(frozen=True)
class ExpertBackend:
    """An entry of :data:`EXPERT_BACKENDS`.

    Attributes:
        forward: ``forward(experts, x (N, D), expert_ids (N, k), weights (N, k)) -> (N, D)``
            = ``sum_j weights[:, j] * expert_{ids[:, j]}(x)`` (``-1`` ids are dropped).
        check: called when a :class:`GroupedExperts` with this backend is built (e.g. to
            refuse a missing GPU or package early); ``None``: nothing to check.
    """

    forward: Callable[..., Tensor]
    check: Callable[[], None] | None = None


def loop_forward(experts: GroupedExperts, x: Tensor, expert_ids: Tensor,
                 weights: Tensor) -> Tensor:
    """One matmul pair per expert in a Python loop (the readable reference)."""
    out = torch.zeros_like(x)
    for e in range(experts.num_experts):
        token, slot = torch.where(expert_ids == e)
        if token.numel() == 0:
            continue
        y = experts.expert(e, x[token]) * weights[token, slot, None]
        out.index_add_(0, token, y.to(out.dtype))
    return out


def grouped_mm_forward(experts: GroupedExperts, x: Tensor, expert_ids: Tensor,
                       weights: Tensor, linear: Callable = grouped_linear) -> Tensor:
    """Assignments sorted by expert, one grouped GEMM per projection
    (:func:`~echomoe.moe.dispatch.grouped_experts_forward`)."""
    return grouped_experts_forward(x, expert_ids, weights, experts.w_in, experts.down_proj,
                                   experts.in_bias, experts.down_bias, experts.activation,
                                   linear=linear)


def megablocks_forward(experts: GroupedExperts, x: Tensor, expert_ids: Tensor,
                       weights: Tensor) -> Tensor:
    """:func:`grouped_mm_forward` with MegaBlocks' grouped GEMM kernels (CUDA only)."""
    _require_megablocks()
    if not x.is_cuda:
        raise RuntimeError("backend='megablocks' needs inputs on a CUDA device")
    return grouped_mm_forward(experts, x, expert_ids, weights, linear=_megablocks_linear)


EXPERT_BACKENDS: Registry[ExpertBackend] = Registry("backend")
"""Expert backends by name (see the module docstring)."""
EXPERT_BACKENDS.register("grouped_mm", ExpertBackend(grouped_mm_forward))
EXPERT_BACKENDS.register("loop", ExpertBackend(loop_forward))
EXPERT_BACKENDS.register("megablocks", ExpertBackend(megablocks_forward, _require_megablocks))
# one process: grouped_mm; under torchrun the experts are sharded (ExpertParallelExperts)
EXPERT_BACKENDS.register("expert_parallel", ExpertBackend(grouped_mm_forward))

BACKENDS = EXPERT_BACKENDS
"""The registered backend names (the registry itself: iterate it, ``name in BACKENDS``)."""


class GroupedExperts(nn.Module):
    """``E`` experts applied to routed tokens.

    Args:
        num_experts: ``E``.
        hidden_size: ``D``.
        intermediate_size: ``F``, the width of one expert.
        activation: one of :data:`ACTIVATIONS`.
        backend: a name registered in :data:`EXPERT_BACKENDS`.
        bias: give each expert biases (plain activations only; as in ViT/CLIP MLPs).
    """

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        *,
        activation: str = "swiglu",
        backend: str = "grouped_mm",
        bias: bool = False,
    ) -> None:
        super().__init__()
        check_choice("activation", activation, ACTIVATIONS)
        check = EXPERT_BACKENDS[backend].check
        if check is not None:
            check()
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.activation = activation
        self.backend = backend
        self.gated = activation in GATED_ACTIVATIONS
        width_in = 2 * intermediate_size if self.gated else intermediate_size
        w_in = nn.Parameter(torch.empty(num_experts, width_in, hidden_size))
        if self.gated:
            self.gate_up_proj = w_in
        else:
            self.up_proj = w_in
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.in_bias = nn.Parameter(torch.zeros(num_experts, width_in)) if bias else None
        self.down_bias = nn.Parameter(torch.zeros(num_experts, hidden_size)) if bias else None
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        """Normal(0, ``std``) expert weights, zero biases."""
        nn.init.normal_(self.w_in, std=std)
        nn.init.normal_(self.down_proj, std=std)

    @property
    def w_in(self) -> Tensor:
        """The first projection: ``gate_up_proj`` or ``up_proj``."""
        return self.gate_up_proj if self.gated else self.up_proj

    def expert(self, e: int, x: Tensor) -> Tensor:
        """Expert ``e`` applied to ``x (n, D)`` -> ``(n, D)``."""
        b_in = None if self.in_bias is None else self.in_bias[e]
        b_out = None if self.down_bias is None else self.down_bias[e]
        h = gated_activation(F.linear(x, self.w_in[e], b_in), self.activation)
        return F.linear(h, self.down_proj[e], b_out)

    def forward(self, x: Tensor, expert_ids: Tensor, weights: Tensor) -> Tensor:
        """Combine each token's experts.

        Args:
            x: ``(N, D)``.
            expert_ids: ``(N, k)`` int64, ``-1`` = dropped.
            weights: ``(N, k)`` combine weights.

        Returns ``(N, D)`` = ``sum_j weights[:, j] * expert_{ids[:, j]}(x)``.
        """
        return EXPERT_BACKENDS[self.backend].forward(self, x, expert_ids, weights)

    def forward_buckets(self, x: Tensor) -> Tensor:
        """Apply expert ``e`` to bucket ``e``: ``(E, C, D) -> (E, C, D)`` with batched GEMMs.

        Used when every expert gets the same number of rows (expert choice, soft MoE).
        """
        h = torch.baddbmm(self.in_bias.unsqueeze(1), x, self.w_in.transpose(1, 2)) \
            if self.in_bias is not None else torch.bmm(x, self.w_in.transpose(1, 2))
        h = gated_activation(h, self.activation)
        if self.down_bias is not None:
            return torch.baddbmm(self.down_bias.unsqueeze(1), h, self.down_proj.transpose(1, 2))
        return torch.bmm(h, self.down_proj.transpose(1, 2))

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, hidden_size={self.hidden_size}, "
            f"intermediate_size={self.intermediate_size}, activation={self.activation!r}, "
            f"backend={self.backend!r}"
        )
