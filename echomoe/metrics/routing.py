"""Routing analytics: what did the experts learn, per layer and per anatomical region?

::

    from echomoe.metrics.routing import RoutingAccumulator, routing_heatmap, routing_report

    out = model(**batch)
    report = routing_report(out.routing, num_regions=7)        # one forward
    report["layers.0"]["nmi"], report["layers.0"]["region_expert"]

    acc = RoutingAccumulator(num_regions=7)                    # a whole evaluation loop
    for batch in loader:
        out = model(**batch)
        acc.update(out.routing, token_mask=batch["attention_mask"])
    report = acc.report()
    fig = routing_heatmap(report, REGIONS, path="routing.png")  # wandb.Image("routing.png")

Per layer (the keys of a report entry):

* ``region_expert``: ``(R, E)`` counts of kept (token, expert) assignments from tokens of region
  ``r`` to expert ``e`` (:func:`~echomoe.moe.stats.region_expert_matrix`; unknown-region tokens
  and dropped assignments left out), as nested lists;
* ``tokens_per_expert``: ``(E,)`` kept assignments per expert (all tokens);
* ``nmi``: normalised mutual information between region and expert of that matrix
  (:func:`~echomoe.moe.stats.normalized_mutual_information`: 1 for a one-to-one region->expert
  map, 0 for independent routing or without region ids);
* ``load_cv``: coefficient of variation of ``tokens_per_expert``
  (:func:`~echomoe.moe.stats.load_cv`: 0 = even load);
* ``entropy``: token-weighted mean normalised routing entropy
  (:func:`~echomoe.moe.stats.routing_entropy`: 1 = uniform probabilities, 0 = one-hot);
* ``dropped_fraction``: dropped / (kept + dropped) assignments (capacity overflow);
* ``num_tokens``: tokens seen.

Everything is accumulated as counts (and a token-weighted entropy sum), so the report of an
accumulator over many batches equals the report of one big batch.  All values are plain Python
numbers: a report is JSON-serialisable as is.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from echomoe.moe.layer import RoutingInfo
from echomoe.moe.stats import (
    load_cv,
    normalized_mutual_information,
    region_expert_matrix,
    routing_entropy,
    tokens_per_expert,
)

LAYER_KEYS: tuple[str, ...] = (
    "num_tokens", "tokens_per_expert", "region_expert", "nmi", "load_cv", "entropy",
    "dropped_fraction",
)
"""Keys of each layer's entry in a routing report."""

SCALAR_KEYS: tuple[str, ...] = ("nmi", "load_cv", "entropy", "dropped_fraction")
"""The per-layer scalars (averaged over layers by :func:`report_scalars`)."""


def select_tokens(info: RoutingInfo, token_mask: Tensor | None = None,
                  region_ids: Tensor | None = None) -> RoutingInfo:
    """The routing of the tokens where ``token_mask`` is true, optionally relabelled by region.

    Args:
        info: one layer's routing over ``N = B * T`` tokens (the LM flattens batch and time in
            that order).
        token_mask: ``(B, T)`` or ``(N,)``; ``None`` keeps every token.
        region_ids: ``(B,)`` region of each sample (``-1`` unknown), broadcast over its ``T``
            tokens, replacing the region ids the router saw: e.g. to tabulate against the true
            regions when the model routed without them or with predicted ones.

    ``num_dropped`` cannot be split by token and is kept as is.
    """
    n = info.expert_ids.shape[0]
    token_regions = info.region_ids
    if region_ids is not None:
        region_ids = torch.as_tensor(region_ids).reshape(-1).long()
        if region_ids.numel() == 0 or n % region_ids.numel():
            raise ValueError(f"{region_ids.numel()} region ids do not divide the {n} tokens of "
                             "the routing")
        token_regions = region_ids.repeat_interleave(n // region_ids.numel())
    keep = None
    if token_mask is not None:
        keep = torch.as_tensor(token_mask).reshape(-1).to(dtype=torch.bool)
        if keep.numel() != n:
            raise ValueError(
                f"token_mask has {keep.numel()} entries but the routing covers {n} tokens"
            )
    if keep is None and region_ids is None:
        return info

    def take(x: Tensor | None) -> Tensor | None:
        if x is None or keep is None:
            return x
        return x[keep.to(x.device)]

    return RoutingInfo(
        expert_ids=take(info.expert_ids), weights=take(info.weights), probs=take(info.probs),
        region_ids=take(None if token_regions is None
                        else token_regions.to(info.expert_ids.device)),
        num_experts=info.num_experts, num_dropped=info.num_dropped,
    )


def _counts_as_info(counts: Tensor, num_experts: int) -> RoutingInfo:
    """A routing with ``counts[e]`` assignments to expert ``e`` (so stats functions apply)."""
    ids = torch.repeat_interleave(torch.arange(num_experts), counts.long()).unsqueeze(-1)
    return RoutingInfo(expert_ids=ids, weights=torch.ones(ids.shape, dtype=torch.float32),
                       probs=torch.zeros(0, num_experts), region_ids=None,
                       num_experts=num_experts)


class _LayerTotals:
    """Running sums for one layer."""

    def __init__(self, num_regions: int, num_experts: int) -> None:
        self.num_experts = num_experts
        self.matrix = torch.zeros(num_regions, num_experts, dtype=torch.long)
        self.counts = torch.zeros(num_experts, dtype=torch.long)
        self.entropy_sum = 0.0
        self.num_tokens = 0
        self.num_dropped = 0


class RoutingAccumulator:
    """Sum routing statistics over an evaluation loop (see the module docstring).

    Args:
        num_regions: ``R``, rows of the region x expert matrices.

    Call :meth:`update` after each forward with the model output's ``routing`` dict and
    :meth:`report` at the end; :meth:`reset` starts over.  Layers keep their first-seen order.
    """

    def __init__(self, num_regions: int) -> None:
        if num_regions < 1:
            raise ValueError(f"num_regions must be >= 1, got {num_regions}")
        self.num_regions = int(num_regions)
        self._layers: dict[str, _LayerTotals] = {}

    def reset(self) -> None:
        """Forget everything accumulated so far."""
        self._layers = {}

    def __len__(self) -> int:
        return len(self._layers)

    def update(self, routing: Mapping[str, RoutingInfo] | None,
               token_mask: Tensor | None = None,
               region_ids: Tensor | None = None) -> RoutingAccumulator:
        """Add one forward's routing (``{layer: RoutingInfo}``; ``None`` / ``{}``: no-op).

        ``token_mask`` ``(B, T)`` keeps only the tokens where it is true (e.g. drop padding);
        ``region_ids`` ``(B,)`` tabulates against these regions instead of the router's (see
        :func:`select_tokens`).  Returns ``self`` for chaining.
        """
        for name, info in (routing or {}).items():
            if info is None:
                continue
            info = select_tokens(info, token_mask, region_ids)
            totals = self._layers.get(name)
            if totals is None:
                totals = self._layers[name] = _LayerTotals(self.num_regions, info.num_experts)
            elif totals.num_experts != info.num_experts:
                raise ValueError(f"layer {name!r} had {totals.num_experts} experts, now "
                                 f"{info.num_experts}")
            n = int(info.expert_ids.shape[0])
            totals.matrix += region_expert_matrix(info, self.num_regions)
            totals.counts += tokens_per_expert(info).cpu()
            totals.entropy_sum += routing_entropy(info) * n
            totals.num_tokens += n
            totals.num_dropped += int(info.num_dropped)
        return self

    def matrices(self) -> dict[str, Tensor]:
        """``{layer: (R, E) long tensor}`` accumulated so far."""
        return {name: t.matrix.clone() for name, t in self._layers.items()}

    def report(self) -> dict[str, dict[str, Any]]:
        """``{layer: {key: value}}`` with the keys of :data:`LAYER_KEYS` (plain Python)."""
        out: dict[str, dict[str, Any]] = {}
        for name, t in self._layers.items():
            kept = int(t.counts.sum())
            out[name] = {
                "num_tokens": t.num_tokens,
                "tokens_per_expert": t.counts.tolist(),
                "region_expert": t.matrix.tolist(),
                "nmi": normalized_mutual_information(t.matrix),
                "load_cv": load_cv(_counts_as_info(t.counts, t.num_experts)),
                "entropy": t.entropy_sum / t.num_tokens if t.num_tokens else 0.0,
                "dropped_fraction": t.num_dropped / max(kept + t.num_dropped, 1),
            }
        return out


def routing_report(routing: Mapping[str, RoutingInfo] | None, num_regions: int,
                   token_mask: Tensor | None = None,
                   region_ids: Tensor | None = None) -> dict[str, dict[str, Any]]:
    """Per-layer routing report of one forward (see the module docstring for the keys).

    Args:
        routing: ``{layer: RoutingInfo}`` (``EchoMoEOutput.routing``); dense models give ``{}``.
        num_regions: ``R``.
        token_mask: optional ``(B, T)`` mask of the tokens to count.
        region_ids: optional ``(B,)`` regions to tabulate against (see :func:`select_tokens`).
    """
    return RoutingAccumulator(num_regions).update(routing, token_mask, region_ids).report()


def report_scalars(report: Mapping[str, Mapping[str, Any]],
                   prefix: str = "routing/") -> dict[str, float]:
    """Flat scalars for logging: ``{prefix}{layer}/{key}`` and ``{prefix}mean/{key}`` (mean over
    layers) for each key of :data:`SCALAR_KEYS`; ``{}`` for an empty report."""
    out: dict[str, float] = {}
    for name, entry in report.items():
        for key in SCALAR_KEYS:
            out[f"{prefix}{name}/{key}"] = float(entry[key])
    if report:
        for key in SCALAR_KEYS:
            out[f"{prefix}mean/{key}"] = float(np.mean([e[key] for e in report.values()]))
    return out


def _as_matrix(value: Any) -> np.ndarray:
    if isinstance(value, Mapping):
        value = value["region_expert"]
    if isinstance(value, Tensor):
        value = value.detach().cpu().numpy()
    matrix = np.asarray(value, dtype=np.float64)
    if matrix.ndim != 2:
        raise ValueError(f"expected an (R, E) matrix, got shape {matrix.shape}")
    return matrix


def row_normalize(matrix: Any) -> np.ndarray:
    """``(R, E)`` counts (array, tensor, or a routing report's ``{"region_expert": ...}``) ->
    ``(R, E)`` float array, each row divided by its sum (rows summing to 0 stay 0):
    ``P(expert | region)``."""
    m = _as_matrix(matrix)
    sums = m.sum(axis=1, keepdims=True)
    return np.divide(m, sums, out=np.zeros_like(m), where=sums > 0)


def routing_heatmap(
    matrices: Mapping[str, Any],
    region_names: Sequence[str],
    path: str | Path | None = None,
    *,
    title: str | None = None,
    dpi: int = 120,
):
    """One heatmap panel per layer of ``P(expert | region)`` (rows normalised).

    Args:
        matrices: ``{layer: (R, E)}`` counts (tensors, arrays or nested lists), or a routing
            report (each entry's ``region_expert`` is used).
        region_names: ``R`` row labels (e.g. :data:`~echomoe.data.schema.REGIONS`).
        path: when given, the figure is saved there as PNG (parent folders created).
        title: optional figure title.
        dpi: resolution of the saved PNG.

    Returns a ``matplotlib.figure.Figure`` made without pyplot (Agg canvas; no global backend
    change, nothing to close).  Log it with ``wandb.Image(str(path))`` or ``wandb.Image(fig)``.
    Each cell is annotated with its share when the matrix is small (<= 16 experts).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(matrices)
    if not names:
        raise ValueError("no routing matrices to plot (is the model dense?)")
    mats = [row_normalize(matrices[name]) for name in names]
    for name, m in zip(names, mats, strict=True):
        if m.shape[0] != len(region_names):
            raise ValueError(f"layer {name!r}: matrix has {m.shape[0]} rows but "
                             f"{len(region_names)} region names were given")
    cols = min(len(names), 4)
    rows = math.ceil(len(names) / cols)
    experts = max(m.shape[1] for m in mats)
    width = max(2.8, 0.45 * experts + 1.6)
    height = max(2.4, 0.32 * len(region_names) + 1.2)
    fig = Figure(figsize=(width * cols + 0.8, height * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    image = None
    for ax in axes.ravel()[len(names):]:
        ax.set_axis_off()
    for ax, name, m in zip(axes.ravel(), names, mats, strict=False):
        image = ax.imshow(m, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        ax.set_title(name, fontsize=9)
        ax.set_xticks(range(m.shape[1]))
        ax.set_xticklabels([str(e) for e in range(m.shape[1])], fontsize=7)
        ax.set_yticks(range(len(region_names)))
        ax.set_yticklabels(list(region_names), fontsize=7)
        ax.set_xlabel("expert", fontsize=8)
        if m.shape[1] <= 16 and len(region_names) <= 16:
            for (r, e), v in np.ndenumerate(m):
                ax.text(e, r, f"{v:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if v < 0.6 else "black")
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="P(expert | region)")
    if title:
        fig.suptitle(title, fontsize=10)
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi, format="png")
    return fig
