"""Mask decoders: ``[SEG]`` hidden state + pixel features -> mask logits at the image size.

Both decoders share one call signature::

    decoder(seg_hidden (B, H_lm), pixel_features (B, D, h, w), image_size) -> (B, H, W) logits

* :class:`DynamicConvMaskDecoder` (UMind-VL style, also CondInst): an MLP (the "controller")
  maps each ``[SEG]`` hidden state to the flattened weights and biases of a few small conv
  layers, which are then applied to *that sample's* pixel features (one grouped conv over the
  batch per layer), ReLU between, last layer one channel.
* :class:`DotProductMaskHead` (ablation, LISA/SAM-like): project the hidden state to ``D`` and
  take the dot product with the feature vector of every location.

Logits are upsampled bilinearly (``align_corners=False``) to ``image_size``.  ``B`` is the
number of masks: one row per ``[SEG]`` token, with ``pixel_features`` gathered to match.

Axis legend: ``B`` masks, ``H_lm`` LM hidden size, ``D`` pixel-feature channels, ``(h, w)``
feature grid, ``(H, W)`` image size, ``c`` dynamic conv hidden channels, ``k`` kernel size.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn
from torch.nn import functional as F

from echomoe.grounding.heads import head_mlp
from echomoe.utils.sizes import image_hw


def _check_inputs(name: str, seg_hidden: Tensor, features: Tensor, hidden: int, dim: int) -> None:
    if seg_hidden.dim() != 2 or seg_hidden.shape[1] != hidden:
        raise ValueError(f"{name}: seg_hidden must be (B, {hidden}), got "
                         f"{tuple(seg_hidden.shape)}")
    if features.dim() != 4 or features.shape[1] != dim:
        raise ValueError(f"{name}: pixel_features must be (B, {dim}, h, w), got "
                         f"{tuple(features.shape)}")
    if features.shape[0] != seg_hidden.shape[0]:
        raise ValueError(f"{name}: {seg_hidden.shape[0]} hidden states but "
                         f"{features.shape[0]} feature maps")


def _upsample(logits: Tensor, image_size: int | Sequence[int]) -> Tensor:
    """``(B, 1, h, w) -> (B, H, W)`` bilinear."""
    size = image_hw(image_size)
    if logits.shape[-2:] != size:
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    return logits[:, 0]


class DynamicConvMaskDecoder(nn.Module):
    """Conv kernels generated from the ``[SEG]`` hidden state (UMind-VL's mask decoder).

    Layer ``l`` maps ``in_l -> out_l`` channels with a ``k x k`` kernel: ``D -> c -> ... -> c ->
    1`` over ``num_layers`` layers (``num_layers = 1``: ``D -> 1``, a dynamic linear probe).
    The controller outputs ``sum_l out_l * (in_l * k * k + 1)`` numbers per mask; generated
    weights are scaled by ``(in_l * k * k) ** -0.5`` (He-like fan-in scaling, so unit-scale
    controller outputs give well-scaled activations), biases are used as they are.

    Args:
        hidden_size: ``H_lm``.
        in_channels: ``D`` (a :class:`~echomoe.grounding.PixelDecoder`'s ``out_channels``).
        conv_channels: hidden channels ``c`` of the dynamic convs.
        num_layers: number of dynamic conv layers (>= 1).
        kernel_size: odd ``k``, "same" padding.  3 by default: in our overfit check
            (4 masks, 200 steps) 1x1 kernels sometimes got stuck with every hidden ReLU dead
            inside a region (constant logits there), 3x3 kernels did not.
        mlp_hidden: controller width (default ``hidden_size``).
        mlp_layers: controller depth (Linear layers).
    """

    def __init__(
        self,
        *,
        hidden_size: int,
        in_channels: int,
        conv_channels: int = 8,
        num_layers: int = 3,
        kernel_size: int = 3,
        mlp_hidden: int | None = None,
        mlp_layers: int = 2,
    ):
        super().__init__()
        if num_layers < 1 or conv_channels < 1:
            raise ValueError(f"num_layers and conv_channels must be >= 1, got {num_layers}, "
                             f"{conv_channels}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self.hidden_size = hidden_size
        self.in_channels = in_channels
        self.kernel_size = kernel_size
        chans = [in_channels] + [conv_channels] * (num_layers - 1) + [1]
        self.layer_shapes = tuple(zip(chans[1:], chans[:-1], strict=True))  # (out_l, in_l)
        self.param_sizes = tuple(
            n for o, i in self.layer_shapes for n in (o * i * kernel_size**2, o)
        )
        self.num_dynamic_params = sum(self.param_sizes)
        self.controller = head_mlp(hidden_size, mlp_hidden or hidden_size,
                                   self.num_dynamic_params, mlp_layers)

    def generate_kernels(self, seg_hidden: Tensor) -> list[tuple[Tensor, Tensor]]:
        """``(B, H_lm)`` -> per layer ``(weight (B, out_l, in_l, k, k), bias (B, out_l))``."""
        b, k = seg_hidden.shape[0], self.kernel_size
        chunks = self.controller(seg_hidden).split(self.param_sizes, dim=1)
        kernels = []
        for n, (o, i) in enumerate(self.layer_shapes):
            weight = chunks[2 * n].reshape(b, o, i, k, k) * (i * k * k) ** -0.5
            kernels.append((weight, chunks[2 * n + 1]))
        return kernels

    def dynamic_convs(self, pixel_features: Tensor, kernels: list[tuple[Tensor, Tensor]]) -> Tensor:
        """Apply per-sample kernels: ``(B, D, h, w) -> (B, 1, h, w)`` low-resolution logits.

        The batch is folded into channels, ``(1, B*in_l, h, w)``, and each layer is one
        ``F.conv2d`` with ``groups=B`` and weights ``(B*out_l, in_l, k, k)``.
        """
        b, _, h, w = pixel_features.shape
        x = pixel_features.reshape(1, -1, h, w)
        for n, (weight, bias) in enumerate(kernels):
            x = F.conv2d(x, weight.flatten(0, 1), bias.flatten(), padding=self.kernel_size // 2,
                         groups=b)
            if n < len(kernels) - 1:
                x = F.relu(x)
        return x.reshape(b, 1, h, w)

    def forward(
        self, seg_hidden: Tensor, pixel_features: Tensor, image_size: int | Sequence[int]
    ) -> Tensor:
        """``(B, H_lm)``, ``(B, D, h, w)``, ``(H, W)`` -> ``(B, H, W)`` mask logits."""
        _check_inputs("DynamicConvMaskDecoder", seg_hidden, pixel_features, self.hidden_size,
                      self.in_channels)
        kernels = self.generate_kernels(seg_hidden.to(pixel_features.dtype))
        return _upsample(self.dynamic_convs(pixel_features, kernels), image_size)


class DotProductMaskHead(nn.Module):
    """Ablation: ``logits[b, y, x] = <proj(seg_hidden[b]), pixel_features[b, :, y, x]>``.

    Args:
        hidden_size: ``H_lm``.
        in_channels: ``D``.
        mlp_hidden: projection width when ``mlp_layers > 1`` (default ``hidden_size``).
        mlp_layers: projection depth (1: a single Linear ``H_lm -> D`` with bias).
    """

    def __init__(
        self,
        *,
        hidden_size: int,
        in_channels: int,
        mlp_hidden: int | None = None,
        mlp_layers: int = 1,
    ):
        super().__init__()
        self.hidden_size = hidden_size
        self.in_channels = in_channels
        self.proj = head_mlp(hidden_size, mlp_hidden or hidden_size, in_channels, mlp_layers)

    def forward(
        self, seg_hidden: Tensor, pixel_features: Tensor, image_size: int | Sequence[int]
    ) -> Tensor:
        """``(B, H_lm)``, ``(B, D, h, w)``, ``(H, W)`` -> ``(B, H, W)`` mask logits."""
        _check_inputs("DotProductMaskHead", seg_hidden, pixel_features, self.hidden_size,
                      self.in_channels)
        query = self.proj(seg_hidden.to(pixel_features.dtype))  # (B, D)
        logits = (query[:, :, None, None] * pixel_features).sum(1, keepdim=True)
        return _upsample(logits, image_size)
