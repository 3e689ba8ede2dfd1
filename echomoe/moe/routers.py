"""Routers: decide which experts see which tokens.

Token-choice routers (:class:`TopKRouter`, :class:`RegionHardRouter`, :class:`RegionSoftRouter`)
return a :class:`RouterOutput` with ``k`` experts per token and are causal (a token's routing
depends on that token only), so they can sit inside a decoder LM.  :class:`ExpertChoiceRouter`
lets each expert pick its tokens from the whole batch; it is balanced by construction but not
causal, so it refuses to be built for a causal model.

Every router has a weight ``[E, D]`` in the layout of ``transformers``' Mixtral / Qwen2-MoE
routers, so weights are interchangeable, and an ``num_regions`` attribute used to validate
region ids.  Region ids are per token, ``-1`` meaning "unknown".

Axis legend: ``N`` tokens, ``D`` hidden size, ``E`` experts, ``k`` experts per token,
``R`` regions, ``C`` tokens per expert (expert-choice capacity).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from echomoe.moe.losses import load_balancing_loss, region_alignment_loss, router_z_loss


@dataclass
class RouterOutput:
    """What a token-choice router decided for ``N`` tokens.

    Attributes:
        logits: ``(N, E)`` router logits after any region bias or mask (fp32); an expert-major
            (transposed) view, like ``probs``.
        probs: ``(N, E)`` softmax of ``logits``.
        expert_ids: ``(N, k)`` int64 chosen experts; ``-1`` = assignment dropped (capacity).
        weights: ``(N, k)`` combine weights (0 where dropped).  With ``normalize=True`` each row
            of kept weights sums to 1 before drops are applied.
        aux_losses: raw auxiliary losses, e.g. ``{"balance", "z"}`` (+ ``"region"``).
        num_dropped: scalar count of dropped (token, expert) assignments.
    """

    logits: Tensor
    probs: Tensor
    expert_ids: Tensor
    weights: Tensor
    aux_losses: dict[str, Tensor] = field(default_factory=dict)
    num_dropped: Tensor | None = None


@dataclass
class ExpertChoiceOutput:
    """What an expert-choice router decided: each expert's ``C`` tokens and their weights.

    Attributes:
        logits: ``(N, E)``; probs: ``(N, E)`` token-wise softmax over experts.
        token_ids: ``(E, C)`` int64 index of the tokens each expert processes.
        weights: ``(E, C)`` gate value of each chosen (expert, token) pair.
        aux_losses: raw auxiliary losses (``{"z"}``).
    """

    logits: Tensor
    probs: Tensor
    token_ids: Tensor
    weights: Tensor
    aux_losses: dict[str, Tensor] = field(default_factory=dict)


def _router_weight(num_experts: int, hidden_size: int) -> nn.Parameter:
    """A router weight ``[E, D]`` initialised ``N(0, 0.02^2)`` (as transformers' MoE models)."""
    return nn.Parameter(torch.empty(num_experts, hidden_size).normal_(std=0.02))


def refuse_causal(name: str, reason: str) -> None:
    """The error for a non-causal routing scheme asked to sit in a causal model."""
    raise ValueError(
        f"{name} is not causal ({reason}); use it in encoders only, or a token-choice router "
        "('topk', 'region_hard', 'region_soft') in a causal LM"
    )


def _check_num_experts(num_experts: int, top_k: int) -> None:
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got top_k={top_k}")


def validate_region_ids(region_ids: Tensor, size: int, num_regions: int, *,
                        name: str = "region_ids", count: str = "num_regions",
                        axis: str = "batch", owner: str = "") -> Tensor:
    """Check ``region_ids`` is ``(size,)`` integer with values in ``[-1, num_regions)``;
    returns it as ``long``.

    Out-of-range ids would otherwise index the wrong region's experts (``-2`` wraps to the last
    region) or fail deep in torch.  Any per-sample class id with ``-1`` for unknown is checked
    the same way: ``name`` and ``count`` name the tensor and the class count in the messages
    (``"diagnosis_ids"``, ``"len(config.diagnoses)"``), ``axis`` the dimension (``"batch"``, or
    ``"tokens"`` for a router's one id per token) and ``owner`` the module checking, if any.
    """
    where = f"{owner}: " if owner else ""
    if region_ids.dtype.is_floating_point or region_ids.dtype == torch.bool:
        raise TypeError(f"{where}{name} must be an integer tensor, got {region_ids.dtype}")
    if region_ids.shape != (size,):
        raise ValueError(f"{where}{name} must have shape ({axis},) = ({size},), got "
                         f"{tuple(region_ids.shape)}")
    if region_ids.numel():
        lo, hi = (int(v) for v in torch.aminmax(region_ids))
        if lo < -1 or hi >= num_regions:
            noun = name.removesuffix("s").replace("_", " ")
            raise ValueError(f"{where}{noun} {lo if lo < -1 else hi} out of range for "
                             f"{count}={num_regions} (valid: 0..{count}-1, or -1 for unknown)")
    return region_ids.long()


def default_region_experts(num_regions: int, num_experts: int, group_size: int) -> list[list[int]]:
    """Give each region ``group_size`` consecutive experts, wrapping around.

    With ``E >= R * group_size`` the groups are disjoint; otherwise regions share experts in a
    fixed round-robin pattern (e.g. 7 regions, 8 experts, groups of 2: region 0 -> {0, 1},
    1 -> {2, 3}, 2 -> {4, 5}, 3 -> {6, 7}, 4 -> {0, 1}, ...).
    """
    size = min(group_size, num_experts)
    return [[(r * size + j) % num_experts for j in range(size)] for r in range(num_regions)]


def region_mask_from_experts(
    region_experts: Sequence[Sequence[int]], num_experts: int, min_size: int
) -> Tensor:
    """``(R, E)`` boolean mask from per-region expert lists, validated."""
    mask = torch.zeros(len(region_experts), num_experts, dtype=torch.bool)
    for r, experts in enumerate(region_experts):
        experts = list(experts)
        bad = [e for e in experts if not 0 <= int(e) < num_experts]
        if bad:
            raise ValueError(
                f"region_experts[{r}] names experts {bad} outside [0, {num_experts})"
            )
        if len(set(experts)) < min_size:
            raise ValueError(
                f"region_experts[{r}] has {len(set(experts))} distinct experts; top_k={min_size} "
                "needs at least that many"
            )
        mask[r, experts] = True
    return mask


def _capacity_drop(
    expert_ids: Tensor, weights: Tensor, num_experts: int, capacity: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Keep at most ``capacity`` assignments per expert, in token order (slot 0 first).

    Entries already ``-1`` (padding) take no place and are not counted.  Returns
    ``(expert_ids, weights, num_dropped)`` with dropped entries set to ``-1`` / ``0``.
    """
    n, k = expert_ids.shape
    # Priority: all first choices (in token order) before any second choice, as in Switch/GShard.
    flat = expert_ids.t().reshape(-1)  # (k*N,) slot-major
    one_hot = F.one_hot(flat + 1, num_experts + 1)[:, 1:]  # unassigned (-1, padding): no column
    position = (one_hot.cumsum(dim=0) * one_hot).sum(dim=-1) - 1  # rank within its expert
    keep = (position < capacity).view(k, n).t()  # unassigned: position -1, stays -1
    dropped = (~keep).sum()
    return expert_ids.masked_fill(~keep, -1), weights.masked_fill(~keep, 0.0), dropped


class TopKRouter(nn.Module):
    """Token-choice top-k router (Mixtral / Qwen2-MoE rule).

    ``softmax(x W^T)`` in fp32 -> top-k -> optionally renormalise the k weights to sum to 1.

    Args:
        hidden_size: ``D``.
        num_experts: ``E``.
        top_k: ``k`` experts per token, ``1 <= k <= E``.
        normalize: renormalise the top-k weights (Mixtral: yes; Qwen2-MoE: config flag).
        jitter: multiplicative uniform noise ``U(1-j, 1+j)`` on the router input in training
            (Switch Transformer); 0 disables it.
        capacity_factor: if set, each expert keeps at most ``ceil(cf * N * k / E)``
            assignments (``N``: real tokens, padding excluded) and the rest are dropped
            (counted in ``num_dropped``).  ``None`` = dropless (default).
        num_regions: number of valid region ids (used for validation and statistics).
        bias_update_rate: auxiliary-loss-free load balancing (DeepSeek-V3) when > 0: a
            per-expert bias buffer ``expert_bias (E,)`` is added to the logits for the top-k
            *selection* only (combine weights stay the unbiased probabilities), and every
            training forward moves it by ``rate * sign(mean load - load_e)`` over the real
            tokens' assignments, so overloaded experts get picked less.  0 (default): off, no
            buffer.  Under ``torch.distributed`` the loads are summed over all ranks first (one
            ``(E,)`` all-reduce per training forward), so every rank applies the same update
            from the global batch; every rank must then run the training forwards, as DDP and
            DeepSpeed do.
    """

    #: Whether ``bias_update_rate`` may be used (not where regions fix the experts).
    supports_bias_balancing = True

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        *,
        normalize: bool = True,
        jitter: float = 0.0,
        capacity_factor: float | None = None,
        num_regions: int = 7,
        bias_update_rate: float = 0.0,
    ) -> None:
        super().__init__()
        _check_num_experts(num_experts, top_k)
        if capacity_factor is not None and capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be > 0 or None, got {capacity_factor}")
        if not bias_update_rate >= 0:
            raise ValueError(f"bias_update_rate must be >= 0, got {bias_update_rate}")
        if bias_update_rate and not self.supports_bias_balancing:
            raise ValueError(
                f"{type(self).__name__} fixes which experts each region may use, so "
                "bias_update_rate (load balancing by a selection bias) does not apply; use it "
                "with the topk or region_soft router"
            )
        self.hidden_size = hidden_size
        self.num_experts = num_experts
        self.top_k = top_k
        self.normalize = normalize
        self.jitter = jitter
        self.capacity_factor = capacity_factor
        self.num_regions = num_regions
        self.weight = _router_weight(num_experts, hidden_size)
        self.bias_update_rate = float(bias_update_rate)
        if self.bias_update_rate:
            self.register_buffer("expert_bias", torch.zeros(num_experts))

    @property
    def active_experts_per_token(self) -> float:
        """Experts each token is sent to (``k``)."""
        return float(self.top_k)

    def compute_logits(self, x: Tensor, region_ids: Tensor | None,
                       token_types: Tensor | None = None) -> Tensor:
        """``(N, D) -> (N, E)`` fp32 logits. Subclasses add region (or token-type) terms here;
        ``token_types (N,)`` is read by :class:`~echomoe.moe.modality.ModalityRouter` only.

        The logits are stored expert-major (a transposed view of an ``(E, N)`` tensor): with few
        experts, softmax, top-k and the losses over ``E`` then run along contiguous memory,
        many times faster on the CPU than over ``E``-long rows.  Region terms keep that layout
        by being built ``(E, N)`` and transposed (any ``(N, E)`` result still works).
        """
        return torch.mm(self.weight, x.t()).float().t()

    def region_losses(self, probs: Tensor, region_ids: Tensor | None) -> dict[str, Tensor]:
        """Region-dependent aux losses from ``(N, E)`` router probabilities and ``(N,)``
        region ids; none for the plain top-k router."""
        return {}

    def forward(
        self,
        x: Tensor,
        region_ids: Tensor | None = None,
        token_mask: Tensor | None = None,
        *,
        aux_losses: bool = True,
        token_types: Tensor | None = None,
    ) -> RouterOutput:
        """Route ``x (N, D)``; ``region_ids (N,)`` and ``token_types (N,)`` (0 text, 1 image,
        -1 unknown; used by routers that route by modality) or ``None``.

        ``token_mask (N,)`` bool marks real tokens.  Padding (``False``) is sent to no expert
        (``expert_ids`` ``-1``, weight 0: no expert compute, no capacity, not counted as
        dropped) and is left out of the auxiliary losses, so batch padding neither costs expert
        time nor biases load balancing.  Its logits and probabilities are still returned.
        ``aux_losses=False`` skips computing the losses (``aux_losses`` of the output is
        empty): for inference, where nothing uses them.
        """
        if region_ids is not None:
            region_ids = validate_region_ids(region_ids, x.shape[0], self.num_regions,
                                             axis="tokens", owner=type(self).__name__)
        if self.training and self.jitter > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        if token_mask is not None and x.device.type == "cpu" and bool(token_mask.all()):
            token_mask = None  # no padding: skip the masking (cheap check on the CPU)
        # (E, N), see compute_logits
        logits_t = self.compute_logits(x, region_ids, token_types).t().contiguous()
        probs_t = logits_t.softmax(dim=0)
        # Select on logits, not probs: a masked (-inf) expert must never tie with an allowed
        # expert whose probability underflowed to 0.
        select_t = logits_t + self.expert_bias[:, None] if self.bias_update_rate else logits_t
        ids_t = select_t.topk(self.top_k, dim=0).indices  # (k, N)
        weights_t = probs_t.gather(0, ids_t)
        if self.normalize:
            weights_t = weights_t / weights_t.sum(dim=0, keepdim=True)
        logits, probs = logits_t.t(), probs_t.t()  # (N, E) views
        expert_ids, weights = ids_t.t().contiguous(), weights_t.t().contiguous()  # (N, k)
        num_dropped = None
        if token_mask is not None:
            padding = ~token_mask.unsqueeze(-1)
            expert_ids = expert_ids.masked_fill(padding, -1)
            weights = weights.masked_fill(padding, 0.0)
        if self.bias_update_rate and self.training:
            self._update_expert_bias(expert_ids)
        if self.capacity_factor is not None:
            n = x.shape[0] if token_mask is None else int(token_mask.sum())
            capacity = math.ceil(self.capacity_factor * n * self.top_k / self.num_experts)
            expert_ids, weights, num_dropped = _capacity_drop(
                expert_ids, weights, self.num_experts, capacity
            )
        aux = self._aux_losses(logits, probs, expert_ids, region_ids, token_mask) \
            if aux_losses else {}
        return RouterOutput(logits, probs, expert_ids, weights.to(x.dtype), aux, num_dropped)

    def _apply(self, fn, recurse=True):
        """As ``nn.Module._apply``, but ``expert_bias`` stays fp32 through ``.to(bf16)`` /
        ``.half()``: steps of ``bias_update_rate`` would round away in 16-bit floats."""
        super()._apply(fn, recurse)
        if self.bias_update_rate and self.expert_bias.dtype != torch.float32:
            self.expert_bias = self.expert_bias.float()
        return self

    @torch.no_grad()
    def _update_expert_bias(self, expert_ids: Tensor) -> None:
        """``expert_bias += rate * sign(mean load - load)`` from ``(N, k)`` selections (``-1``,
        padding, counts for no expert)."""
        load = torch.bincount(expert_ids.reshape(-1) + 1, minlength=self.num_experts + 1)
        load = load[1:].float()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(load)  # the global batch's load, identical on every rank
        self.expert_bias.add_(torch.sign(load.mean() - load), alpha=self.bias_update_rate)

    def _aux_losses(self, logits: Tensor, probs: Tensor, expert_ids: Tensor,
                    region_ids: Tensor | None, token_mask: Tensor | None) -> dict[str, Tensor]:
        """Balance, z and region losses over the tokens ``token_mask`` keeps (all if ``None``)."""
        if token_mask is not None:
            logits, probs, expert_ids = logits[token_mask], probs[token_mask], \
                expert_ids[token_mask]
            region_ids = None if region_ids is None else region_ids[token_mask]
        return {
            "balance": load_balancing_loss(probs, expert_ids, self.num_experts),
            "z": router_z_loss(logits),
            **self.region_losses(probs, region_ids),
        }


class _RegionRouter(TopKRouter):
    """A token router that knows which experts each anatomical region owns.

    Subclasses set ``learns_region_bias`` to get a learned ``(R, E)`` logit bias.

    Args:
        region_experts: one list of expert ids per region (each at least ``top_k`` long);
            default :func:`default_region_experts` with groups of ``max(top_k, E // R)``.
        (other arguments as :class:`TopKRouter`)
    """

    learns_region_bias = False

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        *,
        num_regions: int = 7,
        region_experts: Sequence[Sequence[int]] | None = None,
        normalize: bool = True,
        jitter: float = 0.0,
        capacity_factor: float | None = None,
        bias_update_rate: float = 0.0,
    ) -> None:
        super().__init__(
            hidden_size,
            num_experts,
            top_k,
            normalize=normalize,
            jitter=jitter,
            capacity_factor=capacity_factor,
            num_regions=num_regions,
            bias_update_rate=bias_update_rate,
        )
        if region_experts is None:
            group = max(top_k, num_experts // max(num_regions, 1))
            region_experts = default_region_experts(num_regions, num_experts, group)
        if len(region_experts) != num_regions:
            raise ValueError(
                f"region_experts lists {len(region_experts)} regions, num_regions={num_regions}"
            )
        mask = region_mask_from_experts(region_experts, num_experts, top_k)
        # (R, E); persistent, so checkpoints carry their region map.
        self.register_buffer("region_mask", mask)
        if self.learns_region_bias:
            self.region_bias = nn.Parameter(torch.zeros(num_regions, num_experts))  # (R, E)


class RegionHardRouter(_RegionRouter):
    """Each anatomical region owns a subset of experts; top-k is taken within that subset.

    Logits of experts outside a token's region are masked to ``-inf`` before the softmax, so a
    token of region ``r`` can only ever reach ``region_experts[r]``.  Tokens with an unknown
    region (``-1``) route over all experts.  Arguments as :class:`_RegionRouter`, without
    ``bias_update_rate`` (the regions fix the experts).
    """

    supports_bias_balancing = False

    def compute_logits(self, x: Tensor, region_ids: Tensor | None,
                       token_types: Tensor | None = None) -> Tensor:
        logits = super().compute_logits(x, region_ids)
        if region_ids is None:
            return logits
        # Column R of the extended mask (all True) serves unknown regions: index -1 picks it.
        everything = self.region_mask.new_ones(1, self.num_experts)
        allowed_t = torch.cat([self.region_mask, everything]).t()[:, region_ids]  # (E, N)
        return logits.t().masked_fill(~allowed_t, float("-inf")).t()


class RegionSoftRouter(_RegionRouter):
    """Token router plus a learned per-region logit bias, and a region-alignment loss.

    ``logits = x W^T + b[region]`` (no bias for unknown regions).  All experts stay reachable;
    the aux loss ``"region"`` (:func:`region_alignment_loss`) pulls each region's routing mass
    towards its preferred experts ``region_experts[r]`` (same default as
    :class:`RegionHardRouter`).  The bias starts at zero.  Arguments as :class:`_RegionRouter`.
    """

    learns_region_bias = True

    def compute_logits(self, x: Tensor, region_ids: Tensor | None,
                       token_types: Tensor | None = None) -> Tensor:
        logits = super().compute_logits(x, region_ids)
        if region_ids is None:
            return logits
        # A zero column R serves unknown regions (index -1 picks it) and gets no gradient.
        bias_t = F.pad(self.region_bias, (0, 0, 0, 1)).t()[:, region_ids]  # (E, N)
        return (logits.t() + bias_t.float()).t()

    def region_losses(self, probs: Tensor, region_ids: Tensor | None) -> dict[str, Tensor]:
        """``{"region": alignment loss}``: probability mass outside each token's region
        experts (:func:`~echomoe.moe.losses.region_alignment_loss`)."""
        return {"region": region_alignment_loss(probs, region_ids, self.region_mask)}


class ExpertChoiceRouter(nn.Module):
    """Expert-choice routing (Zhou et al., 2022): each expert picks its top-``C`` tokens.

    ``C = ceil(capacity_factor * N / E)`` (capped at ``N``), so every expert processes exactly
    ``C`` tokens and load is balanced by construction.  A token may be picked by 0..E experts.
    Choosing among *all* tokens of the batch makes a token's output depend on other (and later)
    tokens, so this router is for encoders (e.g. the vision tower) only.

    Args:
        capacity_factor: average number of experts per token (plays the role of ``k``).
        causal: must be ``False``; ``True`` raises, naming the causal-safe routers.
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        *,
        capacity_factor: float = 2.0,
        num_regions: int = 7,
        causal: bool = False,
    ) -> None:
        super().__init__()
        if causal:
            refuse_causal("ExpertChoiceRouter", "each expert picks among all tokens, later too")
        _check_num_experts(num_experts, 1)
        if capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}")
        self.hidden_size = hidden_size
        self.num_experts = num_experts
        self.capacity_factor = capacity_factor
        self.num_regions = num_regions
        self.weight = _router_weight(num_experts, hidden_size)

    @property
    def active_experts_per_token(self) -> float:
        """Expert slots per token on average (the capacity factor)."""
        return float(self.capacity_factor)

    def capacity(self, num_tokens: int) -> int:
        """Tokens each expert picks: ``min(N, ceil(capacity_factor * N / E))``."""
        return min(num_tokens, math.ceil(self.capacity_factor * num_tokens / self.num_experts))

    def forward(
        self,
        x: Tensor,
        region_ids: Tensor | None = None,
        token_mask: Tensor | None = None,
        *,
        aux_losses: bool = True,
        token_types: Tensor | None = None,
    ) -> ExpertChoiceOutput:
        """Route ``x (N, D)``; region ids are accepted for statistics, token types for the
        common router signature; neither is used.

        ``token_mask (N,)``: tokens marked ``False`` (padding) are picked only after every
        real token, with weight 0, and are left out of the z-loss.  ``aux_losses=False`` skips
        the z-loss.
        """
        if region_ids is not None:
            region_ids = validate_region_ids(region_ids, x.shape[0], self.num_regions,
                                             axis="tokens", owner=type(self).__name__)
        logits_t = torch.mm(self.weight, x.t()).float()  # (E, N): fast softmax over E
        probs_t = logits_t.softmax(dim=0)
        capacity = self.capacity(x.shape[0])
        if token_mask is None:
            weights, token_ids = probs_t.topk(capacity, dim=-1)  # (E, C)
        else:  # probabilities are >= 0, so -1 ranks padding last
            token_ids = probs_t.masked_fill(~token_mask, -1.0).topk(capacity, dim=-1).indices
            weights = probs_t.gather(1, token_ids) * token_mask[token_ids]
        logits, probs = logits_t.t(), probs_t.t()  # (N, E) views
        aux = {}
        if aux_losses:
            aux["z"] = router_z_loss(logits if token_mask is None else logits[token_mask])
        return ExpertChoiceOutput(logits, probs, token_ids, weights.to(x.dtype), aux)
