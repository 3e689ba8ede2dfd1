"""Grounding: pixel decoder, mask decoders, box / keypoint heads, measurements and losses.

Quick tour (``feats`` from a ViT's ``forward_intermediates``, ``h_seg`` / ``h_det`` / ``h_kpt``
the LM's last hidden state at the ``[SEG]`` / ``[DET]`` / ``[KPT]`` tokens)::

    from echomoe.grounding import (PixelDecoder, DynamicConvMaskDecoder, BoxHead, KeypointHead,
                                   mask_loss, box_loss, keypoint_loss, measure_mm)
    pixel = PixelDecoder(in_channels=[384] * 4, dim=64, input_stride=16, output_stride=4)
    masks = DynamicConvMaskDecoder(hidden_size=896, in_channels=pixel.out_channels)
    logits = masks(h_seg, pixel(feats), image_size=(H, W))            # (B, H, W)
    boxes = BoxHead(hidden_size=896)(h_det)                            # (B, 4) cx, cy, w, h
    points = KeypointHead(hidden_size=896, num_keypoints=4)(h_kpt)     # (B, 4, 2) x, y
    # or heads that look at the pixels (soft-argmax over a task-token query heatmap):
    pix = pixel(feats)
    boxes = HeatmapBoxHead(hidden_size=896, in_channels=pixel.out_channels)(h_det, pix)
    mm = measure_mm(points, [(0, 1), (2, 3)], original_sizes, pixel_spacing)   # (B, 2)
    losses = {**mask_loss(logits, batch["masks"], batch["has_mask"]),
              **box_loss(boxes, batch["boxes"], batch["has_box"]),
              **keypoint_loss(points, batch["keypoints"], batch["has_keypoints"])}
    total = sum(losses.values())
"""

from echomoe.grounding.heads import (
    BoxHead,
    KeypointHead,
    boxes_to_xyxy,
    head_mlp,
    keypoints_to_pixels,
    measure_mm,
)
from echomoe.grounding.losses import (
    box_loss,
    dice_loss,
    generalized_box_iou,
    keypoint_heatmap_loss,
    keypoint_loss,
    mask_loss,
    match_point_pairs,
)
from echomoe.grounding.mask_decoder import DotProductMaskHead, DynamicConvMaskDecoder
from echomoe.grounding.pixel_decoder import UPSAMPLE_MODES, PixelDecoder, coordinate_channels
from echomoe.grounding.spatial_heads import HeatmapBoxHead, HeatmapKeypointHead, soft_argmax

MASK_DECODERS = {"dynamic_conv": DynamicConvMaskDecoder, "dot_product": DotProductMaskHead}
"""Mask decoder classes by name (same constructor keywords ``hidden_size``, ``in_channels``)."""

__all__ = [
    "MASK_DECODERS",
    "UPSAMPLE_MODES",
    "BoxHead",
    "DotProductMaskHead",
    "DynamicConvMaskDecoder",
    "HeatmapBoxHead",
    "HeatmapKeypointHead",
    "KeypointHead",
    "PixelDecoder",
    "box_loss",
    "boxes_to_xyxy",
    "coordinate_channels",
    "dice_loss",
    "generalized_box_iou",
    "head_mlp",
    "keypoint_heatmap_loss",
    "keypoint_loss",
    "keypoints_to_pixels",
    "mask_loss",
    "match_point_pairs",
    "measure_mm",
    "soft_argmax",
]
