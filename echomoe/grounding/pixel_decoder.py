"""FPN pixel decoder: ViT intermediate feature maps -> dense features at stride 4 or 8.

Data flow (axis legend: ``B`` batch, ``L`` number of intermediate maps, ``C_i`` channels of map
``i``, ``(h, w)`` feature grid, ``D`` decoder width, ``r = input_stride / output_stride``)::

    features[i] (B, C_i, h_i, w_i) --lateral 1x1 conv + GroupNorm--> (B, D, h_i, w_i)
    top-down: p = lat[L-1];  for i = L-2 .. 0:  p = fuse_i(lat[i] + resize(p, (h_i, w_i)))
    p (B, D, h_0, w_0) --log2(r) learned x2 upsampling stages--> (B, D, r*h_0, r*w_0)
    (+ image stem: image (B, C_img, H, W) --strided 3x3 convs--> (B, D, H/s_out, W/s_out))
    --3x3 conv--> (B, D, ...) ++ coordinate channels (x, y) in [-1, 1] --> (B, D + 2, ...)

The optional **image stem** (``image_channels > 0``) is a small strided CNN on the raw image,
added to the upsampled ViT path before the output conv: the patch tokens of a ViT summarise
``p x p`` pixels, so edges of structures smaller than a patch (a 3 mm stone on a 2 mm/pixel
image) cannot be recovered from them alone; the stem carries them at the output stride, the
role the stride-4 backbone features play in FPN / Mask2Former decoders.

``features`` are listed shallow -> deep (the order of ``forward_intermediates``).  For a plain
ViT every map has the same stride (the patch size), so ``resize`` is the identity and the
top-down pass is a sequential deep -> shallow fusion; hierarchical backbones (maps at growing
strides) work too, ``input_stride`` then being the stride of ``features[0]``, the finest map.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

UPSAMPLE_MODES = ("transposed", "bilinear")


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    """GroupNorm with ``gcd(channels, groups)`` groups, so any width works (e.g. 37)."""
    return nn.GroupNorm(math.gcd(channels, groups), channels)


def coordinate_channels(
    batch: int, height: int, width: int, *, device=None, dtype=None
) -> Tensor:
    """``(B, 2, height, width)``: channel 0 is x, channel 1 is y, each ``linspace(-1, 1)``."""
    ys = torch.linspace(-1.0, 1.0, height, device=device, dtype=dtype)
    xs = torch.linspace(-1.0, 1.0, width, device=device, dtype=dtype)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((grid_x, grid_y)).unsqueeze(0).expand(batch, -1, -1, -1)


def _conv_norm_act(in_ch: int, out_ch: int, groups: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False), group_norm(out_ch, groups), nn.GELU()
    )


def _upsample_stage(dim: int, mode: str, groups: int) -> nn.Sequential:
    """One learned x2 upsampling: ``(B, D, h, w) -> (B, D, 2h, 2w)``."""
    if mode == "transposed":
        return nn.Sequential(
            nn.ConvTranspose2d(dim, dim, 2, stride=2, bias=False), group_norm(dim, groups),
            nn.GELU(),
        )
    return nn.Sequential(
        nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
        _conv_norm_act(dim, dim, groups),
    )


class PixelDecoder(nn.Module):
    """FPN over ViT intermediates to features at ``output_stride`` (+ 2 coordinate channels).

    Args:
        in_channels: channels ``C_i`` of each intermediate map, shallow -> deep (``L`` >= 1).
        dim: decoder width ``D`` (learned channels of the output).
        input_stride: stride of ``features[0]`` relative to the image (a ViT's patch size).
        output_stride: stride of the output; ``input_stride / output_stride`` must be a power
            of two (1 allowed: no upsampling).  Typically 4 or 8.
        upsample: ``"transposed"`` (ConvTranspose 2x2, stride 2) or ``"bilinear"``
            (interpolate x2 + 3x3 conv), each followed by GroupNorm + GELU.
        norm_groups: GroupNorm groups (reduced to ``gcd(channels, norm_groups)``).
        add_coords: append the ``(x, y)`` coordinate channels.
        image_channels: channels of the raw image for the image stem (0: no stem).  With a
            stem, :meth:`forward` needs ``image``.

    Attributes:
        out_channels: ``D + 2`` with coordinates, else ``D``; pass it to the mask decoder.
        upsample_factor: ``r = input_stride // output_stride``.

    Shapes: ``forward([(B, C_i, h_i, w_i)] * L) -> (B, out_channels, r*h_0, r*w_0)``; for an
    image ``(H, W)`` divisible by the patch size that is ``(B, out_channels, H/s, W/s)``.
    """

    def __init__(
        self,
        *,
        in_channels: Sequence[int],
        dim: int,
        input_stride: int,
        output_stride: int = 4,
        upsample: str = "transposed",
        norm_groups: int = 8,
        add_coords: bool = True,
        image_channels: int = 0,
    ):
        super().__init__()
        in_channels = [int(c) for c in in_channels]
        if not in_channels or min(in_channels) < 1:
            raise ValueError(f"in_channels must be a non-empty list of positive ints, got "
                             f"{in_channels}")
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if upsample not in UPSAMPLE_MODES:
            raise ValueError(f"upsample must be one of {UPSAMPLE_MODES}, got {upsample!r}")
        if output_stride < 1 or input_stride % output_stride:
            raise ValueError(f"output_stride ({output_stride}) must divide input_stride "
                             f"({input_stride})")
        factor = input_stride // output_stride
        if factor & (factor - 1):
            raise ValueError(f"input_stride / output_stride must be a power of two, got "
                             f"{input_stride} / {output_stride} = {factor}")
        self.in_channels = tuple(in_channels)
        self.dim = dim
        self.input_stride = input_stride
        self.output_stride = output_stride
        self.upsample_factor = factor
        self.add_coords = add_coords
        self.out_channels = dim + 2 if add_coords else dim
        self.lateral = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, dim, 1, bias=False), group_norm(dim, norm_groups))
            for c in in_channels
        )
        # fuse[i] merges level i with the top-down path coming from level i + 1.
        self.fuse = nn.ModuleList(
            _conv_norm_act(dim, dim, norm_groups) for _ in range(len(in_channels) - 1)
        )
        self.upsample = nn.Sequential(
            *(_upsample_stage(dim, upsample, norm_groups) for _ in range(factor.bit_length() - 1))
        )
        self.out_proj = nn.Conv2d(dim, dim, 3, padding=1)
        if image_channels < 0:
            raise ValueError(f"image_channels must be >= 0, got {image_channels}")
        self.image_channels = image_channels
        self.image_stem = None
        if image_channels:
            # log2(output_stride) stride-2 stages (at least one 3x3 conv), then a 1x1 to D.
            stages, width, ch = [], max(dim // 2, 8), image_channels
            for _ in range(max(int(math.log2(output_stride)), 0)):
                stages.append(nn.Sequential(nn.Conv2d(ch, width, 3, stride=2, padding=1,
                                                      bias=False),
                                            group_norm(width, norm_groups), nn.GELU()))
                ch = width
            if not stages:
                stages.append(_conv_norm_act(ch, width, norm_groups))
            stages.append(nn.Conv2d(width, dim, 1))
            self.image_stem = nn.Sequential(*stages)

    def forward(self, features: Sequence[Tensor], image: Tensor | None = None) -> Tensor:
        """``[(B, C_i, h_i, w_i)] * L`` (shallow -> deep) -> ``(B, out_channels, r*h_0, r*w_0)``.

        ``image`` ``(B, C_img, H, W)``: the raw image, required when the decoder has an image
        stem (``H, W`` = ``output_stride`` x the output size) and ignored otherwise.
        """
        if len(features) != len(self.in_channels):
            raise ValueError(f"PixelDecoder expects {len(self.in_channels)} feature maps, got "
                             f"{len(features)}")
        for i, (f, c) in enumerate(zip(features, self.in_channels, strict=True)):
            if f.dim() != 4 or f.shape[1] != c or f.shape[0] != features[0].shape[0]:
                raise ValueError(f"feature map {i}: expected (B, {c}, h, w) with the batch of "
                                 f"map 0, got {tuple(f.shape)}")
        lat = [proj(f) for proj, f in zip(self.lateral, features, strict=True)]
        p = lat[-1]
        for i in range(len(lat) - 2, -1, -1):
            if p.shape[-2:] != lat[i].shape[-2:]:
                p = F.interpolate(p, size=lat[i].shape[-2:], mode="nearest")
            p = self.fuse[i](lat[i] + p)
        p = self.upsample(p)
        if self.image_stem is not None:
            if image is None:
                raise ValueError("this PixelDecoder has an image stem (image_channels="
                                 f"{self.image_channels}): pass image=(B, C, H, W)")
            stem = self.image_stem(image.to(p.dtype))
            if stem.shape[0] != p.shape[0] or stem.shape[-2:] != p.shape[-2:]:
                raise ValueError(f"image {tuple(image.shape)} gives stem features "
                                 f"{tuple(stem.shape)}, expected (B={p.shape[0]}, ., "
                                 f"{p.shape[-2]}, {p.shape[-1]}): the image must be "
                                 f"output_stride={self.output_stride} x the feature map")
            p = p + stem
        p = self.out_proj(p)
        if self.add_coords:
            b, _, h, w = p.shape
            p = torch.cat([p, coordinate_channels(b, h, w, device=p.device, dtype=p.dtype)], 1)
        return p
