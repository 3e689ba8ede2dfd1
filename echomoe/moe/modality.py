"""Modality routing: image and text tokens reach disjoint expert groups (UniMedVL-style).

UniMedVL hard-routes parameters by token type (a mixture-of-transformers): image tokens never
share feed-forward weights with text tokens.  :class:`ModalityRouter` does this inside one MoE
layer: the experts are split into a text group and an image group, and each token takes its
top-``k`` within its own group (logits of the other group are masked to ``-inf``, so no
probability, gradient or capacity crosses over).  With ``route_regions=True`` an image token
of region ``r`` is further restricted to that region's experts inside the image group (the
:class:`~echomoe.moe.routers.RegionHardRouter` rule), while text tokens keep learned top-k
routing in the text group.

Every token still passes through ``k`` experts of the same width, so the active parameters per
token equal those of a :class:`~echomoe.moe.routers.TopKRouter` with the same ``E`` and ``k``.

Token types are per token: ``0`` text, ``1`` image, ``-1`` unknown (routes over all experts,
as an unknown region does).  The VLM derives them from ``input_ids`` (``<image>`` positions)
and hands them to every MoE layer through the
:class:`~echomoe.moe.context.RoutingContext`; a layer called without them routes every token
over all experts.

Axis legend: ``N`` tokens, ``E`` experts, ``R`` regions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from echomoe.moe.routers import TopKRouter, default_region_experts, region_mask_from_experts

TEXT, IMAGE = 0, 1
"""Token-type ids: a text token, an image token (``-1``: unknown)."""


def split_experts(num_experts: int, top_k: int,
                  image_experts: int | Sequence[int] | None = None) -> tuple[list[int], list[int]]:
    """``(text_experts, image_experts)``: disjoint expert ids covering ``range(E)``.

    ``image_experts``: a count (the last ``n`` experts go to images), an explicit list, or
    ``None`` (half, rounded down, at the end).  Each group needs at least ``top_k`` experts.
    """
    if image_experts is None:
        image_experts = num_experts // 2
    if isinstance(image_experts, int):
        if not 0 < image_experts < num_experts:
            raise ValueError(f"image_experts must be in [1, num_experts={num_experts}), got "
                             f"{image_experts}")
        image = list(range(num_experts - image_experts, num_experts))
    else:
        image = sorted({int(e) for e in image_experts})
        bad = [e for e in image if not 0 <= e < num_experts]
        if bad:
            raise ValueError(f"image_experts names experts {bad} outside [0, {num_experts})")
    text = [e for e in range(num_experts) if e not in image]
    for name, group in (("text", text), ("image", image)):
        if len(group) < top_k:
            raise ValueError(f"the {name} expert group has {len(group)} experts "
                             f"({group}); top_k={top_k} needs at least that many")
    return text, image


def check_token_types(token_types: Tensor | None, num_tokens: int, name: str) -> Tensor | None:
    """``token_types (N,)`` checked: integer, one per token, each in ``{-1, 0, 1}``."""
    if token_types is None:
        return None
    if token_types.dtype.is_floating_point:
        raise TypeError(f"{name}: token_types must be an integer or bool tensor, got "
                        f"{token_types.dtype}")
    if token_types.shape != (num_tokens,):
        raise ValueError(f"{name}: token_types must have shape (N,) = ({num_tokens},), got "
                         f"{tuple(token_types.shape)}")
    token_types = token_types.long()
    if token_types.numel():
        lo, hi = (int(v) for v in torch.aminmax(token_types))
        if lo < -1 or hi > IMAGE:
            raise ValueError(f"{name}: token type {lo if lo < -1 else hi} is not -1 (unknown), "
                             f"{TEXT} (text) or {IMAGE} (image)")
    return token_types


class ModalityRouter(TopKRouter):
    """Top-k routing inside the expert group of each token's modality.

    Args:
        hidden_size, num_experts, top_k: as :class:`~echomoe.moe.routers.TopKRouter`.
        image_experts: the image group (see :func:`split_experts`); the rest is the text group.
        route_regions: restrict an image token of region ``r`` to ``region_experts[r]``.
        region_experts: per-region lists of *image-group* experts (each at least ``top_k``
            long); default: consecutive groups of ``max(top_k, |image| // R)`` image experts,
            wrapping around (:func:`~echomoe.moe.routers.default_region_experts`).
        normalize, jitter, capacity_factor, num_regions: as ``TopKRouter``.  No
        ``bias_update_rate``: the groups take unequal token counts by design, so one global
        load target does not apply.

    Buffers: ``route_mask (2 [+ R], E)``: row 0 the text group, row 1 the image group, rows
    ``2 + r`` region ``r``'s image experts.
    """

    supports_bias_balancing = False

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        *,
        image_experts: int | Sequence[int] | None = None,
        route_regions: bool = False,
        region_experts: Sequence[Sequence[int]] | None = None,
        num_regions: int = 7,
        normalize: bool = True,
        jitter: float = 0.0,
        capacity_factor: float | None = None,
    ) -> None:
        super().__init__(hidden_size, num_experts, top_k, normalize=normalize, jitter=jitter,
                         capacity_factor=capacity_factor, num_regions=num_regions)
        text, image = split_experts(num_experts, top_k, image_experts)
        self.text_experts, self.image_experts = text, image
        self.route_regions = bool(route_regions)
        rows = region_mask_from_experts([text, image], num_experts, top_k)
        if self.route_regions:
            if region_experts is None:
                group = max(top_k, len(image) // max(num_regions, 1))
                local = default_region_experts(num_regions, len(image), group)
                region_experts = [[image[e] for e in experts] for experts in local]
            if len(region_experts) != num_regions:
                raise ValueError(f"region_experts lists {len(region_experts)} regions, "
                                 f"num_regions={num_regions}")
            for r, experts in enumerate(region_experts):
                outside = sorted({int(e) for e in experts} - set(image))
                if outside:
                    raise ValueError(f"region_experts[{r}] names experts {outside} outside the "
                                     f"image group {image}")
            regions = region_mask_from_experts(region_experts, num_experts, top_k)
            rows = torch.cat([rows, regions])
        elif region_experts is not None:
            raise ValueError("region_experts needs route_regions=True")
        # Persistent, so checkpoints carry their expert groups.
        self.register_buffer("route_mask", rows)

    def compute_logits(self, x: Tensor, region_ids: Tensor | None,
                       token_types: Tensor | None = None) -> Tensor:
        logits = super().compute_logits(x, region_ids)
        types = check_token_types(token_types, x.shape[0], type(self).__name__)
        if types is None:
            return logits
        row = types  # text 0, image 1, unknown -1 (the all-True row appended below)
        if self.route_regions and region_ids is not None:
            row = torch.where((types == IMAGE) & (region_ids >= 0), 2 + region_ids, row)
        everything = self.route_mask.new_ones(1, self.num_experts)
        allowed_t = torch.cat([self.route_mask, everything]).t()[:, row]  # (E, N)
        return logits.t().masked_fill(~allowed_t, float("-inf")).t()
