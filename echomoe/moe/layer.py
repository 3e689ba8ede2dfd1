"""The mixture-of-experts layer and its dense twin, which return the same type.

:class:`MoELayer` composes already-built parts (keyword-only, torchtune style)::

    MoELayer(router=TopKRouter(...), experts=GroupedExperts(...),
             shared_expert=SharedExpert(GatedMLP(...)),   # optional, Qwen2-MoE style
             dense_branch=GatedMLP(...))                  # optional, EchoVLM dual path

and :class:`DenseFFN` wraps any dense MLP so that model code never branches on dense vs MoE:
both return :class:`MoEOutput` (the dense one with no losses and no routing).

Axis legend: ``B`` batch, ``T`` tokens per sample, ``N = B*T``, ``D`` hidden, ``E`` experts,
``k`` experts per token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from echomoe.moe.experts import GroupedExperts
from echomoe.moe.routers import ExpertChoiceOutput, validate_region_ids


@dataclass
class RoutingInfo:
    """What the router did, detached, for statistics and logging.

    Attributes:
        expert_ids: ``(N, k)`` int64; ``-1`` = dropped / not chosen / padding (a token
            the ``token_mask`` marks as padding goes to no expert).  For expert choice
            ``k = E`` and column ``e`` is ``e`` where expert ``e`` picked the token.
        weights: ``(N, k)`` combine weights.
        probs: ``(N, E)`` routing probabilities.
        region_ids: ``(N,)`` region of each token (``-1`` unknown) or ``None``.
        num_experts: ``E``.
        num_dropped: number of dropped (token, expert) assignments (token choice with a
            capacity) or of tokens no expert picked (expert choice).
    """

    expert_ids: Tensor
    weights: Tensor
    probs: Tensor
    region_ids: Tensor | None
    num_experts: int
    num_dropped: int = 0


@dataclass
class MoEOutput:
    """Output of :class:`MoELayer` and :class:`DenseFFN`.

    Attributes:
        hidden_states: ``(B, T, D)``.
        aux_losses: raw auxiliary losses by name (empty for dense layers).
        routing: :class:`RoutingInfo`, ``None`` for dense layers.
    """

    hidden_states: Tensor
    aux_losses: dict[str, Tensor] = field(default_factory=dict)
    routing: RoutingInfo | None = None


def token_regions(
    name: str, hidden_states: Tensor, hidden_size: int, region_ids: Tensor | None,
    num_regions: int,
) -> Tensor | None:
    """Check ``hidden_states (B, T, hidden_size)`` and broadcast ``region_ids (B,)`` to ``(B*T,)``.

    ``name`` (the calling layer) appears in the error for a wrongly shaped input.
    """
    if hidden_states.dim() != 3 or hidden_states.shape[-1] != hidden_size:
        raise ValueError(
            f"{name} expected hidden states (batch, tokens, {hidden_size}), "
            f"got {tuple(hidden_states.shape)}"
        )
    if region_ids is None:
        return None
    b, t = hidden_states.shape[:2]
    region_ids = validate_region_ids(region_ids.to(hidden_states.device), b, num_regions)
    return region_ids[:, None].expand(b, t).reshape(b * t)  # a view for one token per sample


class DenseFFN(nn.Module):
    """Wrap a dense MLP so it returns :class:`MoEOutput` like :class:`MoELayer` does."""

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        self.mlp = mlp

    def forward(
        self,
        hidden_states: Tensor,
        region_ids: Tensor | None = None,
        token_mask: Tensor | None = None,
        *,
        aux_losses: bool = True,
        token_types: Tensor | None = None,
    ) -> MoEOutput:
        """``(B, T, D) -> MoEOutput``; the other arguments are accepted, unused."""
        return MoEOutput(self.mlp(hidden_states))


class SharedExpert(nn.Module):
    """An always-on expert, optionally scaled by a per-token sigmoid gate (Qwen2-MoE)."""

    def __init__(self, mlp: nn.Module, hidden_size: int, *, gated: bool = True) -> None:
        super().__init__()
        self.mlp = mlp
        self.gate = nn.Linear(hidden_size, 1, bias=False) if gated else None

    def forward(self, x: Tensor) -> Tensor:
        """``(N, D) -> (N, D)``."""
        y = self.mlp(x)
        return y if self.gate is None else torch.sigmoid(self.gate(x)) * y


class MoELayer(nn.Module):
    """Routed experts (+ optional shared expert, + optional dense branch).

    Args:
        router: a token-choice router (:class:`~echomoe.moe.routers.TopKRouter` and its region
            variants) or :class:`~echomoe.moe.routers.ExpertChoiceRouter`.
        experts: :class:`~echomoe.moe.experts.GroupedExperts`.
        shared_expert: added to the routed output for every token.
        dense_branch: a dense MLP; when given the output is the EchoVLM *dual path*
            ``c_0 * dense(x) + c_1 * moe(x)`` with ``c = softmax(W_mix x + b_mix)`` per token
            (``path_mixer``, a ``Linear(D, 2)``; row 0 weighs the dense branch, row 1 the
            experts).  Any module mapping ``(N, D) -> (N, D)`` works, e.g. the pretrained
            ``Qwen2MLP`` it replaces.
        path_mixer_bias: give ``path_mixer`` a bias (EchoVLM's ``Linear(D, 2)`` has one).
    """

    def __init__(
        self,
        *,
        router: nn.Module,
        experts: GroupedExperts,
        shared_expert: nn.Module | None = None,
        dense_branch: nn.Module | None = None,
        path_mixer_bias: bool = False,
    ) -> None:
        super().__init__()
        if path_mixer_bias and dense_branch is None:
            raise ValueError("path_mixer_bias needs a dense_branch (the mixer weighs it against "
                             "the experts)")
        if router.num_experts != experts.num_experts:
            raise ValueError(
                f"router has {router.num_experts} experts but experts has {experts.num_experts}"
            )
        if router.hidden_size != experts.hidden_size:
            raise ValueError(
                f"router hidden size {router.hidden_size} != experts hidden size "
                f"{experts.hidden_size}"
            )
        self.hidden_size = experts.hidden_size
        self.num_regions = router.num_regions
        self.router = router
        self.experts = experts
        self.shared_expert = shared_expert
        self.dense_branch = dense_branch
        self.path_mixer = None
        if dense_branch is not None:
            self.path_mixer = nn.Linear(self.hidden_size, 2, bias=path_mixer_bias)

    def forward(
        self,
        hidden_states: Tensor,
        region_ids: Tensor | None = None,
        token_mask: Tensor | None = None,
        *,
        aux_losses: bool = True,
        token_types: Tensor | None = None,
    ) -> MoEOutput:
        """Route ``hidden_states (B, T, D)``.

        Args:
            region_ids: ``(B,)`` region per sample (``-1`` = unknown) or ``None``.
            token_mask: ``(B, T)`` bool/int, ``True``/1 for real tokens.  Padding goes to no
                expert (its routed output is 0; a shared expert or dense branch still runs on
                it), takes no capacity, and is excluded from the auxiliary losses.
            aux_losses: compute the router's auxiliary losses (``False``: the output's
                ``aux_losses`` is empty; for inference, where nothing reads them).
            token_types: ``(B, T)`` per token ``0`` text, ``1`` image, ``-1`` unknown, for
                routers that route by modality (:class:`~echomoe.moe.modality.ModalityRouter`);
                others ignore it.
        """
        regions = token_regions(
            "MoELayer", hidden_states, self.hidden_size, region_ids, self.num_regions
        )  # (N,) or None
        b, t, d = hidden_states.shape
        x = hidden_states.reshape(b * t, d)
        flat_mask = _per_token("token_mask", token_mask, b, t, x.device, torch.bool)
        flat_types = _per_token("token_types", token_types, b, t, x.device)
        routed = self.router(x, regions, flat_mask, aux_losses=aux_losses,
                             token_types=flat_types)
        if isinstance(routed, ExpertChoiceOutput):
            y, info = self._expert_choice(x, routed, regions, flat_mask)
        else:
            y = self.experts(x, routed.expert_ids, routed.weights)
            dropped = 0 if routed.num_dropped is None else int(routed.num_dropped)
            info = RoutingInfo(
                routed.expert_ids.detach(),
                routed.weights.detach(),
                routed.probs.detach(),
                regions,
                self.experts.num_experts,
                dropped,
            )
        if self.shared_expert is not None:
            y = y + self.shared_expert(x)
        if self.dense_branch is not None:
            # (2, N): a softmax over 2-long rows is slow on the CPU; over columns it is not.
            mix = torch.mm(self.path_mixer.weight, x.t())
            if self.path_mixer.bias is not None:
                mix = mix + self.path_mixer.bias.unsqueeze(-1)
            mix = mix.softmax(dim=0)
            y = mix[0].unsqueeze(-1) * self.dense_branch(x) + mix[1].unsqueeze(-1) * y
        return MoEOutput(y.view(b, t, d), routed.aux_losses, info)

    def _expert_choice(
        self, x: Tensor, routed: ExpertChoiceOutput, regions: Tensor | None,
        token_mask: Tensor | None,
    ) -> tuple[Tensor, RoutingInfo]:
        num_experts, capacity = routed.token_ids.shape
        flat_ids = routed.token_ids.reshape(-1)  # (E*C,)
        buckets = x.index_select(0, flat_ids).view(num_experts, capacity, -1)
        y = self.experts.forward_buckets(buckets) * routed.weights.unsqueeze(-1)
        out = torch.zeros_like(x).index_add_(0, flat_ids, y.reshape(-1, x.shape[-1]))
        chosen = torch.full_like(routed.probs, -1, dtype=torch.long)  # (N, E)
        expert_col = torch.arange(num_experts, device=x.device).repeat_interleave(capacity)
        chosen[flat_ids, expert_col] = expert_col
        weights = torch.zeros_like(routed.probs)
        weights[flat_ids, expert_col] = routed.weights.reshape(-1).detach().float()
        unpicked = (chosen < 0).all(dim=-1)
        if token_mask is not None:  # padding picked to fill a bucket (weight 0) is not routed
            chosen[~token_mask] = -1
            unpicked &= token_mask
        dropped = int(unpicked.sum())
        info = RoutingInfo(
            chosen, weights, routed.probs.detach(), regions, num_experts, dropped
        )
        return out, info


def _per_token(name: str, values: Tensor | None, b: int, t: int, device: torch.device,
               dtype: torch.dtype | None = None) -> Tensor | None:
    """A ``(B, T)`` per-token tensor flattened to ``(B * T,)`` on ``device`` (``None`` passes)."""
    if values is None:
        return None
    if values.shape != (b, t):
        raise ValueError(f"{name} must have shape (batch, tokens) = ({b}, {t}), "
                         f"got {tuple(values.shape)}")
    return values.to(device=device, dtype=dtype).reshape(b * t)
