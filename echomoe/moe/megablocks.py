"""echomoe MoE layers <-> MegaBlocks' dropless ``dMoE`` (``megablocks.layers.dmoe.dMoE``).

MegaBlocks runs on CUDA only (it needs triton, stanford-stk and its compiled ops).  This
module keeps the *mapping* importable everywhere: the argument translation and the weight
conversion are plain tensor code, tested on CPU; only :func:`build_dmoe` imports megablocks.

**Arguments** (:func:`dmoe_arguments`) -- keyword arguments of
``megablocks.layers.arguments.Arguments``:

=============================== ===========================================================
echomoe                         MegaBlocks
=============================== ===========================================================
``hidden_size`` ``D``           ``hidden_size``
``intermediate_size`` ``F``     ``ffn_hidden_size`` (one expert)
``num_experts`` ``E``           ``moe_num_experts``
``top_k``                       ``moe_top_k``
``swiglu`` / ``geglu``          ``mlp_type="glu"``, ``activation_fn=silu`` / ``gelu``
``gelu`` / ``relu`` / ``silu``  ``mlp_type="mlp"`` with that ``activation_fn``
(grouped GEMMs)                 ``mlp_impl="grouped"``
``normalize_topk=True``         ``moe_normalize_expert_weights=1.0`` (divide by the L1 norm:
                                Mixtral's renormalisation; ``None`` when off)
``jitter``                      ``moe_jitter_eps`` (same ``U(1 - j, 1 + j)`` input noise)
``capacity_factor=None``        dropless: ``dMoE`` (a capacity is refused: use
                                ``megablocks.layers.moe.MoE`` or echomoe's own backends)
(no biases)                     ``bias=False`` (MegaBlocks has one bias shared by all
                                experts; echomoe's per-expert biases do not map)
=============================== ===========================================================

**Weights** (:func:`to_megablocks` / :func:`from_megablocks`, both directions, exact):

* router: echomoe ``router.weight [E, D]`` == ``router.layer.weight [E, D]``;
* gated: ``experts.gate_up_proj [E, 2F, D]`` = ``[gate | up]`` per expert ->
  ``experts.mlp.w1 = gate.reshape(E*F, D)``, ``experts.mlp.v1 = up.reshape(E*F, D)``;
* plain: ``experts.up_proj [E, F, D]`` -> ``experts.mlp.w1 [E*F, D]``;
* down: ``experts.down_proj [E, D, F]`` -> ``experts.mlp.w2 = down.transpose(1, 2)
  .reshape(E*F, D)`` (MegaBlocks computes ``h @ w2[e]`` with ``w2[e]`` of shape ``(F, D)``).

Only plain top-k MoE layers map (:class:`~echomoe.moe.routers.TopKRouter`, no shared expert,
no dense branch): region routing has no MegaBlocks counterpart.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_ACTIVATIONS: dict[str, tuple[str, Any]] = {
    "swiglu": ("glu", F.silu),
    "geglu": ("glu", F.gelu),
    "gelu": ("mlp", F.gelu),
    "relu": ("mlp", F.relu),
    "silu": ("mlp", F.silu),
}

GPU_ONLY_MESSAGE = (
    "MegaBlocks needs a CUDA GPU (and `pip install 'echomoe[megablocks]'`); this machine has "
    "none. Use backend='grouped_mm': same weights, same results, runs on CPU.")


def dmoe_arguments(
    *,
    hidden_size: int,
    intermediate_size: int,
    num_experts: int,
    top_k: int,
    activation: str = "swiglu",
    normalize_topk: bool = True,
    jitter: float = 0.0,
    capacity_factor: float | None = None,
    bias: bool = False,
    bf16: bool = False,
    load_balancing_weight: float = 0.0,
) -> dict[str, Any]:
    """Keyword arguments of ``megablocks.layers.arguments.Arguments`` for a dropless ``dMoE``
    equivalent to an echomoe top-k MoE layer (see the module table).

    Raises:
        ValueError: a setting MegaBlocks' ``dMoE`` cannot express (a capacity, per-expert
            biases, an unknown activation).
    """
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation {activation!r} has no MegaBlocks equivalent; valid: "
                         f"{', '.join(_ACTIVATIONS)}")
    if capacity_factor is not None:
        raise ValueError("MegaBlocks' dMoE is dropless; capacity_factor must be None (a "
                         "capacity-limited layer maps to megablocks.layers.moe.MoE instead)")
    if bias:
        raise ValueError("echomoe's per-expert biases do not map onto MegaBlocks (one bias "
                         "shared by all experts)")
    mlp_type, activation_fn = _ACTIVATIONS[activation]
    return {
        "hidden_size": int(hidden_size),
        "ffn_hidden_size": int(intermediate_size),
        "moe_num_experts": int(num_experts),
        "moe_top_k": int(top_k),
        "mlp_type": mlp_type,
        "mlp_impl": "grouped",
        "activation_fn": activation_fn,
        "moe_normalize_expert_weights": 1.0 if normalize_topk else None,
        "moe_jitter_eps": float(jitter) if jitter else None,
        "moe_capacity_factor": 1.0,
        "moe_loss_weight": float(load_balancing_weight),
        "bias": False,
        "return_bias": False,
        "bf16": bool(bf16),
        "fp16": False,
    }


def _check_layer(layer: nn.Module) -> None:
    from echomoe.moe.layer import MoELayer
    from echomoe.moe.routers import TopKRouter

    if not isinstance(layer, MoELayer) or type(layer.router) is not TopKRouter:
        raise ValueError("only a plain top-k MoELayer (router='topk') maps onto MegaBlocks' "
                         f"dMoE, got {type(layer).__name__} with "
                         f"{type(getattr(layer, 'router', None)).__name__}")
    if layer.shared_expert is not None or layer.dense_branch is not None:
        raise ValueError("a shared expert or a dense branch has no MegaBlocks dMoE equivalent")


def layer_arguments(layer: nn.Module, **overrides: Any) -> dict[str, Any]:
    """:func:`dmoe_arguments` read off an echomoe ``MoELayer`` (``overrides``: ``bf16``,
    ``load_balancing_weight``)."""
    _check_layer(layer)
    experts, router = layer.experts, layer.router
    return dmoe_arguments(
        hidden_size=experts.hidden_size, intermediate_size=experts.intermediate_size,
        num_experts=experts.num_experts, top_k=router.top_k, activation=experts.activation,
        normalize_topk=router.normalize, jitter=router.jitter,
        capacity_factor=router.capacity_factor, bias=experts.in_bias is not None, **overrides)


def to_megablocks(state: dict[str, Tensor], *, activation: str = "swiglu") -> dict[str, Tensor]:
    """Convert an echomoe MoE layer state (keys ``router.weight``, ``experts.gate_up_proj`` or
    ``experts.up_proj``, ``experts.down_proj``) to a ``dMoE`` state dict (``router.layer
    .weight``, ``experts.mlp.w1`` [, ``experts.mlp.v1``], ``experts.mlp.w2``)."""
    gated = _ACTIVATIONS[activation][0] == "glu"
    down = state["experts.down_proj"]  # (E, D, F)
    e, d, f = down.shape
    out = {"router.layer.weight": state["router.weight"].clone()}
    if gated:
        gate, up = state["experts.gate_up_proj"].split(f, dim=1)  # (E, F, D) each
        out["experts.mlp.w1"] = gate.reshape(e * f, d).clone()
        out["experts.mlp.v1"] = up.reshape(e * f, d).clone()
    else:
        out["experts.mlp.w1"] = state["experts.up_proj"].reshape(e * f, d).clone()
    out["experts.mlp.w2"] = down.transpose(1, 2).reshape(e * f, d).contiguous()
    return out


def from_megablocks(state: dict[str, Tensor], *, num_experts: int,
                    activation: str = "swiglu") -> dict[str, Tensor]:
    """Inverse of :func:`to_megablocks`: a ``dMoE`` state dict -> echomoe layer state."""
    gated = _ACTIVATIONS[activation][0] == "glu"
    w2 = state["experts.mlp.w2"]  # (E*F, D)
    rows, d = w2.shape
    if rows % num_experts:
        raise ValueError(f"experts.mlp.w2 has {rows} rows, not a multiple of {num_experts}")
    f = rows // num_experts
    out = {"router.weight": state["router.layer.weight"].clone(),
           "experts.down_proj": w2.view(num_experts, f, d).transpose(1, 2).contiguous()}
    w1 = state["experts.mlp.w1"].view(num_experts, f, d)
    if gated:
        v1 = state["experts.mlp.v1"].view(num_experts, f, d)
        out["experts.gate_up_proj"] = torch.cat([w1, v1], dim=1).contiguous()
    else:
        out["experts.up_proj"] = w1.clone()
    return out


def layer_state(layer: nn.Module) -> dict[str, Tensor]:
    """The echomoe tensors :func:`to_megablocks` reads, from an ``MoELayer``."""
    experts = layer.experts
    name = "gate_up_proj" if experts.gated else "up_proj"
    return {"router.weight": layer.router.weight.detach(),
            f"experts.{name}": experts.w_in.detach(),
            "experts.down_proj": experts.down_proj.detach()}


def build_dmoe(layer: nn.Module, **overrides: Any) -> nn.Module:
    """A MegaBlocks ``dMoE`` on the current CUDA device with ``layer``'s weights (GPU only).

    The ``dMoE`` takes ``(batch, tokens, D)`` and returns its output (``return_bias=False``).

    Raises:
        RuntimeError: no CUDA device or megablocks not installed (use ``grouped_mm``).
    """
    if not torch.cuda.is_available():
        raise RuntimeError(GPU_ONLY_MESSAGE)
    try:
        from megablocks.layers.arguments import Arguments
        from megablocks.layers.dmoe import dMoE
    except ImportError as err:
        raise RuntimeError(GPU_ONLY_MESSAGE) from err
    args = layer_arguments(layer, **overrides)
    dtype = torch.bfloat16 if args["bf16"] else torch.float32
    module = dMoE(Arguments(**args, device=torch.cuda.current_device()))
    state = to_megablocks(layer_state(layer), activation=layer.experts.activation)
    module.load_state_dict({k: v.to("cuda", dtype) for k, v in state.items()}, strict=False)
    return module
