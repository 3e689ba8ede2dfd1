"""Sparse upcycling: turn dense FFNs, and whole HF causal LMs, into mixtures of experts.

* :func:`upcycle_ffn` turns one dense MLP into ``E`` experts: copies of it (sparse upcycling,
  Komatsuzaki et al., 2023), or, for experts narrower than the MLP, slices of its hidden units
  (``F/k`` slices for equal-active experts; a partition into ``E`` experts, MoEfication, Zhang
  et al., 2022), with optional noise so that the experts can diverge.
* :func:`moefy` replaces the ``mlp`` of chosen decoder layers of any ``transformers`` causal LM
  with ``model.layers[i].mlp`` (Qwen2, Llama, Mistral, ...) by an MoE layer (optionally keeping
  the pretrained MLP as the dense branch, EchoVLM's block), and returns the
  :class:`~echomoe.moe.context.RoutingContext` that carries region ids in and aux losses out.

With ``noise_std=0`` every routed combination of identical copies equals the dense MLP, so a
model upcycled with copies computes exactly what the dense one did; with slices it does so when
a token's experts hold every slice once (see :func:`moefy`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from echomoe.moe.builders import build_moe_layer
from echomoe.moe.context import MoEAdapter, RoutingContext
from echomoe.moe.experts import GroupedExperts
from echomoe.moe.layer import MoELayer
from echomoe.moe.routers import RegionHardRouter

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


@dataclass
class _Neurons:
    """A dense MLP seen as ``F`` hidden units: input rows, output columns, biases."""

    w_in: list[Tensor]  # each (F, D): [gate, up] (gated) or [fc1]
    b_in: Tensor | None  # (F,), plain MLPs only
    w_out: Tensor  # (D, F)
    b_out: Tensor | None  # (D,)

    @property
    def width(self) -> int:
        return self.w_out.shape[1]

    def rows(self, start: int, stop: int) -> Tensor:
        """Input rows of units ``[start, stop)``: ``[gate; up]`` or ``fc1`` stacked."""
        return torch.cat([w[start:stop] for w in self.w_in], dim=0)


def _neurons(mlp: nn.Module) -> tuple[str, _Neurons]:
    activation, linears = describe_mlp(mlp)
    if len(linears) == 3 and any(lin.bias is not None for lin in linears):
        raise ValueError("gated MLPs with biases are not supported for upcycling")
    first, last = linears[0], linears[-1]
    return activation, _Neurons([lin.weight for lin in linears[:-1]], first.bias, last.weight,
                                last.bias)


def num_slices(dense_width: int, expert_width: int, num_experts: int) -> int:
    """``S = dense_width / expert_width``: how many disjoint neuron slices the experts copy.

    Raises a ``ValueError`` unless ``expert_width`` divides ``dense_width`` into at most
    ``num_experts`` slices (with more, some dense units would be in no expert)."""
    if expert_width < 1 or dense_width % expert_width:
        raise ValueError(f"expert width {expert_width} does not divide the dense width "
                         f"{dense_width} into slices; upcycling needs F_e | F (or upcycle=False)")
    slices = dense_width // expert_width
    if slices > num_experts:
        raise ValueError(f"{slices} slices of width {expert_width} do not fit in {num_experts} "
                         "experts: widen the experts or add experts (or upcycle=False)")
    return slices


def _fill_experts(experts: GroupedExperts, neurons: _Neurons, start: int, stop: int,
                  scale: float) -> int:
    """Expert ``e`` <- units ``start + [s F_e, (s+1) F_e)`` with ``s = e mod S``; down rows
    times ``scale``; the output bias is shared out so that ``k`` picks add it once.
    Returns ``S``."""
    width = experts.intermediate_size
    slices = num_slices(stop - start, width, experts.num_experts)
    with torch.no_grad():
        for e in range(experts.num_experts):
            a = start + (e % slices) * width
            experts.w_in[e].copy_(neurons.rows(a, a + width))
            experts.down_proj[e].copy_(neurons.w_out[:, a:a + width] * scale)
            if experts.in_bias is not None:
                experts.in_bias[e].copy_(neurons.b_in[a:a + width] if neurons.b_in is not None
                                         else torch.zeros_like(experts.in_bias[e]))
                experts.down_bias[e].copy_(neurons.b_out * (scale / slices)
                                           if neurons.b_out is not None
                                           else torch.zeros_like(experts.down_bias[e]))
    return slices


def _add_noise(module: nn.Module, noise_std: float, generator: torch.Generator | None) -> None:
    if noise_std <= 0:
        return
    with torch.no_grad():
        for param in module.parameters():
            noise = torch.randn(param.shape, generator=generator, device=param.device,
                                dtype=param.dtype)
            param.add_(noise, alpha=noise_std)


def upcycle_ffn(
    dense_mlp: nn.Module,
    num_experts: int,
    noise_std: float = 0.0,
    *,
    intermediate_size: int | None = None,
    output_scale: float = 1.0,
    backend: str = "grouped_mm",
    generator: torch.Generator | None = None,
) -> GroupedExperts:
    """``E`` experts initialised from ``dense_mlp`` (plus ``N(0, noise_std^2)`` noise).

    Args:
        dense_mlp: the dense MLP (see :func:`describe_mlp`) of width ``F``.
        num_experts: ``E``.
        noise_std: standard deviation of the noise added to every expert weight.
        intermediate_size: ``F_e``, the width of one expert; ``None`` or ``F``: every expert is
            a copy of the whole MLP (sparse upcycling).  ``F_e < F`` dividing ``F``: the dense
            units are cut into ``S = F / F_e`` contiguous slices and expert ``e`` holds slice
            ``e mod S`` (``S = k``: *F/k slices*, experts of the equal-active width, each slice
            in ``E / k`` experts; ``S = E``: a partition of the units, *MoEfication*).
        output_scale: factor on every expert's down projection (:func:`moefy` sets it so that
            the routed sum reproduces the dense output, see :func:`slice_scale`); expert output
            biases are ``b * output_scale / S``.

    Returns a :class:`~echomoe.moe.experts.GroupedExperts` on the dense MLP's device and dtype.
    """
    activation, neurons = _neurons(dense_mlp)
    width = neurons.width
    expert_width = width if intermediate_size is None else int(intermediate_size)
    experts = GroupedExperts(
        num_experts, neurons.w_in[0].shape[1], expert_width, activation=activation,
        backend=backend, bias=neurons.b_in is not None or neurons.b_out is not None,
    ).to(device=neurons.w_out.device, dtype=neurons.w_out.dtype)
    _fill_experts(experts, neurons, 0, width, output_scale)
    _add_noise(experts, noise_std, generator)
    return experts


def _uniform_weight(router: nn.Module) -> float:
    """The combine weight each of a token's ``k`` experts gets from a uniform router."""
    if router.normalize:
        return 1.0 / router.top_k
    mask = getattr(router, "region_mask", None)
    if isinstance(router, RegionHardRouter) and mask is not None:
        sizes = set(mask.sum(dim=1).tolist())
        if len(sizes) != 1:
            raise ValueError("upcycling into slices with normalize_topk=False needs region "
                             "expert groups of one size")
        return 1.0 / sizes.pop()
    return 1.0 / router.num_experts


def slice_scale(slices: int, router: nn.Module) -> float:
    """``S / (k w)``: the down-projection factor under which ``k`` experts of ``S`` slices,
    each weighted ``w`` by a uniform router (:func:`_uniform_weight`), add up to the dense MLP
    when they hold every slice once (``S = k``), and do so in expectation over uniformly
    chosen experts otherwise (``S = E``)."""
    return slices / (router.top_k * _uniform_weight(router))


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ``nn.ModuleList`` of decoder layers (each with an ``mlp``) of an HF causal LM."""
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
    keep_dense: bool = False,
    generator: torch.Generator | None = None,
    **moe_kwargs,
) -> RoutingContext:
    """Replace the dense ``mlp`` of chosen decoder layers with MoE layers, in place.

    Args:
        model: an HF causal LM (or its base model) with ``layers[i].mlp``.
        layers: ``"all"``, ``k`` (every ``k``-th layer), or a list of layer indices.
        upcycle: initialise the experts from the dense MLP (:func:`upcycle_ffn`: copies when
            they are as wide, slices when narrower), see "Upcycling" below; otherwise they
            keep their random init.
        noise_std: upcycling noise on the experts.
        keep_dense: EchoVLM's block: the layer's own (pretrained) MLP module becomes the dense
            branch of the dual path, beside the new experts (give no ``dense_branch_size``);
            ``path_mixer_bias=True`` gives the mixer EchoVLM's bias.
        **moe_kwargs: passed to :func:`~echomoe.moe.builders.build_moe_layer`
            (``num_experts``, ``top_k``, ``router``, ``backend``, ``shared_expert_size``,
            ``dense_branch_size``, ``num_regions``, ...); ``intermediate_size`` defaults to the
            dense width.  Only causal routers are accepted.

    Upcycling splits the ``F`` dense units between the parts so that, at ``noise_std=0``, the
    layer computes what the dense MLP did (exactly, or as closely as routing allows):

    * a dense branch as wide as the MLP is a copy (kept: the MLP itself); a narrower one takes
      the first ``F_d`` units and the experts path the rest, the mixer starts at zero (both
      paths weighted 1/2) and both are scaled by 2;
    * a shared expert takes the next ``S`` units (its sigmoid gate starts at zero, i.e. 1/2,
      and its down projection is doubled);
    * the routed experts share the remaining units as copies or slices (:func:`upcycle_ffn`),
      scaled by :func:`slice_scale`.  With slices, the router starts at zero, so every combine
      weight is uniform: a region-hard router whose groups are ``k`` consecutive experts then
      reproduces the dense output exactly (each group holds every slice once); a top-k router
      is exact when its top-k holds every slice, and otherwise misses some units and doubles
      others (``experiments/benchmarks/upcycle_fidelity.py`` measures how close).

    Returns the :class:`~echomoe.moe.context.RoutingContext` of the converted model.
    """
    for key in ("hidden_size", "causal", "activation"):
        if key in moe_kwargs:
            raise TypeError(f"moefy sets {key!r} itself from the model; do not pass it")
    if keep_dense and moe_kwargs.get("dense_branch_size"):
        raise ValueError("keep_dense makes each layer's own MLP the dense branch; do not also "
                         "pass dense_branch_size")
    layers_of_model = decoder_layers(model)
    context = RoutingContext()
    for i in select_layers(len(layers_of_model), layers):
        dense = layers_of_model[i].mlp
        activation, linears = describe_mlp(dense)
        hidden, width = linears[0].in_features, linears[0].out_features
        kwargs = {"intermediate_size": width, **moe_kwargs}
        mixer_bias = kwargs.pop("path_mixer_bias", False) if keep_dense else False
        moe = build_moe_layer(hidden, activation=activation, causal=True, **kwargs)
        if keep_dense:
            moe = MoELayer(router=moe.router, experts=moe.experts,
                           shared_expert=moe.shared_expert, dense_branch=dense,
                           path_mixer_bias=mixer_bias)
        moe.to(device=linears[0].weight.device, dtype=linears[0].weight.dtype)
        if upcycle:
            _upcycle_into(moe, dense, noise_std, generator)
        layers_of_model[i].mlp = MoEAdapter(moe, context, name=f"layers.{i}")
    return context


def _upcycle_into(moe: MoELayer, dense: nn.Module, noise_std, generator) -> None:
    """Initialise ``moe``'s parts from ``dense`` (the rules in :func:`moefy`)."""
    _, neurons = _neurons(dense)
    width = neurons.width
    start, scale = 0, 1.0
    branch = moe.dense_branch
    if branch is not None and branch is not dense:
        branch_width = describe_mlp(branch)[1][0].out_features
        if branch_width == width:
            _load_part(branch, neurons, 0, width, 1.0, with_bias=True)
        elif branch_width < width:
            _load_part(branch, neurons, 0, branch_width, 2.0, with_bias=False)
            start, scale = branch_width, 2.0
            with torch.no_grad():
                for param in moe.path_mixer.parameters():
                    param.zero_()
        else:
            raise ValueError(f"dense branch width {branch_width} exceeds the dense width {width}")
    shared = moe.shared_expert
    if shared is not None:
        shared_width = describe_mlp(shared.mlp)[1][0].out_features
        if start + shared_width >= width:
            raise ValueError(
                f"a shared expert of width {shared_width} leaves no dense units for the routed "
                f"experts (dense width {width}, {start} in the dense branch): narrow it, or "
                "upcycle=False")
        gated = shared.gate is not None
        _load_part(shared.mlp, neurons, start, start + shared_width,
                   scale * (2.0 if gated else 1.0), with_bias=False)
        if gated:
            with torch.no_grad():
                shared.gate.weight.zero_()
        start += shared_width
    experts = moe.experts
    slices = num_slices(width - start, experts.intermediate_size, experts.num_experts)
    factor = scale * slice_scale(slices, moe.router)
    _fill_experts(experts, neurons, start, width, factor)
    if slices > 1:
        with torch.no_grad():
            moe.router.weight.zero_()
    _add_noise(experts, noise_std, generator)


def _load_part(part: nn.Module, neurons: _Neurons, start: int, stop: int, scale: float,
               *, with_bias: bool) -> None:
    """Copy units ``[start, stop)`` of ``neurons`` into the dense MLP ``part`` (its width)."""
    _, linears = describe_mlp(part)
    with torch.no_grad():
        for lin, w in zip(linears[:-1], neurons.w_in, strict=True):
            lin.weight.copy_(w[start:stop])
            if lin.bias is not None and neurons.b_in is not None:
                lin.bias.copy_(neurons.b_in[start:stop])
            elif lin.bias is not None:
                lin.bias.zero_()
        last = linears[-1]
        last.weight.copy_(neurons.w_out[:, start:stop] * scale)
        if last.bias is not None:
            last.bias.copy_(neurons.b_out * scale if with_bias and neurons.b_out is not None
                            else torch.zeros_like(last.bias))
