"""Conditional image generation by flow matching (rectified flow), from a hidden state.

UniMedVL-style generation in a VLM: the language model reads the request (a report, the
attributes, a ``<gen>`` task token) and its hidden state at the task token conditions a small
image generator.  :class:`FlowMatchingHead` learns the straight path from Gaussian noise
``x0`` to the image ``x1``: at ``t ~ U(0, 1)`` it sees ``x_t = (1 - t) x0 + t x1`` and predicts
the velocity ``x1 - x0`` (Lipman et al. 2023; Liu et al. 2023)::

    loss = || v(x_t, t, c) - (x1 - x0) ||^2

and :meth:`FlowMatchingHead.sample` integrates ``dx/dt = v`` from noise with ``steps`` Euler
steps.  ``c`` is the hidden state through an MLP plus a sinusoidal time embedding, applied to
every block of a :class:`~echomoe.generation.unet.UNet` (FiLM).  An optional mask channel
(``mask_channels=1``) conditions on a requested lesion mask too.  With ``cond_dropout`` the
condition is replaced by a learned null vector on that fraction of training samples, so
sampling can use classifier-free guidance (``guidance > 1``).

Images are ``[B, C, H, W]`` floats in ``[-1, 1]`` (:func:`to_model_range` /
:func:`to_uint8` convert).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from echomoe.generation.unet import UNet


def to_model_range(images: Tensor) -> Tensor:
    """uint8 (or 0-255 float) images -> floats in ``[-1, 1]``."""
    return images.float() / 127.5 - 1.0


def to_uint8(images: Tensor) -> Tensor:
    """Floats in ``[-1, 1]`` -> uint8 (clamped)."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def time_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding ``[B, dim]`` of times ``t [B]`` in ``[0, 1]`` (``dim`` even)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
    angles = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class FlowMatchingHead(nn.Module):
    """Generates ``[B, channels, H, W]`` images from a hidden state ``[B, hidden_size]``.

    Args:
        hidden_size: size of the conditioning hidden state (the LM's hidden size).
        image_size: ``H = W`` of the generated images (divisible by ``2 ** depth``).
        channels: image channels.
        width, depth: the velocity U-Net's first-level channels and levels.
        cond_dim: size of the condition vector (time + hidden state) fed to every block.
        mask_channels: extra input channels holding a requested mask (0: none).
        cond_dropout: fraction of training samples whose condition is the null vector (for
            classifier-free guidance; 0: off).
    """

    def __init__(self, hidden_size: int, image_size: int, *, channels: int = 1, width: int = 32,
                 depth: int = 3, cond_dim: int = 128, mask_channels: int = 0,
                 cond_dropout: float = 0.0):
        super().__init__()
        if cond_dim % 2:
            raise ValueError(f"cond_dim must be even (sinusoidal time embedding), got {cond_dim}")
        if not 0.0 <= cond_dropout < 1.0:
            raise ValueError(f"cond_dropout must be in [0, 1), got {cond_dropout}")
        self.image_size, self.channels = int(image_size), int(channels)
        self.mask_channels, self.cond_dropout, self.cond_dim = mask_channels, cond_dropout, cond_dim
        self.hidden_proj = nn.Sequential(nn.Linear(hidden_size, cond_dim), nn.SiLU(),
                                         nn.Linear(cond_dim, cond_dim))
        self.time_proj = nn.Sequential(nn.Linear(cond_dim, cond_dim), nn.SiLU(),
                                       nn.Linear(cond_dim, cond_dim))
        self.null_cond = nn.Parameter(torch.zeros(1, cond_dim))
        self.net = UNet(channels + mask_channels, channels, width=width, depth=depth,
                        cond_dim=cond_dim)

    def _condition(self, hidden: Tensor, drop: Tensor | None = None) -> Tensor:
        cond = self.hidden_proj(hidden.float())
        if drop is not None:
            cond = torch.where(drop[:, None], self.null_cond.expand_as(cond), cond)
        return cond

    def _inputs(self, x: Tensor, masks: Tensor | None) -> Tensor:
        if self.mask_channels == 0:
            return x
        if masks is None:
            raise ValueError(f"this head was built with mask_channels={self.mask_channels}: "
                             "pass masks [B, mask_channels, H, W]")
        return torch.cat([x, masks.to(x.dtype) * 2 - 1], dim=1)

    def velocity(self, x: Tensor, t: Tensor, cond: Tensor, masks: Tensor | None = None) -> Tensor:
        """``v(x_t, t, c)`` for ``x [B, C, H, W]``, ``t [B]``, ``cond [B, cond_dim]``."""
        c = cond + self.time_proj(time_embedding(t, self.cond_dim))
        return self.net(self._inputs(x, masks), c)

    def _check(self, hidden: Tensor, images: Tensor | None = None) -> None:
        if hidden.dim() != 2:
            raise ValueError(f"hidden must be [B, hidden_size], got {tuple(hidden.shape)}")
        want = (hidden.shape[0], self.channels, self.image_size, self.image_size)
        if images is not None and tuple(images.shape) != want:
            raise ValueError(f"images must be {list(want)} (in [-1, 1]), got "
                             f"{list(images.shape)}")

    def loss(self, hidden: Tensor, images: Tensor, masks: Tensor | None = None,
             generator: torch.Generator | None = None) -> Tensor:
        """The flow-matching loss (0-d) of ``images [B, C, H, W]`` in ``[-1, 1]`` given
        ``hidden [B, hidden_size]`` (and ``masks`` when the head takes them)."""
        self._check(hidden, images)
        b = images.shape[0]
        noise = torch.randn(images.shape, generator=generator, device=images.device)
        t = torch.rand(b, generator=generator, device=images.device)
        x_t = (1 - t)[:, None, None, None] * noise + t[:, None, None, None] * images
        drop = None
        if self.training and self.cond_dropout:
            drop = torch.rand(b, generator=generator, device=images.device) < self.cond_dropout
        v = self.velocity(x_t, t, self._condition(hidden, drop), masks)
        return (v.float() - (images - noise)).pow(2).mean()

    @torch.no_grad()
    def sample(self, hidden: Tensor, *, steps: int = 20, masks: Tensor | None = None,
               guidance: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
        """Images ``[B, C, H, W]`` in ``[-1, 1]``: ``steps`` Euler steps of ``dx/dt = v`` from
        noise; ``guidance > 1`` extrapolates from the null condition (classifier-free)."""
        self._check(hidden)
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        b = hidden.shape[0]
        shape = (b, self.channels, self.image_size, self.image_size)
        x = torch.randn(shape, generator=generator, device=hidden.device)
        cond = self._condition(hidden)
        null = self.null_cond.expand_as(cond)
        for i in range(steps):
            t = torch.full((b,), i / steps, device=hidden.device)
            v = self.velocity(x, t, cond, masks)
            if guidance != 1.0:
                unconditioned = self.velocity(x, t, null, masks)
                v = unconditioned + guidance * (v - unconditioned)
            x = x + v / steps
        return x.clamp(-1, 1)
