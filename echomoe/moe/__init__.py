"""Mixture-of-experts layers whose experts can be routed by anatomical region.

Quick tour::

    from echomoe.moe import build_moe_layer
    layer = build_moe_layer(256, 512, num_experts=8, top_k=2, router="region_hard")
    out = layer(hidden_states, region_ids)         # MoEOutput
    out.hidden_states, out.aux_losses, out.routing

Routers and expert backends are registries (:data:`ROUTERS`, :data:`EXPERT_BACKENDS`):
register an entry to add one without editing echomoe.
"""

from echomoe.moe.builders import (
    CAUSAL_ROUTERS,
    ROUTERS,
    RouterEntry,
    RouterSpec,
    build_dense_ffn,
    build_moe_layer,
    causal_routers,
    count_parameters,
    equal_active_expert_size,
)
from echomoe.moe.context import MoEAdapter, RoutingContext
from echomoe.moe.experts import (
    ACTIVATIONS,
    BACKENDS,
    EXPERT_BACKENDS,
    ExpertBackend,
    GroupedExperts,
)
from echomoe.moe.layer import DenseFFN, MoELayer, MoEOutput, RoutingInfo, SharedExpert
from echomoe.moe.losses import load_balancing_loss, region_alignment_loss, router_z_loss
from echomoe.moe.mlp import MLP, GatedMLP
from echomoe.moe.modality import ModalityRouter, split_experts
from echomoe.moe.registry import Registry
from echomoe.moe.routers import (
    ExpertChoiceOutput,
    ExpertChoiceRouter,
    RegionHardRouter,
    RegionSoftRouter,
    RouterOutput,
    TopKRouter,
)
from echomoe.moe.soft_moe import SoftMoE
from echomoe.moe.upcycle import moefy, upcycle_ffn

__all__ = [
    "ACTIVATIONS",
    "BACKENDS",
    "CAUSAL_ROUTERS",
    "EXPERT_BACKENDS",
    "ROUTERS",
    "DenseFFN",
    "ExpertChoiceOutput",
    "ExpertBackend",
    "ExpertChoiceRouter",
    "GatedMLP",
    "GroupedExperts",
    "MLP",
    "ModalityRouter",
    "MoEAdapter",
    "MoELayer",
    "MoEOutput",
    "RegionHardRouter",
    "RegionSoftRouter",
    "Registry",
    "RouterEntry",
    "RouterOutput",
    "RouterSpec",
    "RoutingContext",
    "RoutingInfo",
    "SharedExpert",
    "SoftMoE",
    "TopKRouter",
    "build_dense_ffn",
    "build_moe_layer",
    "causal_routers",
    "count_parameters",
    "equal_active_expert_size",
    "load_balancing_loss",
    "moefy",
    "region_alignment_loss",
    "router_z_loss",
    "split_experts",
    "upcycle_ffn",
]
