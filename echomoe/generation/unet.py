"""A small convolutional U-Net, optionally conditioned on a vector (FiLM).

One network serves two jobs: the velocity field of the image generator
(:class:`~echomoe.generation.flow.FlowMatchingHead`, conditioned on the time and the language
model's hidden state) and the lesion segmenter that scores generated images
(:mod:`echomoe.generation.evaluate`, unconditioned).

Layout: ``depth`` levels of a residual block (GroupNorm -> SiLU -> 3x3 conv, twice; the
condition's scale and shift applied after the first norm, as in DDPM's U-Net) then a stride-2
conv; a middle block; ``depth`` levels of nearest upsampling, concatenation with the skip and a
residual block; a 1x1 output conv.  Channels double per level from ``width``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    """GroupNorm with the largest group count <= ``groups`` that divides ``channels``."""
    return nn.GroupNorm(math.gcd(groups, channels), channels)


class ResBlock(nn.Module):
    """Two 3x3 convs with a residual path; ``cond [B, cond_dim]`` (when ``cond_dim > 0``)
    scales and shifts the first normalised activation: ``h * (1 + scale) + shift``."""

    def __init__(self, in_channels: int, out_channels: int, cond_dim: int = 0, groups: int = 8):
        super().__init__()
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.film = nn.Linear(cond_dim, 2 * in_channels) if cond_dim else None
        self.skip = (nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels
                     else nn.Identity())

    def forward(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        h = self.norm1(x)
        if self.film is not None:
            scale, shift = self.film(cond)[:, :, None, None].chunk(2, dim=1)
            h = h * (1 + scale) + shift
        h = self.conv1(F.silu(h))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + self.skip(x)


class UNet(nn.Module):
    """``[B, in_channels, H, W] -> [B, out_channels, H, W]`` (``H``, ``W`` divisible by
    ``2 ** depth``).

    Args:
        in_channels, out_channels: input and output channels.
        width: channels of the first level (doubling per level).
        depth: down / up levels.
        cond_dim: size of the conditioning vector (0: unconditioned).
        groups: GroupNorm groups (their gcd with a level's channels).
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 1, *, width: int = 16,
                 depth: int = 3, cond_dim: int = 0, groups: int = 8):
        super().__init__()
        if depth < 1 or width < 1:
            raise ValueError(f"depth and width must be >= 1, got depth={depth}, width={width}")
        self.depth, self.cond_dim = depth, cond_dim
        chans = [width * 2 ** i for i in range(depth + 1)]
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1)
        self.down = nn.ModuleList(ResBlock(chans[i], chans[i], cond_dim, groups)
                                  for i in range(depth))
        self.pool = nn.ModuleList(nn.Conv2d(chans[i], chans[i + 1], 3, stride=2, padding=1)
                                  for i in range(depth))
        self.mid = ResBlock(chans[depth], chans[depth], cond_dim, groups)
        self.lift = nn.ModuleList(nn.Conv2d(chans[i + 1], chans[i], 3, padding=1)
                                  for i in range(depth))
        self.up = nn.ModuleList(ResBlock(2 * chans[i], chans[i], cond_dim, groups)
                                for i in range(depth))
        self.out = nn.Sequential(_norm(width, groups), nn.SiLU(), nn.Conv2d(width, out_channels, 1))

    def _check(self, x: Tensor, cond: Tensor | None) -> None:
        if x.dim() != 4:
            raise ValueError(f"UNet input must be [B, C, H, W], got {tuple(x.shape)}")
        step = 2 ** self.depth
        if x.shape[-2] % step or x.shape[-1] % step:
            raise ValueError(f"UNet input height and width must be divisible by 2**depth = "
                             f"{step}, got {tuple(x.shape[-2:])}")
        if self.cond_dim and (cond is None or cond.shape != (x.shape[0], self.cond_dim)):
            got = None if cond is None else tuple(cond.shape)
            raise ValueError(f"UNet cond must be [B, {self.cond_dim}] = "
                             f"[{x.shape[0]}, {self.cond_dim}], got {got}")

    def encode(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, list[Tensor]]:
        """The bottleneck ``[B, width * 2**depth, H / 2**depth, W / 2**depth]`` and the skips."""
        self._check(x, cond)
        h, skips = self.stem(x), []
        for block, pool in zip(self.down, self.pool, strict=True):
            h = block(h, cond)
            skips.append(h)
            h = pool(h)
        return self.mid(h, cond), skips

    def features(self, x: Tensor) -> Tensor:
        """Spatially averaged bottleneck features ``[B, width * 2**depth]`` (for a
        feature-distance score)."""
        return self.encode(x)[0].mean(dim=(-2, -1))

    def forward(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        h, skips = self.encode(x, cond)
        for i in reversed(range(self.depth)):
            h = self.lift[i](F.interpolate(h, scale_factor=2.0, mode="nearest"))
            h = self.up[i](torch.cat([h, skips[i]], dim=1), cond)
        return self.out(h)
