"""Image tokens to LM embeddings (:class:`Projector`) and to a region (:class:`RegionClassifier`).

Axis legend: ``B`` batch, ``N = h * w`` patch tokens in row-major order, ``C`` encoder hidden
size, ``D`` output (LM) size, ``R`` regions.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


def _square_grid(num_tokens: int) -> tuple[int, int]:
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(
            f"cannot infer the patch grid of {num_tokens} tokens (not a square); pass "
            "grid_size=(h, w)"
        )
    return side, side


def pool_tokens_2x2(x: Tensor, grid_size: tuple[int, int] | None = None) -> Tensor:
    """Concatenate each 2x2 neighbourhood of patch tokens: ``(B, h*w, C) -> (B, h/2*w/2, 4C)``.

    Tokens are row-major (token ``r * w + c`` is row ``r``, column ``c``).  Output token
    ``i * (w/2) + j`` holds, in this order, the channels of tokens ``(2i, 2j)``, ``(2i, 2j+1)``,
    ``(2i+1, 2j)``, ``(2i+1, 2j+1)``.  ``grid_size`` defaults to a square grid; ``h`` and ``w``
    must be even.
    """
    if x.dim() != 3:
        raise ValueError(f"expected tokens (batch, h*w, channels), got {tuple(x.shape)}")
    h, w = grid_size if grid_size is not None else _square_grid(x.shape[1])
    if h * w != x.shape[1]:
        raise ValueError(f"grid_size {h}x{w} = {h * w} tokens, but got {x.shape[1]} tokens")
    if h % 2 or w % 2:
        raise ValueError(f"2x2 token pooling needs an even patch grid, got {h}x{w}")
    return rearrange(x, "b (h p1 w p2) c -> b (h w) (p1 p2 c)", h=h // 2, p1=2, p2=2)


class Projector(nn.Module):
    """Two-layer MLP with GELU mapping image tokens to the LM's embedding size.

    With ``pool=True`` every 2x2 neighbourhood of tokens is first concatenated channel-wise
    (:func:`pool_tokens_2x2`, ``C -> 4C``), so the first linear layer (``4C -> hidden``) acts
    as a learned 2x2 pooling and the LM sees 4x fewer image tokens (as in Qwen2-VL's merger).

    Args:
        in_dim: ``C``.
        out_dim: ``D``.
        hidden_dim: width of the hidden layer (default ``out_dim``).
        pool: 2x2 token pooling (needs an even patch grid).
    """

    def __init__(
        self, in_dim: int, out_dim: int, *, hidden_dim: int | None = None, pool: bool = False
    ) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.pool = pool
        hidden_dim = hidden_dim or out_dim
        self.fc1 = nn.Linear(4 * in_dim if pool else in_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, out_dim)

    def num_output_tokens(self, num_tokens: int) -> int:
        """Image tokens the LM receives for ``num_tokens`` patch tokens."""
        return num_tokens // 4 if self.pool else num_tokens

    def forward(self, x: Tensor, grid_size: tuple[int, int] | None = None) -> Tensor:
        """``(B, N, C) -> (B, N, D)``, or ``(B, N/4, D)`` with pooling.

        ``grid_size`` ``(h, w)`` is needed for pooling non-square grids.
        """
        if x.dim() != 3 or x.shape[-1] != self.in_dim:
            raise ValueError(
                f"Projector expected tokens (batch, tokens, {self.in_dim}), got {tuple(x.shape)}"
            )
        if self.pool:
            x = pool_tokens_2x2(x, grid_size)
        return self.fc2(F.gelu(self.fc1(x)))


class RegionClassifier(nn.Module):
    """Predict the anatomical region (or any image-level label) from mean-pooled features.

    ``LayerNorm -> Linear -> GELU -> Linear`` on the token mean; lets MoE routing use a
    *predicted* region when none is given.  The VLM's diagnosis classifier is one too, with
    its labels as the classes.

    Args:
        in_dim: ``C``.
        num_regions: ``R``, the number of classes.
        hidden_dim: MLP width (default ``in_dim``).
    """

    def __init__(self, in_dim: int, num_regions: int = 7, *, hidden_dim: int | None = None):
        super().__init__()
        self.in_dim = in_dim
        self.num_regions = num_regions
        hidden_dim = hidden_dim or in_dim
        self.norm = nn.LayerNorm(in_dim)
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, num_regions)

    def forward(self, features: Tensor) -> Tensor:
        """``(B, N, C)`` tokens (or already pooled ``(B, C)``) -> logits ``(B, R)``."""
        if features.dim() not in (2, 3) or features.shape[-1] != self.in_dim:
            raise ValueError(
                f"{type(self).__name__} expected features (batch, tokens, {self.in_dim}) or "
                f"(batch, {self.in_dim}), got {tuple(features.shape)}"
            )
        pooled = features.mean(dim=1) if features.dim() == 3 else features
        return self.fc2(F.gelu(self.fc1(self.norm(pooled))))

    def predict(self, features: Tensor) -> Tensor:
        """Region ids ``(B,)`` int64: argmax of the logits."""
        return self(features).argmax(dim=-1)

    def loss(self, logits: Tensor, region_ids: Tensor) -> Tensor:
        """Cross-entropy of ``logits (B, R)`` against ``region_ids (B,)``; ``-1`` is ignored.

        Returns 0 (still differentiable) when every id is ``-1``.
        """
        known = region_ids >= 0
        if not bool(known.any()):
            return logits.sum() * 0.0
        return F.cross_entropy(logits[known], region_ids[known].long())
