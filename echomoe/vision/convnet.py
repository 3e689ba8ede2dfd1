"""A hierarchical ConvNeXt-style image encoder with the :class:`ImageEncoder` face.

Small images and little data favour convolutions: at 64 px, trained from scratch on the
synthetic diagnoses with a linear head, a ConvNet of 71 k parameters scores 0.55 against 0.50
for a 91 k-parameter ViT with a convolutional stem, 0.43 with a patch stem, and a per-region
prior of 0.40 (3 seeds; ``experiments/benchmarks/encoders.py``)::

    enc = ConvNet(image_size=64, widths=(16, 32, 48), depths=(1, 1, 2))  # output stride 8
    tokens = enc.forward_features(x)                    # (B, 64, 48): one token per 8x8 cell
    tokens, maps = enc.forward_intermediates(x, 2)      # maps: 2 x (B, 48, 8, 8)

Layout: ``len(widths)`` stages; each halves the resolution with a stride-2 ``3 x 3``
convolution (per-pixel LayerNorm, GELU) and then runs ``depths[i]`` residual blocks
(:class:`ConvBlock`: depthwise ``k x k`` convolution, LayerNorm, per-pixel FFN).  The output
stride (``patch_size``) is ``2 ** len(widths)``, ``hidden_size`` is ``widths[-1]``.  The
*blocks* of the face (``depth``, ``forward_intermediates`` indices, ``moe_layers``) are those of
the last stage, whose maps have the token grid; the earlier stages act as the stem.  The FFN of
a last-stage block may be an MoE layer (expert choice or soft routing over pixels), exactly as
in :class:`~echomoe.vision.VisionTransformer`.

Axis legend: ``B`` batch, ``C`` channels, ``h``/``w`` feature-map rows/columns, ``N = h * w``.
"""

from __future__ import annotations

from collections.abc import Sequence

from einops import rearrange
from torch import Tensor, nn

from echomoe.moe.builders import build_dense_ffn, build_moe_layer
from echomoe.moe.layer import MoEOutput
from echomoe.moe.upcycle import select_layers
from echomoe.utils.sizes import image_hw
from echomoe.vision.encoder import VISION_ROUTERS, ImageEncoder, Size, _ChannelNorm


class ConvBlock(nn.Module):
    """ConvNeXt block built from parts: ``x + ffn(norm(mixer(x)))`` on a ``(B, C, h, w)`` map.

    ``mixer`` mixes space (a depthwise convolution), ``ffn`` mixes channels pixel by pixel (a
    ``DenseFFN``, ``MoELayer`` or ``SoftMoE`` on the ``(B, h*w, C)`` pixels, so it returns
    :class:`~echomoe.moe.layer.MoEOutput`, and so does the block, with ``(B, C, h, w)`` hidden
    states).
    """

    def __init__(self, *, mixer: nn.Module, norm: nn.Module, ffn: nn.Module) -> None:
        super().__init__()
        self.mixer = mixer
        self.norm = norm
        self.ffn = ffn

    def forward(self, x: Tensor) -> MoEOutput:
        """``(B, C, h, w) -> MoEOutput`` with ``hidden_states (B, C, h, w)``."""
        h, w = x.shape[-2:]
        pixels = rearrange(self.mixer(x), "b c h w -> b (h w) c")
        out = self.ffn(self.norm(pixels))
        update = rearrange(out.hidden_states, "b (h w) c -> b c h w", h=h, w=w)
        return MoEOutput(x + update, out.aux_losses, out.routing)


def build_conv_block(
    channels: int,
    intermediate_size: int,
    *,
    kernel_size: int = 5,
    moe: bool = False,
    router: str = "expert_choice",
    num_experts: int = 4,
    moe_intermediate_size: int | None = None,
    capacity_factor: float = 2.0,
    slots_per_expert: int = 1,
    num_regions: int = 7,
    norm_eps: float = 1e-6,
) -> ConvBlock:
    """Component builder: one :class:`ConvBlock`, dense or MoE (``router`` one of
    :data:`~echomoe.vision.VISION_ROUTERS`; the other MoE arguments as
    :func:`~echomoe.vision.build_vit_block`)."""
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd int, got {kernel_size}")
    if moe:
        if router not in VISION_ROUTERS:
            raise ValueError(f"unknown vision router {router!r}; valid: "
                             f"{', '.join(VISION_ROUTERS)}")
        ffn = build_moe_layer(channels, moe_intermediate_size or intermediate_size,
                              num_experts=num_experts, top_k=1, router=router,
                              num_regions=num_regions, activation="gelu",
                              capacity_factor=capacity_factor, slots_per_expert=slots_per_expert)
    else:
        ffn = build_dense_ffn(channels, intermediate_size, "gelu")
    mixer = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels)
    return ConvBlock(mixer=mixer, norm=nn.LayerNorm(channels, eps=norm_eps), ffn=ffn)


def check_layout(widths: Sequence[int], depths: Sequence[int]) -> None:
    """Raise ``ValueError`` unless ``widths`` / ``depths`` describe a :class:`ConvNet`: one
    positive width and one depth ``>= 0`` per stage, the last depth ``>= 1`` (those blocks are
    the encoder's).  Config validation calls it too, so a bad layout fails before a build."""
    widths, depths = list(widths), list(depths)
    if not widths or not all(isinstance(c, int) and c > 0 for c in widths):
        raise ValueError(f"widths must be positive ints (one per stage), got {widths}")
    if len(depths) != len(widths) or not all(isinstance(d, int) and d >= 0 for d in depths) \
            or depths[-1] < 1:
        raise ValueError(f"depths must be {len(widths)} ints >= 0 (one per stage of "
                         f"widths={widths}), the last >= 1, got {depths}")


def _downsample(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False),
                         _ChannelNorm(c_out), nn.GELU())


class ConvNet(ImageEncoder):
    """A hierarchical ConvNeXt-style encoder for 1- or 3-channel images (see the module).

    Args:
        image_size: training image size (int or ``(H, W)``); any multiple of the output
            stride works at inference (no position embeddings).
        in_channels: 1 (grayscale ultrasound) or 3.
        widths: channels of each stage (``hidden_size = widths[-1]``, output stride
            ``2 ** len(widths)``).
        depths: residual blocks per stage (the last one >= 1: those are the encoder's blocks).
        kernel_size: the depthwise convolution's side (odd).
        mlp_ratio: FFN width = ``mlp_ratio * width`` of the stage.
        moe_layers: last-stage blocks with an MoE FFN: ``()`` none, ``"all"``, ``k`` (every
            ``k``-th) or a list of indices.
        router, num_experts, moe_intermediate_size, capacity_factor, slots_per_expert,
            num_regions: see :func:`build_conv_block`.
    """

    def __init__(
        self,
        image_size: Size = 224,
        in_channels: int = 1,
        widths: Sequence[int] = (32, 64, 128, 256),
        depths: Sequence[int] = (1, 1, 2, 2),
        kernel_size: int = 5,
        mlp_ratio: float = 4.0,
        *,
        moe_layers: str | int | Sequence[int] = (),
        router: str = "expert_choice",
        num_experts: int = 4,
        moe_intermediate_size: int | None = None,
        capacity_factor: float = 2.0,
        slots_per_expert: int = 1,
        num_regions: int = 7,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        widths, depths = list(widths), list(depths)
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {in_channels}")
        check_layout(widths, depths)
        self.hidden_size = widths[-1]
        self.patch_size = 2 ** len(widths)
        self.in_channels = in_channels
        self.image_size = image_hw(image_size)
        self.depth = depths[-1]
        self.num_prefix_tokens = 0
        self.grid_size()  # the training size must be a multiple of the output stride
        self.moe_layers = select_layers(self.depth, moe_layers)

        def block(width: int, moe: bool) -> ConvBlock:
            return build_conv_block(
                width, int(mlp_ratio * width), kernel_size=kernel_size, moe=moe, router=router,
                num_experts=num_experts, moe_intermediate_size=moe_intermediate_size,
                capacity_factor=capacity_factor, slots_per_expert=slots_per_expert,
                num_regions=num_regions, norm_eps=norm_eps)

        inputs = [in_channels, *widths[:-1]]
        stem: list[nn.Module] = []
        for c_in, c_out, n in zip(inputs[:-1], widths[:-1], depths[:-1], strict=True):
            stem += [_downsample(c_in, c_out), *(block(c_out, False) for _ in range(n))]
        stem.append(_downsample(inputs[-1], widths[-1]))
        self.stem = nn.ModuleList(stem)
        self.blocks = nn.ModuleList(block(widths[-1], i in self.moe_layers)
                                    for i in range(self.depth))
        self.norm = nn.LayerNorm(widths[-1], eps=norm_eps)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def _run(self, x: Tensor, keep: set[int]) -> tuple[Tensor, dict[int, Tensor]]:
        """The last stage's map ``(B, C, h, w)`` and the outputs of the blocks in ``keep``."""
        x = self.prepare_input(x).to(self.norm.weight.dtype)
        for layer in self.stem:
            x = layer(x).hidden_states if isinstance(layer, ConvBlock) else layer(x)
        return self._run_blocks(x, keep)

    def _tokens(self, grid_map: Tensor) -> Tensor:
        return self.norm(rearrange(grid_map, "b c h w -> b (h w) c"))

    def forward_features(self, x: Tensor) -> Tensor:
        """``(B, C_in, H, W) -> (B, H/p * W/p, C)`` normalised pixel tokens (row-major)."""
        return self._tokens(self._run(x, set())[0])

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | Sequence[int] | None = None,
        *,
        norm: bool = False,
        intermediates_only: bool = False,
    ) -> tuple[Tensor, list[Tensor]] | list[Tensor]:
        """Last-stage block outputs as ``(B, C, H/p, W/p)`` maps (final norm applied if
        ``norm``); returns ``(tokens (B, N, C), maps)`` or only ``maps``."""
        wanted = self.resolve_indices(indices)
        final, kept = self._run(x, set(wanted))
        grid = tuple(final.shape[-2:])
        maps = [self.tokens_to_map(self._tokens(kept[i]), grid) if norm else kept[i]
                for i in wanted]
        if intermediates_only:
            return maps
        return self._tokens(final), maps
