"""The routing context: how region ids reach MoE layers inside a ``transformers`` model.

HF decoder layers call ``self.mlp(hidden_states)`` and expect a tensor back, so an MoE layer
installed there cannot receive region ids as an argument nor return its aux losses.
:func:`~echomoe.moe.upcycle.moefy` therefore installs :class:`MoEAdapter` as ``mlp``; the
adapter reads the current region ids from a :class:`RoutingContext` owned by the model and
records its layer's :class:`~echomoe.moe.layer.MoEOutput` there.  No module-level globals: two
models have two contexts.

Usage::

    ctx = moefy(lm, layers="all", num_experts=4, top_k=2, router="region_hard")
    with ctx.route(region_ids):           # (B,) or None; -1 = unknown
        out = lm(input_ids, labels=labels)
    loss = out.loss + 0.01 * ctx.aux_losses()["balance"]

Each layer's latest output is kept (overwritten on the next forward), so the records of the
last forward are always available and memory stays bounded during ``generate()``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from echomoe.moe.layer import MoEOutput, RoutingInfo


def _rows_for(values: Tensor | None, what: str, batch_size: int) -> Tensor | None:
    """``values`` (one row per sample) for a batch of ``batch_size`` rows: ``generate()`` with
    beams or several return sequences repeats each sample's rows contiguously, and so does this."""
    if values is None or values.shape[0] == batch_size:
        return values
    if values.shape[0] and batch_size % values.shape[0] == 0:
        return values.repeat_interleave(batch_size // values.shape[0], dim=0)
    raise ValueError(f"routing context holds {what} for {values.shape[0]} rows but the batch has "
                     f"{batch_size}")


class RoutingContext:
    """Carries region ids (and token types) into MoE layers and collects their aux losses and
    routing."""

    def __init__(self) -> None:
        self.region_ids: Tensor | None = None
        self.token_mask: Tensor | None = None
        self.token_types: Tensor | None = None
        self.compute_aux_losses = True
        self.records: dict[str, MoEOutput] = {}

    @contextmanager
    def route(
        self,
        region_ids: Tensor | None,
        token_mask: Tensor | None = None,
        *,
        token_types: Tensor | None = None,
        compute_aux_losses: bool = True,
    ) -> Iterator[RoutingContext]:
        """Route every forward inside the block with ``region_ids (B,)``; clears old records.

        ``token_mask`` (the attention mask, ``(B, L)``) keeps padding away from the experts and
        out of the aux losses; with a KV cache its last ``T`` columns belong to the ``T`` tokens
        of the current forward.
        ``token_types`` ``(B, T)`` marks the current forward's tokens ``0`` text, ``1`` image
        (``-1`` unknown) for modality routers; unlike the mask it covers the current tokens
        only (the VLM derives it from the forward's ``input_ids``).
        ``compute_aux_losses=False`` skips the routers' aux losses (then :meth:`aux_losses` is
        empty): for inference, e.g. each step of ``generate()``.
        """
        previous = self.region_ids, self.token_mask, self.token_types, self.compute_aux_losses
        self.region_ids, self.token_mask, self.token_types = region_ids, token_mask, token_types
        self.compute_aux_losses = compute_aux_losses
        self.records = {}
        try:
            yield self
        finally:
            (self.region_ids, self.token_mask, self.token_types,
             self.compute_aux_losses) = previous

    def region_ids_for(self, batch_size: int) -> Tensor | None:
        """The region ids for a batch of ``batch_size`` rows.

        ``generate()`` with beams or several return sequences repeats each sample's rows
        contiguously; region ids are repeated the same way.
        """
        return _rows_for(self.region_ids, "region ids", batch_size)

    def token_mask_for(self, batch_size: int, num_tokens: int) -> Tensor | None:
        """The ``(batch_size, num_tokens)`` mask of the current forward, or ``None``."""
        mask = _rows_for(self.token_mask, "a token mask", batch_size)
        if mask is None:
            return None
        if mask.shape[1] < num_tokens:
            raise ValueError(
                f"token mask covers {mask.shape[1]} positions but the forward has {num_tokens}"
            )
        return mask[:, mask.shape[1] - num_tokens:]

    def token_types_for(self, batch_size: int, num_tokens: int) -> Tensor | None:
        """The ``(batch_size, num_tokens)`` token types of the current forward, or ``None``
        (rows repeated for beams as :meth:`region_ids_for` does)."""
        types = _rows_for(self.token_types, "token types", batch_size)
        if types is None:
            return None
        if types.shape[1] != num_tokens:
            raise ValueError(f"routing context holds token types for {types.shape[1]} positions "
                             f"but the forward has {num_tokens}")
        return types

    def record(self, name: str, output: MoEOutput) -> None:
        """Keep the :class:`MoEOutput` of the MoE layer ``name`` from the current forward."""
        self.records[name] = output

    def aux_losses(self, reduce: str = "mean") -> dict[str, Tensor]:
        """Each aux loss combined over the layers of the last forward (``mean`` or ``sum``)."""
        if reduce not in ("mean", "sum"):
            raise ValueError(f"unknown reduce {reduce!r}; valid: mean, sum")
        grouped: dict[str, list[Tensor]] = {}
        for out in self.records.values():
            for key, value in out.aux_losses.items():
                grouped.setdefault(key, []).append(value)
        combine = torch.mean if reduce == "mean" else torch.sum
        return {key: combine(torch.stack(values)) for key, values in grouped.items()}

    def routing(self) -> dict[str, RoutingInfo]:
        """Per-layer routing of the last forward, keyed by layer name."""
        return {name: out.routing for name, out in self.records.items() if out.routing}


class MoEAdapter(nn.Module):
    """Stand-in for an HF ``mlp``: runs an MoE layer, returns a tensor, records the rest."""

    def __init__(self, moe: nn.Module, context: RoutingContext, name: str) -> None:
        super().__init__()
        self.moe = moe
        self.name = name
        # A plain attribute (not a submodule): the context holds no parameters.
        object.__setattr__(self, "context", context)

    def forward(self, hidden_states: Tensor) -> Tensor:
        """``(B, T, D) -> (B, T, D)``: the MoE layer's hidden states; its aux losses and
        routing go to the context (region ids and padding mask read from it)."""
        b, t = hidden_states.shape[:2]
        context = self.context
        region_ids = context.region_ids_for(b)
        out = self.moe(hidden_states, region_ids, context.token_mask_for(b, t),
                       aux_losses=context.compute_aux_losses,
                       token_types=context.token_types_for(b, t))
        context.record(self.name, out)
        return out.hidden_states
