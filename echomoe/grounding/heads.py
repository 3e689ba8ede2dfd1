"""Box and keypoint heads on task-token hidden states, and coordinate / measurement helpers.

Conventions (those of :mod:`echomoe.data.collate`): boxes are normalised ``(cx, cy, w, h)`` in
[0, 1]; keypoints are normalised ``(x, y)`` in [0, 1]; image sizes are ``(H, W)`` of the
*original* key frame (``original_sizes``); a pixel index ``i`` covers ``[i, i + 1)``, so a
normalised ``x`` is the pixel coordinate ``x * W - 0.5`` (pixel centre at an integer), and an
inclusive pixel box ``(x_min, .., x_max)`` has edges ``x_min`` and ``x_max + 1``.  A length in
mm between normalised points is ``hypot(dx * W, dy * H) * pixel_spacing``.

Axis legend: ``B`` batch, ``H_lm`` LM hidden size, ``K`` keypoints, ``P`` measured pairs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


def head_mlp(in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2) -> nn.Sequential:
    """``num_layers`` Linear layers with ReLU between: ``(..., in_dim) -> (..., out_dim)``."""
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
    layers: list[nn.Module] = []
    for i in range(num_layers):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < num_layers - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _check_hidden(hidden: Tensor, hidden_size: int, name: str) -> None:
    if hidden.dim() != 2 or hidden.shape[1] != hidden_size:
        raise ValueError(f"{name} expects a (B, {hidden_size}) hidden state, got "
                         f"{tuple(hidden.shape)}")


class BoxHead(nn.Module):
    """``[DET]`` hidden state ``(B, H_lm)`` -> MLP -> sigmoid ``(B, 4)`` ``(cx, cy, w, h)``.

    Args:
        hidden_size: ``H_lm``.
        mlp_hidden: MLP width (default ``hidden_size``).
        num_layers: MLP depth (Linear layers).
    """

    def __init__(self, *, hidden_size: int, mlp_hidden: int | None = None, num_layers: int = 3):
        super().__init__()
        self.hidden_size = hidden_size
        self.mlp = head_mlp(hidden_size, mlp_hidden or hidden_size, 4, num_layers)

    def forward(self, det_hidden: Tensor) -> Tensor:
        """``(B, H_lm) -> (B, 4)`` normalised ``(cx, cy, w, h)`` in (0, 1)."""
        _check_hidden(det_hidden, self.hidden_size, "BoxHead")
        return self.mlp(det_hidden).sigmoid()


class KeypointHead(nn.Module):
    """``[KPT]`` hidden state ``(B, H_lm)`` -> MLP -> sigmoid ``(B, K, 2)`` normalised ``(x, y)``.

    Args:
        hidden_size: ``H_lm``.
        num_keypoints: ``K``.
        mlp_hidden: MLP width (default ``hidden_size``).
        num_layers: MLP depth (Linear layers).
    """

    def __init__(
        self,
        *,
        hidden_size: int,
        num_keypoints: int,
        mlp_hidden: int | None = None,
        num_layers: int = 3,
    ):
        super().__init__()
        if num_keypoints < 1:
            raise ValueError(f"num_keypoints must be >= 1, got {num_keypoints}")
        self.hidden_size = hidden_size
        self.num_keypoints = num_keypoints
        self.mlp = head_mlp(hidden_size, mlp_hidden or hidden_size, 2 * num_keypoints,
                            num_layers)

    def forward(self, kpt_hidden: Tensor) -> Tensor:
        """``(B, H_lm) -> (B, K, 2)`` normalised ``(x, y)`` in (0, 1)."""
        _check_hidden(kpt_hidden, self.hidden_size, "KeypointHead")
        return self.mlp(kpt_hidden).sigmoid().unflatten(-1, (self.num_keypoints, 2))


# ----------------------------------------------------------------------------- helpers
def _sizes_hw(image_sizes: Tensor | Sequence[int], batch: int, ref: Tensor) -> Tensor:
    """``(B, 2)`` float ``(H, W)`` on ``ref``'s device from a ``(B, 2)`` tensor or ``(H, W)``."""
    sizes = torch.as_tensor(image_sizes, device=ref.device)
    sizes = sizes.to(ref.dtype if ref.is_floating_point() else torch.float32)
    if sizes.shape == (2,):
        sizes = sizes.expand(batch, 2)
    if sizes.shape != (batch, 2):
        raise ValueError(f"image_sizes must be (H, W) or ({batch}, 2), got {tuple(sizes.shape)}")
    return sizes


def boxes_to_xyxy(
    boxes: Tensor, image_sizes: Tensor | Sequence[int] | None = None, *, inclusive: bool = False
) -> Tensor:
    """Normalised ``(cx, cy, w, h)`` -> ``(x0, y0, x1, y1)``.

    Args:
        boxes: ``(B, 4)`` (or ``(4,)``) normalised boxes.
        image_sizes: ``(B, 2)`` or ``(H, W)``; ``None`` keeps normalised coordinates.
        inclusive: with ``image_sizes``, return the inclusive pixel box of the collator
            (``x1 - 1, y1 - 1``: the index of the last covered pixel), which inverts
            :func:`echomoe.data.collate.normalise_box`; otherwise pixel *edges* (``x0`` is the
            left edge of the first pixel, ``x1`` the right edge of the last).

    Returns:
        Same leading shape as ``boxes``, last dim ``(x0, y0, x1, y1)``.
    """
    if boxes.shape[-1] != 4:
        raise ValueError(f"boxes must end in 4 values (cx, cy, w, h), got {tuple(boxes.shape)}")
    cx, cy, w, h = boxes.unbind(-1)
    xyxy = torch.stack((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), dim=-1)
    if image_sizes is None:
        if inclusive:
            raise ValueError("inclusive=True needs image_sizes")
        return xyxy
    flat = xyxy.reshape(-1, 4)
    sizes = _sizes_hw(image_sizes, flat.shape[0], flat)
    scale = torch.stack((sizes[:, 1], sizes[:, 0], sizes[:, 1], sizes[:, 0]), dim=-1)
    pixels = flat * scale
    if inclusive:
        pixels = pixels - torch.tensor([0.0, 0.0, 1.0, 1.0], device=pixels.device,
                                       dtype=pixels.dtype)
    return pixels.reshape(xyxy.shape)


def keypoints_to_pixels(points: Tensor, image_sizes: Tensor | Sequence[int]) -> Tensor:
    """Normalised ``(B, K, 2)`` ``(x, y)`` -> pixel coordinates ``(x * W - 0.5, y * H - 0.5)``.

    ``image_sizes`` is ``(B, 2)`` or one ``(H, W)``.  Inverts
    :func:`echomoe.data.collate.normalise_point` (pixel centres at integers).
    """
    if points.dim() != 3 or points.shape[-1] != 2:
        raise ValueError(f"points must be (B, K, 2), got {tuple(points.shape)}")
    sizes = _sizes_hw(image_sizes, points.shape[0], points)
    return points * sizes.flip(-1).unsqueeze(1) - 0.5


def measure_mm(
    points: Tensor,
    pairs: Sequence[tuple[int, int]],
    image_sizes: Tensor | Sequence[int],
    pixel_spacing: Tensor | float,
) -> Tensor:
    """Distances in mm between pairs of normalised keypoints.

    Args:
        points: ``(B, K, 2)`` normalised ``(x, y)``.
        pairs: ``P`` index pairs ``(i, j)`` into ``K``.
        image_sizes: ``(B, 2)`` ``(H, W)`` of the original image (or one ``(H, W)``).
        pixel_spacing: ``(B,)`` mm per original pixel (or a float); NaN (unknown) gives NaN.

    Returns:
        ``(B, P)``: ``hypot(dx * W, dy * H) * pixel_spacing``.
    """
    if points.dim() != 3 or points.shape[-1] != 2:
        raise ValueError(f"points must be (B, K, 2), got {tuple(points.shape)}")
    b, k, _ = points.shape
    pairs = [(int(i), int(j)) for i, j in pairs]
    bad = [p for p in pairs if not (0 <= p[0] < k and 0 <= p[1] < k)]
    if bad:
        raise ValueError(f"pairs {bad} index outside the {k} keypoints")
    if not pairs:
        return points.new_zeros(b, 0)
    idx = torch.tensor(pairs, device=points.device)
    sizes = _sizes_hw(image_sizes, b, points)
    delta = points[:, idx[:, 1]] - points[:, idx[:, 0]]  # (B, P, 2) normalised (dx, dy)
    length_px = torch.hypot(delta[..., 0] * sizes[:, 1:2], delta[..., 1] * sizes[:, 0:1])
    spacing = torch.as_tensor(pixel_spacing, device=points.device, dtype=length_px.dtype)
    return length_px * spacing.reshape(-1, 1)
