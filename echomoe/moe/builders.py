"""Component builders: turn a handful of sizes into a wired MoE layer.

``build_moe_layer`` is the one entry point configs and model code use; its keyword names are
stable.  The blocks themselves never see a config.  Routers come from the :data:`ROUTERS`
registry (same-signature builders of a :class:`RouterSpec`), expert kernels from
:data:`~echomoe.moe.experts.EXPERT_BACKENDS`; registering an entry makes its name usable in
``router=`` / ``backend=`` and in configs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

from echomoe.moe.experts import GroupedExperts
from echomoe.moe.layer import DenseFFN, MoELayer, SharedExpert
from echomoe.moe.mlp import make_mlp
from echomoe.moe.modality import ModalityRouter
from echomoe.moe.registry import Registry
from echomoe.moe.routers import (
    ExpertChoiceRouter,
    RegionHardRouter,
    RegionSoftRouter,
    TopKRouter,
)
from echomoe.moe.soft_moe import SoftMoE


@dataclass(frozen=True)
class RouterSpec:
    """The router-relevant arguments of :func:`build_moe_layer`, handed to every router
    builder (see :class:`RouterEntry`)."""

    hidden_size: int
    num_experts: int
    top_k: int
    num_regions: int = 7
    normalize: bool = True
    region_experts: Sequence[Sequence[int]] | None = None
    jitter: float = 0.0
    capacity_factor: float | None = None
    bias_update_rate: float = 0.0
    slots_per_expert: int = 1
    image_experts: int | Sequence[int] | None = None


@dataclass(frozen=True)
class RouterEntry:
    """An entry of :data:`ROUTERS`.

    Attributes:
        build: ``build(spec: RouterSpec, experts: GroupedExperts) -> nn.Module``: the router
            (``layer=False``; :func:`build_moe_layer` wires it into an
            :class:`~echomoe.moe.layer.MoELayer`) or the whole layer (``layer=True``: soft
            MoE mixes tokens into slots instead of routing them).
        causal: a token's routing depends on that token only (usable in a causal LM).
        bias_balancing: supports ``bias_update_rate`` (auxiliary-loss-free balancing).
        layer: ``build`` returns the whole layer.
        modality: routes by token type (``image_experts`` applies).
    """

    build: Callable[[RouterSpec, GroupedExperts], nn.Module]
    causal: bool
    bias_balancing: bool = False
    layer: bool = False
    modality: bool = False


def _topk(spec: RouterSpec, experts: GroupedExperts) -> nn.Module:
    return TopKRouter(spec.hidden_size, spec.num_experts, spec.top_k, normalize=spec.normalize,
                      jitter=spec.jitter, capacity_factor=spec.capacity_factor,
                      num_regions=spec.num_regions, bias_update_rate=spec.bias_update_rate)


def _region(cls: type) -> Callable[[RouterSpec, GroupedExperts], nn.Module]:
    def build(spec: RouterSpec, experts: GroupedExperts) -> nn.Module:
        return cls(spec.hidden_size, spec.num_experts, spec.top_k, num_regions=spec.num_regions,
                   region_experts=spec.region_experts, normalize=spec.normalize,
                   jitter=spec.jitter, capacity_factor=spec.capacity_factor,
                   bias_update_rate=spec.bias_update_rate)

    build.__name__ = f"_{cls.__name__}"
    return build


def _expert_choice(spec: RouterSpec, experts: GroupedExperts) -> nn.Module:
    return ExpertChoiceRouter(spec.hidden_size, spec.num_experts,
                              capacity_factor=float(spec.capacity_factor or spec.top_k),
                              num_regions=spec.num_regions)


def _modality(route_regions: bool) -> Callable[[RouterSpec, GroupedExperts], nn.Module]:
    def build(spec: RouterSpec, experts: GroupedExperts) -> nn.Module:
        return ModalityRouter(spec.hidden_size, spec.num_experts, spec.top_k,
                              image_experts=spec.image_experts, route_regions=route_regions,
                              region_experts=spec.region_experts if route_regions else None,
                              num_regions=spec.num_regions, normalize=spec.normalize,
                              jitter=spec.jitter, capacity_factor=spec.capacity_factor)

    build.__name__ = "_modality_region" if route_regions else "_modality"
    return build


def _soft(spec: RouterSpec, experts: GroupedExperts) -> nn.Module:
    return SoftMoE(experts=experts, slots_per_expert=spec.slots_per_expert,
                   num_regions=spec.num_regions)


ROUTERS: Registry[RouterEntry] = Registry("router")
"""Routers by name; register a :class:`RouterEntry` to add one."""
ROUTERS.register("topk", RouterEntry(_topk, causal=True, bias_balancing=True))
ROUTERS.register("region_hard", RouterEntry(_region(RegionHardRouter), causal=True,
                                            bias_balancing=True))
ROUTERS.register("region_soft", RouterEntry(_region(RegionSoftRouter), causal=True,
                                            bias_balancing=True))
ROUTERS.register("modality", RouterEntry(_modality(False), causal=True, modality=True))
ROUTERS.register("modality_region", RouterEntry(_modality(True), causal=True, modality=True))
ROUTERS.register("expert_choice", RouterEntry(_expert_choice, causal=False))
ROUTERS.register("soft", RouterEntry(_soft, causal=False, layer=True))


def causal_routers() -> tuple[str, ...]:
    """The registered routers usable in a causal LM."""
    return tuple(name for name, entry in ROUTERS.items() if entry.causal)


CAUSAL_ROUTERS = causal_routers()
"""The built-in causal routers (:func:`causal_routers` includes ones registered later)."""


def build_moe_layer(
    hidden_size: int,
    intermediate_size: int,
    num_experts: int,
    top_k: int,
    router: str = "topk",
    backend: str = "grouped_mm",
    shared_expert_size: int | None = None,
    dense_branch_size: int | None = None,
    num_regions: int = 7,
    normalize_topk: bool = True,
    *,
    activation: str = "swiglu",
    shared_expert_gate: bool = True,
    region_experts: Sequence[Sequence[int]] | None = None,
    jitter: float = 0.0,
    capacity_factor: float | None = None,
    slots_per_expert: int = 1,
    causal: bool = False,
    bias_update_rate: float = 0.0,
    path_mixer_bias: bool = False,
    image_experts: int | Sequence[int] | None = None,
) -> nn.Module:
    """Build an MoE feed-forward layer: the router from :data:`ROUTERS`, the experts with a
    backend from :data:`~echomoe.moe.experts.EXPERT_BACKENDS`, plus the optional shared expert
    and dense branch.

    Args:
        hidden_size: ``D``.
        intermediate_size: ``F``, the width of *one* routed expert.
        num_experts: ``E``.
        top_k: experts per token (for ``expert_choice`` the capacity factor defaults to it).
        router: a name registered in :data:`ROUTERS`.
        backend: expert dispatch, a name registered in
            :data:`~echomoe.moe.experts.EXPERT_BACKENDS`.
        shared_expert_size: width of an always-on shared expert (``None`` = none).
        dense_branch_size: width of the dense branch of an EchoVLM dual path (``None`` = none).
        num_regions: ``R``, the number of anatomical regions router ids may take.
        normalize_topk: renormalise the top-k weights to sum to 1.
        activation: expert activation (``swiglu``, ``geglu``, ``gelu``, ...).
        shared_expert_gate: scale the shared expert by a per-token sigmoid gate.
        region_experts: per-region expert lists for the region routers.
        jitter: router input jitter in training.
        capacity_factor: token-choice capacity (``None`` = dropless) or expert-choice capacity.
        slots_per_expert: soft MoE slots per expert.
        causal: the layer will sit in a causal model; non-causal routers then refuse.
        bias_update_rate: auxiliary-loss-free load balancing by a selection bias (routers with
            ``bias_balancing``: ``topk``, the region routers; see
            :class:`~echomoe.moe.routers.TopKRouter`); 0 = off.
        path_mixer_bias: give the dual path's ``Linear(D, 2)`` mixer a bias (as EchoVLM).
        image_experts: the image expert group of the ``modality`` / ``modality_region``
            routers (a count taken from the end, or expert ids; default half);
            see :func:`~echomoe.moe.modality.split_experts`.

    Returns an :class:`~echomoe.moe.layer.MoELayer` (or :class:`~echomoe.moe.soft_moe.SoftMoE`
    for ``router="soft"``) exposing ``router.weight [E, D]`` and ``experts.gate_up_proj
    [E, 2F, D]`` / ``experts.down_proj [E, D, F]``.
    """
    entry = ROUTERS[router]
    if causal and not entry.causal:
        raise ValueError(
            f"router {router!r} is not causal and cannot be used in a causal model; "
            f"causal routers: {', '.join(causal_routers())}"
        )
    if bias_update_rate and not entry.bias_balancing:
        raise ValueError(f"bias_update_rate applies to token-choice routers "
                         f"({', '.join(n for n, e in ROUTERS.items() if e.bias_balancing)}), "
                         f"not {router!r}")
    if image_experts is not None and not entry.modality:
        raise ValueError(f"image_experts applies to the modality routers "
                         f"({', '.join(n for n, e in ROUTERS.items() if e.modality)}), "
                         f"not {router!r}")
    experts = GroupedExperts(
        num_experts, hidden_size, intermediate_size, activation=activation, backend=backend
    )
    spec = RouterSpec(hidden_size, num_experts, top_k, num_regions=num_regions,
                      normalize=normalize_topk, region_experts=region_experts, jitter=jitter,
                      capacity_factor=capacity_factor, bias_update_rate=bias_update_rate,
                      slots_per_expert=slots_per_expert, image_experts=image_experts)
    if entry.layer:
        return entry.build(spec, experts)
    shared = None
    if shared_expert_size:
        shared_mlp = make_mlp(hidden_size, shared_expert_size, activation)
        shared = SharedExpert(shared_mlp, hidden_size, gated=shared_expert_gate)
    dense = make_mlp(hidden_size, dense_branch_size, activation) if dense_branch_size else None
    return MoELayer(router=entry.build(spec, experts), experts=experts, shared_expert=shared,
                    dense_branch=dense, path_mixer_bias=path_mixer_bias)


def build_dense_ffn(hidden_size: int, intermediate_size: int, activation: str = "swiglu"):
    """A dense FFN returning :class:`~echomoe.moe.layer.MoEOutput` (the MoE layer's twin)."""
    return DenseFFN(make_mlp(hidden_size, intermediate_size, activation))


def equal_active_expert_size(
    dense_size: int, top_k: int, shared_expert_size: int = 0, dense_branch_size: int = 0
) -> int:
    """Expert width giving the same active FFN parameters per token as a dense FFN.

    A token sees ``top_k`` experts of width ``F_e`` plus any shared expert and dense branch, so
    ``F_e = (F - S - F_dense) / k``.  Raises if that is not a positive integer.
    """
    rest = dense_size - shared_expert_size - dense_branch_size
    if rest <= 0 or rest % top_k:
        raise ValueError(
            f"cannot split dense width {dense_size} into top_k={top_k} experts after shared "
            f"expert {shared_expert_size} and dense branch {dense_branch_size}: "
            f"{rest} is not a positive multiple of {top_k}"
        )
    return rest // top_k


def count_parameters(module: nn.Module) -> dict[str, int]:
    """Total parameters and parameters *active* for one token.

    Routed experts count ``k / E`` of their parameters as active (``k`` = the router's
    ``active_experts_per_token``); everything else, routers and gates included, counts fully.
    Returns ``{"total", "active", "router"}`` (``router`` = router and gate parameters).
    """
    total = sum(p.numel() for p in module.parameters())
    inactive = 0.0
    router = 0
    for m in module.modules():
        if isinstance(m, MoELayer):
            expert_params = sum(p.numel() for p in m.experts.parameters())
            share = m.router.active_experts_per_token / m.experts.num_experts
            inactive += expert_params * (1.0 - min(share, 1.0))
            router += sum(p.numel() for p in m.router.parameters())
            if m.path_mixer is not None:
                router += sum(p.numel() for p in m.path_mixer.parameters())
            if isinstance(m.shared_expert, SharedExpert) and m.shared_expert.gate is not None:
                router += m.shared_expert.gate.weight.numel()
        elif isinstance(m, SoftMoE):
            router += m.slot_embeds.numel()
    return {"total": total, "active": int(round(total - inactive)), "router": router}
