"""Sparse upcycling: turn dense FFNs, and whole HF causal LMs, into mixtures of experts.

* :func:`upcycle_ffn` copies one dense MLP into ``E`` experts (Komatsuzaki et al., 2023), with
  optional noise so that the copies can diverge.
* :func:`moefy` replaces the ``mlp`` of chosen decoder layers of any ``transformers`` causal LM
  with ``model.layers[i].mlp`` (Qwen2, Llama, Mistral, ...) by an MoE layer, and returns the
  :class:`~echomoe.moe.context.RoutingContext` that carries region ids in and aux losses out.

With ``noise_std=0`` and renormalised top-k weights every routed combination of identical
experts equals the dense MLP, so an upcycled model computes exactly what the dense one did.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from echomoe.moe.builders import build_moe_layer
from echomoe.moe.context import MoEAdapter, RoutingContext
from echomoe.moe.experts import GroupedExperts
from echomoe.moe.layer import MoELayer

_PROBE = torch.linspace(-4.0, 4.0, 17)
_KNOWN_ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}


def _identify_activation(fn) -> str:
    """Name of an elementwise activation module/function, found by evaluating it."""
    with torch.no_grad():
        got = fn(_PROBE.clone())
    for name, ref in _KNOWN_ACTIVATIONS.items():
        if torch.allclose(got, ref(_PROBE), atol=1e-6):
            return name
    raise ValueError(
        f"cannot upcycle an MLP with activation {fn!r}: supported are "
        f"{', '.join(_KNOWN_ACTIVATIONS)} (exact GELU, not the tanh approximation)"
    )


def describe_mlp(mlp: nn.Module) -> tuple[str, list[nn.Linear]]:
    """``(activation, [linear layers])`` of a dense MLP echomoe knows how to upcycle.

    Gated (``gate_proj``, ``up_proj``, ``down_proj``; Llama/Qwen2/Mistral or
    :class:`~echomoe.moe.mlp.GatedMLP`) -> ``swiglu``/``geglu`` and ``[gate, up, down]``;
    two-layer (``fc1``, ``fc2``, as in ViT/CLIP, or ``nn.Sequential(Linear, act, Linear)``) ->
    ``gelu``/``relu``/``silu`` and ``[fc1, fc2]``.
    """
    if all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
        if isinstance(getattr(mlp, "activation", None), str):
            return mlp.activation, [mlp.gate_proj, mlp.up_proj, mlp.down_proj]
        act = getattr(mlp, "act_fn", None) or getattr(mlp, "act", None)
        if act is None:
            raise ValueError(f"{type(mlp).__name__} has gate/up/down projections but no act_fn")
        gated = {"silu": "swiglu", "gelu": "geglu"}.get(_identify_activation(act))
        if gated is None:
            raise ValueError(f"gated MLP with activation {act!r} is not supported (silu, gelu)")
        return gated, [mlp.gate_proj, mlp.up_proj, mlp.down_proj]
    if hasattr(mlp, "fc1") and hasattr(mlp, "fc2"):
        if isinstance(getattr(mlp, "activation", None), str):
            return mlp.activation, [mlp.fc1, mlp.fc2]
        act = getattr(mlp, "activation_fn", None) or getattr(mlp, "act", None)
        if act is None:
            raise ValueError(f"{type(mlp).__name__} has fc1/fc2 but no activation_fn/act")
        return _identify_activation(act), [mlp.fc1, mlp.fc2]
    if isinstance(mlp, nn.Sequential):
        layers = [m for m in mlp if not isinstance(m, nn.Dropout)]
        if len(layers) == 3 and isinstance(layers[0], nn.Linear) and isinstance(
            layers[2], nn.Linear
        ):
            return _identify_activation(layers[1]), [layers[0], layers[2]]
    raise TypeError(
        f"cannot upcycle {type(mlp).__name__}: expected gate_proj/up_proj/down_proj, fc1/fc2, "
        "or nn.Sequential(Linear, activation, Linear)"
    )


def upcycle_ffn(
    dense_mlp: nn.Module,
    num_experts: int,
    noise_std: float = 0.0,
    *,
    backend: str = "grouped_mm",
    generator: torch.Generator | None = None,
) -> GroupedExperts:
    """``E`` experts initialised as copies of ``dense_mlp`` (plus ``N(0, noise_std^2)`` noise).

    Returns a :class:`~echomoe.moe.experts.GroupedExperts` of the dense MLP's width, on its
    device and dtype.
    """
    activation, linears = describe_mlp(dense_mlp)
    first, last = linears[0], linears[-1]
    hidden, width = first.in_features, first.out_features
    has_bias = any(lin.bias is not None for lin in linears)
    if has_bias and len(linears) == 3:
        raise ValueError("gated MLPs with biases are not supported for upcycling")
    experts = GroupedExperts(
        num_experts, hidden, width, activation=activation, backend=backend, bias=has_bias
    ).to(device=first.weight.device, dtype=first.weight.dtype)
    with torch.no_grad():
        w_in = torch.cat([lin.weight for lin in linears[:-1]], dim=0)  # [gate; up] or fc1
        experts.w_in.copy_(w_in.unsqueeze(0).expand_as(experts.w_in))
        experts.down_proj.copy_(last.weight.unsqueeze(0).expand_as(experts.down_proj))
        if has_bias:
            for param, lin in ((experts.in_bias, first), (experts.down_bias, last)):
                param.copy_(lin.bias if lin.bias is not None else torch.zeros_like(param[0]))
        if noise_std > 0:
            for param in experts.parameters():
                noise = torch.randn(
                    param.shape, generator=generator, device=param.device, dtype=param.dtype
                )
                param.add_(noise, alpha=noise_std)
    return experts


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    for candidate in (decoder, getattr(model, "model", None), model):
        layers = getattr(candidate, "layers", None)
        if isinstance(layers, nn.ModuleList) and all(hasattr(layer, "mlp") for layer in layers):
            return layers
    raise TypeError(
        f"{type(model).__name__} has no decoder layers with an `mlp` (expected "
        "model.model.layers[i].mlp as in Qwen2/Llama/Mistral)"
    )


def select_layers(num_layers: int, layers: str | int | Sequence[int]) -> list[int]:
    """Indices to convert: ``"all"``, every ``k``-th (int: layers k-1, 2k-1, ...), or a list."""
    if layers == "all":
        return list(range(num_layers))
    if isinstance(layers, int) and not isinstance(layers, bool):
        if layers < 1:
            raise ValueError(f"layers={layers}: every-k-th needs k >= 1")
        return [i for i in range(num_layers) if i % layers == layers - 1]
    if isinstance(layers, str):
        raise ValueError(f"layers={layers!r}: use 'all', an int k (every k-th), or a list of ints")
    chosen = sorted(set(int(i) for i in layers))
    bad = [i for i in chosen if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"layers {bad} out of range for a model with {num_layers} layers")
    return chosen


def moefy(
    model: nn.Module,
    layers: str | int | Sequence[int] = "all",
    *,
    upcycle: bool = True,
    noise_std: float = 0.0,
    generator: torch.Generator | None = None,
    **moe_kwargs,
) -> RoutingContext:
    """Replace the dense ``mlp`` of chosen decoder layers with MoE layers, in place.

    Args:
        model: an HF causal LM (or its base model) with ``layers[i].mlp``.
        layers: ``"all"``, ``k`` (every ``k``-th layer), or a list of layer indices.
        upcycle: initialise experts (and a shared expert / dense branch of the dense width) as
            copies of the dense MLP; otherwise they keep their random init.
        noise_std: upcycling noise.
        **moe_kwargs: passed to :func:`~echomoe.moe.builders.build_moe_layer`
            (``num_experts``, ``top_k``, ``router``, ``backend``, ``shared_expert_size``,
            ``dense_branch_size``, ``num_regions``, ...); ``intermediate_size`` defaults to the
            dense width.  Only causal routers are accepted.

    Returns the :class:`~echomoe.moe.context.RoutingContext` of the converted model.
    """
    for key in ("hidden_size", "causal", "activation"):
        if key in moe_kwargs:
            raise TypeError(f"moefy sets {key!r} itself from the model; do not pass it")
    decoder_layers = _decoder_layers(model)
    context = RoutingContext()
    for i in select_layers(len(decoder_layers), layers):
        dense = decoder_layers[i].mlp
        activation, linears = describe_mlp(dense)
        hidden, width = linears[0].in_features, linears[0].out_features
        kwargs = {"intermediate_size": width, **moe_kwargs}
        moe = build_moe_layer(hidden, activation=activation, causal=True, **kwargs)
        moe.to(device=linears[0].weight.device, dtype=linears[0].weight.dtype)
        if upcycle:
            _upcycle_into(moe, dense, width, noise_std, generator)
        decoder_layers[i].mlp = MoEAdapter(moe, context, name=f"layers.{i}")
    return context


def _upcycle_into(moe: MoELayer, dense: nn.Module, width: int, noise_std, generator) -> None:
    if moe.experts.intermediate_size != width:
        raise ValueError(
            f"upcycling copies the dense MLP (width {width}) into each expert, but "
            f"intermediate_size={moe.experts.intermediate_size}; pass upcycle=False to train "
            "experts of another width from scratch"
        )
    copied = upcycle_ffn(dense, moe.experts.num_experts, noise_std, generator=generator)
    moe.experts.load_state_dict(copied.state_dict())
    for part in (moe.dense_branch, getattr(moe.shared_expert, "mlp", None)):
        if part is not None and describe_mlp(part)[1][0].out_features == width:
            _copy_linears(dense, part)


def _copy_linears(src: nn.Module, dst: nn.Module) -> None:
    with torch.no_grad():
        for a, b in zip(describe_mlp(src)[1], describe_mlp(dst)[1], strict=True):
            b.weight.copy_(a.weight)
            if a.bias is not None and b.bias is not None:
                b.bias.copy_(a.bias)
