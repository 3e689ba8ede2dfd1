"""EchoVLM's decoder-layer FFN as an echomoe :class:`~echomoe.moe.layer.MoELayer`.

EchoVLM (Qwen2-VL based) keeps every decoder layer's pretrained dense ``mlp`` and adds beside it
a Qwen2-MoE block (``moe``: 4 experts, top-2, ``norm_topk_prob=False``, a shared expert scaled
by a sigmoid gate) and a per-token ``coefficient = Linear(D, 2)`` with bias::

    c = softmax(coefficient(x))
    y = c[..., 0] * moe(x) + c[..., 1] * mlp(x)

echomoe's dual path computes ``c_0 * dense_branch(x) + c_1 * experts(x)``: the same function
with the two mixer rows swapped.  :func:`echovlm_layer` builds that layer from EchoVLM's three
modules (weights shared, nothing copied but the mixer and the stacked experts), and
:func:`convert_echovlm_state_dict` renames an EchoVLM checkpoint's keys to the layout of a model
converted by ``moefy(..., keep_dense=True)`` (the ``echovlm`` variant).

EchoVLM's ``router_aux_loss_coef = 0.001`` multiplies transformers' Qwen2-MoE balance loss,
which is ``k`` times echomoe's (``moe_balance``), hence the variant's weight ``0.001 * k``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from echomoe.moe.experts import GroupedExperts
from echomoe.moe.layer import MoELayer, SharedExpert
from echomoe.moe.mlp import GatedMLP
from echomoe.moe.routers import TopKRouter


def _expert_weights(experts: nn.Module) -> tuple[Tensor, Tensor]:
    """``(gate_up [E, 2F, D], down [E, D, F])`` of transformers' 3-D ``Qwen2MoeExperts`` or of
    a ``ModuleList`` of ``Qwen2MoeMLP`` (the layout of EchoVLM's own code)."""
    if hasattr(experts, "gate_up_proj"):
        return experts.gate_up_proj.data, experts.down_proj.data
    gate_up = torch.stack([torch.cat([m.gate_proj.weight, m.up_proj.weight]) for m in experts])
    down = torch.stack([m.down_proj.weight for m in experts])
    return gate_up.data, down.data


def echovlm_layer(mlp: nn.Module, moe_block: nn.Module, coefficient: nn.Linear, *,
                  top_k: int = 2, normalize_topk: bool = False, num_regions: int = 7,
                  backend: str = "grouped_mm") -> MoELayer:
    """The :class:`MoELayer` equal to EchoVLM's ``(mlp, moe, coefficient)`` of one layer.

    Args:
        mlp: the layer's dense MLP; becomes the dense branch (the same module, not a copy).
        moe_block: a Qwen2-MoE sparse block (``gate``, ``experts``, ``shared_expert``,
            ``shared_expert_gate``), transformers' or EchoVLM's own.
        coefficient: the ``Linear(D, 2)`` path mixer; row 0 weighs the MoE block.
        top_k, normalize_topk: the block's routing (EchoVLM: 2, ``False``).
        num_regions: region ids the router accepts (EchoVLM's router ignores them).
        backend: expert dispatch backend.
    """
    gate_up, down = _expert_weights(moe_block.experts)
    num_experts, width2, hidden = gate_up.shape
    router = TopKRouter(hidden, num_experts, top_k, normalize=normalize_topk,
                        num_regions=num_regions)
    experts = GroupedExperts(num_experts, hidden, width2 // 2, backend=backend)
    shared_mlp = moe_block.shared_expert
    shared = SharedExpert(GatedMLP(hidden, shared_mlp.gate_proj.out_features), hidden)
    layer = MoELayer(router=router, experts=experts, shared_expert=shared, dense_branch=mlp,
                     path_mixer_bias=coefficient.bias is not None)
    with torch.no_grad():
        router.weight.copy_(moe_block.gate.weight)
        experts.gate_up_proj.copy_(gate_up)
        experts.down_proj.copy_(down)
        shared.mlp.load_state_dict(shared_mlp.state_dict())
        shared.gate.weight.copy_(moe_block.shared_expert_gate.weight)
        layer.path_mixer.weight.copy_(coefficient.weight.flip(0))
        if coefficient.bias is not None:
            layer.path_mixer.bias.copy_(coefficient.bias.flip(0))
    return layer.to(device=gate_up.device, dtype=gate_up.dtype)


_LAYER_KEY = re.compile(r"^(?P<prefix>.*layers\.\d+\.)(?P<part>mlp|moe|coefficient)\.(?P<rest>.+)$")
_EXPERT_KEY = re.compile(r"^experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def convert_echovlm_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """EchoVLM checkpoint keys -> the keys of ``moefy(lm, keep_dense=True, ...)``.

    Per decoder layer ``...layers.{i}.``: ``mlp.*`` -> ``mlp.moe.dense_branch.*``;
    ``moe.gate.weight`` -> ``mlp.moe.router.weight``; experts (per-expert ``Qwen2MoeMLP``
    weights, or transformers' stacked ``gate_up_proj`` / ``down_proj``) ->
    ``mlp.moe.experts.gate_up_proj [E, 2F, D]`` / ``down_proj [E, D, F]``;
    ``moe.shared_expert.*`` -> ``mlp.moe.shared_expert.mlp.*``; ``moe.shared_expert_gate`` ->
    ``mlp.moe.shared_expert.gate``; ``coefficient.{weight,bias}`` -> ``mlp.moe.path_mixer``
    with the two rows swapped.  Every other key is kept as it is.  Raises a ``ValueError``
    naming the key for an expert list with gaps or a key of the block it does not know.
    """
    out: dict[str, Tensor] = {}
    experts: dict[str, dict[int, dict[str, Tensor]]] = {}
    for key, value in state_dict.items():
        match = _LAYER_KEY.match(key)
        if match is None:
            out[key] = value
            continue
        prefix, part, rest = match["prefix"], match["part"], match["rest"]
        target = f"{prefix}mlp.moe."
        if part == "mlp":
            out[f"{target}dense_branch.{rest}"] = value
        elif part == "coefficient":
            out[f"{target}path_mixer.{rest}"] = value.flip(0)
        elif rest == "gate.weight":
            out[f"{target}router.weight"] = value
        elif rest.startswith("shared_expert_gate."):
            out[f"{target}shared_expert.gate.{rest.split('.', 1)[1]}"] = value
        elif rest.startswith("shared_expert."):
            out[f"{target}shared_expert.mlp.{rest.split('.', 1)[1]}"] = value
        elif rest in ("experts.gate_up_proj", "experts.down_proj"):
            out[f"{target}{rest}"] = value
        elif (expert := _EXPERT_KEY.match(rest)) is not None:
            experts.setdefault(target, {}).setdefault(int(expert[1]), {})[expert[2]] = value
        else:
            raise ValueError(f"{key}: not a part of EchoVLM's MoE block this converter knows")
    for target, per_expert in experts.items():
        if sorted(per_expert) != list(range(len(per_expert))) or any(
                len(w) != 3 for w in per_expert.values()):
            raise ValueError(f"{target}experts: expected gate/up/down weights for experts "
                             f"0..{len(per_expert) - 1}, got {sorted(per_expert)}")
        ordered = [per_expert[e] for e in range(len(per_expert))]
        out[f"{target}experts.gate_up_proj"] = torch.stack(
            [torch.cat([w["gate_proj"], w["up_proj"]]) for w in ordered])
        out[f"{target}experts.down_proj"] = torch.stack([w["down_proj"] for w in ordered])
    return out
