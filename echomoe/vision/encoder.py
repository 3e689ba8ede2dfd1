"""Image encoders with one face: a native ViT (optionally with MoE FFNs) and an HF wrapper.

Every encoder is an :class:`ImageEncoder` (timm style), so any backbone feeds any projector or
pixel decoder::

    enc = VisionTransformer(image_size=224, patch_size=16, hidden_size=384, depth=12,
                            num_heads=6, moe_layers=2, router="expert_choice", num_experts=4)
    tokens = enc.forward_features(x)                         # (B, N, C) patch tokens
    tokens, maps = enc.forward_intermediates(x, [3, 7, 11])  # maps: [(B, C, H/p, W/p), ...]
    enc.aux_losses                                           # {"z": ...} of that forward

    hf = HFVisionEncoder.from_pretrained("/models/siglip-base-patch16-224")   # local dir only
    hf = HFVisionEncoder.from_config(SiglipVisionConfig(hidden_size=32, ...))  # random weights

Common face (:class:`ImageEncoder`):

* ``forward_features(x)``: ``(B, C_in, H, W) -> (B, N, C)`` patch tokens (``N = H/p * W/p``,
  row-major), after the encoder's final norm; cls / register tokens are dropped.
* ``forward_intermediates(x, indices=None, *, norm=False, intermediates_only=False)``: block
  outputs as feature maps ``(B, C, H/p, W/p)``; returns ``(final_tokens, maps)`` like timm (or
  only ``maps`` with ``intermediates_only=True``).  ``indices``: ``None`` = every block, an int
  ``n`` = the last ``n`` blocks, a sequence = those blocks (negative indices count from the end);
  maps come in the order of ``indices`` (shallow -> deep for ``None`` / ``n``).
* attributes ``hidden_size`` (``C``), ``patch_size`` (``p``), ``in_channels``, ``image_size``
  (the size the position embeddings were trained at), ``depth``, ``num_prefix_tokens``;
  ``num_patches(image_size)``; ``aux_losses``: raw MoE aux losses of the last forward, each
  averaged over the MoE blocks (empty for dense encoders); ``routing``: per-block routing info.

Input: a 4-D float tensor whose channel count is the encoder's ``in_channels``, or 1
(grayscale, repeated to ``in_channels``); ``H`` and ``W`` multiples of the patch size; anything
else raises ``ValueError`` naming expected and received shapes.

Axis legend: ``B`` batch, ``C`` hidden size, ``N`` patch tokens, ``T`` tokens incl. prefix
tokens, ``h``/``w`` patch-grid rows/columns, ``H``/``W`` pixels, ``p`` patch size.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from echomoe.moe.builders import build_dense_ffn, build_moe_layer
from echomoe.moe.layer import MoEOutput, RoutingInfo
from echomoe.moe.upcycle import select_layers
from echomoe.utils.sizes import image_hw

VISION_ROUTERS = ("expert_choice", "soft")

Size = int | tuple[int, int]


class ImageEncoder(nn.Module):
    """The face every echomoe image encoder shows; subclasses set the attributes below.

    Subclasses implement ``forward_features`` and ``forward_intermediates``; this base class
    supplies input validation, grid arithmetic and index resolution.
    """

    hidden_size: int
    patch_size: int
    in_channels: int
    image_size: tuple[int, int]
    depth: int
    num_prefix_tokens: int

    def __init__(self) -> None:
        super().__init__()
        self.aux_losses: dict[str, Tensor] = {}
        self.routing: dict[str, RoutingInfo] = {}

    def grid_size(self, image_size: Size | None = None) -> tuple[int, int]:
        """Patch grid ``(h, w)`` for an image of ``image_size`` (default: the trained size)."""
        height, width = image_hw(self.image_size if image_size is None else image_size)
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"image size {height}x{width} is not a multiple of the patch size "
                f"{self.patch_size}"
            )
        return height // self.patch_size, width // self.patch_size

    def num_patches(self, image_size: Size | None = None) -> int:
        """Number of patch tokens ``N`` for ``image_size`` (int or ``(H, W)``)."""
        h, w = self.grid_size(image_size)
        return h * w

    def prepare_input(self, x: Tensor) -> Tensor:
        """Validate ``x (B, 1 | in_channels, H, W)``; repeat grayscale to ``in_channels``."""
        if not isinstance(x, Tensor) or x.dim() != 4:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"{type(self).__name__} expected a 4-D image batch (batch, {self.in_channels}, "
                f"height, width), got {got}"
            )
        channels = x.shape[1]
        if channels not in (1, self.in_channels):
            raise ValueError(
                f"{type(self).__name__} expected {self.in_channels} channels (or 1, grayscale), "
                f"got {channels} in input of shape {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise ValueError(f"expected floating point pixel values, got {x.dtype}")
        self.grid_size(tuple(x.shape[-2:]))
        if channels != self.in_channels:
            x = x.expand(-1, self.in_channels, -1, -1)
        return x

    def resolve_indices(self, indices: int | Sequence[int] | None) -> list[int]:
        """Block indices in ``[0, depth)`` for ``indices`` (``None``, last-``n`` int, or list)."""
        if indices is None:
            return list(range(self.depth))
        if isinstance(indices, int) and not isinstance(indices, bool):
            if not 0 < indices <= self.depth:
                raise ValueError(f"indices={indices}: need 1 <= n <= depth={self.depth}")
            return list(range(self.depth - indices, self.depth))
        resolved = []
        for i in indices:
            j = int(i) + self.depth if int(i) < 0 else int(i)
            if not 0 <= j < self.depth:
                raise ValueError(f"block index {i} out of range for depth {self.depth}")
            resolved.append(j)
        return resolved

    def _run_blocks(self, x: Tensor, keep: set[int]) -> tuple[Tensor, dict[int, Tensor]]:
        """Run every block of ``self.blocks`` (each returns ``MoEOutput``) on ``x``; record the
        MoE aux losses (averaged over blocks) / routing, and the outputs of the blocks in
        ``keep``."""
        kept: dict[int, Tensor] = {}
        losses: dict[str, list[Tensor]] = {}
        self.routing = {}
        for i, block in enumerate(self.blocks):
            out = block(x)
            x = out.hidden_states
            for name, value in out.aux_losses.items():
                losses.setdefault(name, []).append(value)
            if out.routing is not None:
                self.routing[f"blocks.{i}"] = out.routing
            if i in keep:
                kept[i] = x
        self.aux_losses = {k: torch.stack(v).mean() for k, v in losses.items()}
        return x, kept

    def tokens_to_map(self, tokens: Tensor, grid: tuple[int, int]) -> Tensor:
        """``(B, T, C)`` with prefix tokens -> ``(B, C, h, w)`` feature map."""
        patches = tokens[:, self.num_prefix_tokens :]
        return rearrange(patches, "b (h w) c -> b c h w", h=grid[0], w=grid[1])

    def forward(self, x: Tensor) -> Tensor:
        """Same as :meth:`forward_features`: ``(B, C_in, H, W) -> (B, N, C)``."""
        return self.forward_features(x)

    def forward_features(self, x: Tensor) -> Tensor:  # pragma: no cover - interface
        """Final patch tokens: ``(B, C_in, H, W) -> (B, N, C)`` with ``N = (H/p)·(W/p)``.

        Prefix tokens (class / register tokens) are dropped; ``C`` is :attr:`hidden_size`.
        """
        raise NotImplementedError

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | Sequence[int] | None = None,
        *,
        norm: bool = False,
        intermediates_only: bool = False,
    ) -> tuple[Tensor, list[Tensor]] | list[Tensor]:  # pragma: no cover - interface
        """Final tokens plus intermediate block outputs as feature maps (timm's interface).

        Args:
            x: images ``(B, 1 | C_in, H, W)``, floating point.
            indices: blocks to return: ``None`` (all), an int ``n`` (the last ``n``) or a list
                of block indices (negative counts from the end); see :meth:`resolve_indices`.
            norm: apply the final norm to the returned maps.
            intermediates_only: return only the maps.

        Returns:
            ``(tokens (B, N, C), maps)`` where ``maps`` is a list of ``(B, C, H/p, W/p)``
            tensors, one per requested block, or only ``maps`` with ``intermediates_only``.
        """
        raise NotImplementedError


class Attention(nn.Module):
    """Multi-head self-attention over ``(B, T, C)`` with ``F.scaled_dot_product_attention``."""

    def __init__(self, hidden_size: int, num_heads: int, *, qkv_bias: bool = True) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=qkv_bias)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, T, C) -> (B, T, C)``; every token attends to every token (not causal)."""
        q, k, v = rearrange(self.qkv(x), "b t (three n d) -> three b n t d", three=3,
                            n=self.num_heads)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(rearrange(out, "b n t d -> b t (n d)"))


class Block(nn.Module):
    """Pre-norm transformer block built from parts (torchtune style, keyword-only).

    ``x + attn(norm1(x))`` then ``+ ffn(norm2(x))``.  ``ffn`` returns
    :class:`~echomoe.moe.layer.MoEOutput` (a ``DenseFFN``, ``MoELayer`` or ``SoftMoE``), and so
    does the block: its hidden states are the block output, its losses those of the FFN.
    """

    def __init__(
        self, *, attn: nn.Module, ffn: nn.Module, norm1: nn.Module, norm2: nn.Module
    ) -> None:
        super().__init__()
        self.norm1 = norm1
        self.attn = attn
        self.norm2 = norm2
        self.ffn = ffn

    def forward(self, x: Tensor) -> MoEOutput:
        """``(B, T, C) -> MoEOutput`` with ``hidden_states (B, T, C)``."""
        x = x + self.attn(self.norm1(x))
        out = self.ffn(self.norm2(x))
        return MoEOutput(x + out.hidden_states, out.aux_losses, out.routing)


def build_vit_block(
    hidden_size: int,
    num_heads: int,
    intermediate_size: int,
    *,
    moe: bool = False,
    router: str = "expert_choice",
    num_experts: int = 4,
    moe_intermediate_size: int | None = None,
    capacity_factor: float = 2.0,
    slots_per_expert: int = 1,
    num_regions: int = 7,
    activation: str = "gelu",
    qkv_bias: bool = True,
    norm_eps: float = 1e-6,
) -> Block:
    """Component builder: one pre-norm ViT block, dense or MoE.

    Args:
        hidden_size: ``C``.
        num_heads: attention heads.
        intermediate_size: dense FFN width.
        moe: use a routed FFN (``router`` one of :data:`VISION_ROUTERS`, both non-causal).
        num_experts: ``E``.
        moe_intermediate_size: width of one expert (default: ``intermediate_size``, i.e. each
            expert the size of the dense FFN it replaces, as in sparse upcycling).
        capacity_factor: expert choice: average experts per token.
        slots_per_expert: soft MoE slots per expert.
        num_regions: region ids the FFN accepts (statistics only for these routers).
        activation: FFN activation (``gelu`` as in ViT).
    """
    if moe:
        if router not in VISION_ROUTERS:
            raise ValueError(
                f"unknown vision router {router!r}; valid: {', '.join(VISION_ROUTERS)} "
                "(token-choice routers belong in the language model)"
            )
        ffn = build_moe_layer(
            hidden_size,
            moe_intermediate_size or intermediate_size,
            num_experts=num_experts,
            top_k=1,
            router=router,
            num_regions=num_regions,
            activation=activation,
            capacity_factor=capacity_factor,
            slots_per_expert=slots_per_expert,
        )
    else:
        ffn = build_dense_ffn(hidden_size, intermediate_size, activation)
    return Block(
        attn=Attention(hidden_size, num_heads, qkv_bias=qkv_bias),
        ffn=ffn,
        norm1=nn.LayerNorm(hidden_size, eps=norm_eps),
        norm2=nn.LayerNorm(hidden_size, eps=norm_eps),
    )


class _ChannelNorm(nn.LayerNorm):
    """LayerNorm over the channels of each pixel of a ``(B, C, H, W)`` map (local, unlike
    GroupNorm, and independent of the batch, unlike BatchNorm)."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvStem(nn.Module):
    """Patch embedding by ``log2(p)`` stride-2 ``3 x 3`` convolutions (each followed by a
    per-pixel LayerNorm over channels and GELU), then a ``1 x 1`` projection to ``hidden_size``:
    ``(B, C_in, H, W) -> (B, C, H/p, W/p)``.

    By default channels double at each stage and end at ``hidden_size`` (at least 8 per
    stage); ``channels`` sets each stage's width instead (one per stage).  It sees overlapping
    ``3 x 3`` neighbourhoods instead of disjoint patches, which makes a small ViT trained from
    scratch learn shapes and edges much sooner.
    """

    def __init__(self, in_channels: int, hidden_size: int, patch_size: int,
                 channels: Sequence[int] | None = None) -> None:
        super().__init__()
        stages = patch_size.bit_length() - 1
        if patch_size < 2 or 1 << stages != patch_size:
            raise ValueError(f"the conv stem needs a power-of-two patch_size >= 2, got "
                             f"{patch_size}")
        widths = (list(channels) if channels is not None else
                  [max(hidden_size >> (stages - 1 - i), 8) for i in range(stages)])
        if len(widths) != stages or not all(isinstance(c, int) and c > 0 for c in widths):
            raise ValueError(f"stem_channels must be {stages} positive ints (one per stride-2 "
                             f"stage of patch size {patch_size}), got {widths}")
        layers: list[nn.Module] = []
        for c_in, c_out in zip([in_channels, *widths], widths, strict=False):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False),
                       _ChannelNorm(c_out), nn.GELU()]
        layers.append(nn.Conv2d(widths[-1], hidden_size, 1))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C_in, H, W) -> (B, hidden_size, H / p, W / p)``."""
        return self.layers(x)


class VisionTransformer(ImageEncoder):
    """A native ViT for 1- or 3-channel images, optionally with MoE FFNs (V-MoE style).

    Args:
        image_size: training image size (int or ``(H, W)``); position embeddings are learned
            for its patch grid and bicubically interpolated for other sizes.
        patch_size: ``p``.
        in_channels: 1 (grayscale ultrasound) or 3.
        hidden_size: ``C``.
        depth: number of blocks.
        num_heads: attention heads.
        mlp_ratio: dense FFN width = ``mlp_ratio * hidden_size`` unless ``intermediate_size``.
        intermediate_size: dense FFN width.
        moe_layers: blocks with an MoE FFN: ``()`` none, ``"all"``, ``k`` (every ``k``-th:
            blocks ``k-1, 2k-1, ...``) or a list of indices.
        router: ``"expert_choice"`` or ``"soft"`` (non-causal routers only).
        num_experts, moe_intermediate_size, capacity_factor, slots_per_expert, num_regions:
            see :func:`build_vit_block`.
        class_token: prepend a learned cls token (it has no position embedding; it is dropped
            from ``forward_features`` and feature maps).
        stem: ``"patch"`` (a ``p x p`` stride-``p`` convolution, as ViT) or ``"conv"``
            (:class:`ConvStem`: ``log2 p`` stride-2 3x3 convolutions, the early convolutions
            that help ViTs trained from scratch on little data, Xiao et al. 2021).
        stem_channels: the conv stem's width per stage (``log2 p`` ints; default: doubling
            up to ``hidden_size``).
    """

    def __init__(
        self,
        image_size: Size = 224,
        patch_size: int = 16,
        in_channels: int = 1,
        hidden_size: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        intermediate_size: int | None = None,
        *,
        moe_layers: str | int | Sequence[int] = (),
        router: str = "expert_choice",
        num_experts: int = 4,
        moe_intermediate_size: int | None = None,
        capacity_factor: float = 2.0,
        slots_per_expert: int = 1,
        num_regions: int = 7,
        class_token: bool = True,
        qkv_bias: bool = True,
        norm_eps: float = 1e-6,
        stem: str = "patch",
        stem_channels: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {in_channels}")
        self.hidden_size = hidden_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.image_size = image_hw(image_size)
        self.depth = depth
        self.num_prefix_tokens = 1 if class_token else 0
        grid = self.grid_size()
        if stem == "patch":
            self.patch_embed = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        elif stem == "conv":
            self.patch_embed = ConvStem(in_channels, hidden_size, patch_size, stem_channels)
        else:
            raise ValueError(f"stem must be 'patch' or 'conv', got {stem!r}")
        if stem_channels is not None and stem != "conv":
            raise ValueError("stem_channels needs stem='conv'")
        self.stem = stem
        self.pos_embed = nn.Parameter(torch.randn(1, grid[0] * grid[1], hidden_size) * 0.02)
        self.cls_token = nn.Parameter(torch.randn(1, 1, hidden_size) * 0.02) if class_token \
            else None
        self.moe_layers = select_layers(depth, moe_layers)
        width = intermediate_size or int(mlp_ratio * hidden_size)
        self.blocks = nn.ModuleList(
            build_vit_block(
                hidden_size,
                num_heads,
                width,
                moe=i in self.moe_layers,
                router=router,
                num_experts=num_experts,
                moe_intermediate_size=moe_intermediate_size,
                capacity_factor=capacity_factor,
                slots_per_expert=slots_per_expert,
                num_regions=num_regions,
                qkv_bias=qkv_bias,
                norm_eps=norm_eps,
            )
            for i in range(depth)
        )
        self.norm = nn.LayerNorm(hidden_size, eps=norm_eps)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def interpolate_pos_embed(self, grid: tuple[int, int]) -> Tensor:
        """Position embeddings ``(1, h*w, C)`` for patch grid ``grid``.

        The learned ``(1, h0*w0, C)`` table itself at the trained grid; otherwise its bicubic
        interpolation (``align_corners=False``) as a ``C``-channel ``h0 x w0`` image.
        """
        base = self.grid_size()
        if tuple(grid) == base:
            return self.pos_embed
        table = rearrange(self.pos_embed, "1 (h w) c -> 1 c h w", h=base[0], w=base[1])
        table = F.interpolate(table, size=tuple(grid), mode="bicubic", align_corners=False)
        return rearrange(table, "1 c h w -> 1 (h w) c")

    def _embed(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """``(B, C_in, H, W) -> (B, T, C)`` tokens (cls first) and the patch grid."""
        x = self.prepare_input(x).to(self.pos_embed.dtype)
        patches = self.patch_embed(x)  # (B, C, h, w)
        grid = (patches.shape[-2], patches.shape[-1])
        tokens = rearrange(patches, "b c h w -> b (h w) c") + self.interpolate_pos_embed(grid)
        if self.cls_token is not None:
            tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        return tokens, grid

    def forward_features(self, x: Tensor) -> Tensor:
        """``(B, C_in, H, W) -> (B, H/p * W/p, C)`` normalised patch tokens."""
        tokens, _ = self._embed(x)
        tokens, _ = self._run_blocks(tokens, set())
        return self.norm(tokens)[:, self.num_prefix_tokens :]

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | Sequence[int] | None = None,
        *,
        norm: bool = False,
        intermediates_only: bool = False,
    ) -> tuple[Tensor, list[Tensor]] | list[Tensor]:
        """Block outputs as ``(B, C, H/p, W/p)`` maps (final norm applied if ``norm``).

        Returns ``(tokens (B, N, C), maps)`` or only ``maps`` with ``intermediates_only``.
        """
        wanted = self.resolve_indices(indices)
        tokens, grid = self._embed(x)
        tokens, kept = self._run_blocks(tokens, set(wanted))
        maps = [self.tokens_to_map(self.norm(kept[i]) if norm else kept[i], grid) for i in wanted]
        if intermediates_only:
            return maps
        return self.norm(tokens)[:, self.num_prefix_tokens :], maps


# model_type -> (transformers class name, has interpolate_pos_encoding argument)
_HF_MODELS = {
    "siglip_vision_model": ("SiglipVisionModel", True),
    "clip_vision_model": ("CLIPVisionModel", True),
    "dinov2": ("Dinov2Model", False),
    "dinov2_with_registers": ("Dinov2WithRegistersModel", False),
}
_HF_COMPOSITE = {"siglip": "siglip_vision_model", "clip": "clip_vision_model"}


def _hf_class(model_type: str) -> tuple[type, bool]:
    import transformers

    model_type = _HF_COMPOSITE.get(model_type, model_type)
    if model_type not in _HF_MODELS:
        raise ValueError(
            f"unsupported vision model type {model_type!r}; supported: "
            f"{', '.join(sorted(_HF_MODELS))} (and full 'siglip' / 'clip' checkpoints)"
        )
    name, interpolates = _HF_MODELS[model_type]
    return getattr(transformers, name), interpolates


class HFVisionEncoder(ImageEncoder):
    """A ``transformers`` vision model (SigLIP, CLIP, DINOv2 [+registers]) with the common face.

    Build it with :meth:`from_config` (random weights, offline) or :meth:`from_pretrained`
    (a *local* directory); ``HFVisionEncoder(model)`` wraps an already-built model.  Intermediate
    maps come from ``output_hidden_states=True`` (``hidden_states[i + 1]`` is block ``i``);
    cls / register tokens are dropped.  ``forward_features`` returns the model's
    ``last_hidden_state`` patch tokens: after the final layer norm for SigLIP and DINOv2, and
    without one for CLIP (whose ``post_layernorm`` only normalises its pooled cls output and so
    gets no gradient here; nor does DINOv2's ``mask_token``).  SigLIP's attention-pooling head
    is removed (``vision_use_head=False``) since nothing here uses it.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        config = model.config
        _, self._interpolates = _hf_class(config.model_type)
        self.model = model
        self.hidden_size = config.hidden_size
        self.patch_size = int(image_hw(config.patch_size, "patch_size")[0])
        self.in_channels = int(config.num_channels)
        self.image_size = image_hw(config.image_size)
        self.depth = config.num_hidden_layers
        registers = getattr(config, "num_register_tokens", 0) or 0
        self.num_prefix_tokens = 0 if config.model_type == "siglip_vision_model" else 1 + registers
        norm = getattr(model, "post_layernorm", None) if self.num_prefix_tokens == 0 \
            else getattr(model, "layernorm", None)
        self._final_norm = norm if norm is not None else nn.Identity()

    @classmethod
    def from_config(cls, config) -> HFVisionEncoder:
        """Random-weight encoder from a vision config (or a full SigLIP/CLIP config)."""
        if config.model_type in _HF_COMPOSITE:
            config = config.vision_config
        model_cls, _ = _hf_class(config.model_type)
        if getattr(config, "vision_use_head", False):
            config = copy.deepcopy(config)
            config.vision_use_head = False
        return cls(model_cls(config))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs) -> HFVisionEncoder:
        """Load from a local directory (``from_pretrained(path, local_files_only=True)``).

        ``kwargs`` go to ``transformers``' ``from_pretrained`` (e.g. ``torch_dtype``).  Raises
        ``FileNotFoundError`` with instructions when ``path`` is not a local directory (for
        instance a hub name: echomoe never downloads weights).
        """
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(
                f"{path!r} is not a local directory. echomoe loads vision encoders from local "
                "files only and never downloads weights. On a machine with network access run "
                f"`huggingface-cli download {path} --local-dir /path/to/dir` (or "
                "huggingface_hub.snapshot_download), copy the directory here and pass its path; "
                "or build a random-weight encoder with HFVisionEncoder.from_config(config)."
            )
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(path, local_files_only=True)
        model_cls, _ = _hf_class(config.model_type)
        if config.model_type in ("siglip", "siglip_vision_model"):
            kwargs.setdefault("vision_use_head", False)
        model = model_cls.from_pretrained(path, local_files_only=True, **kwargs)
        return cls(model)

    def save_pretrained(self, path: str | os.PathLike, **kwargs) -> None:
        """Save the wrapped model (config + safetensors) for :meth:`from_pretrained`."""
        self.model.save_pretrained(path, **kwargs)

    def _run(self, x: Tensor, output_hidden_states: bool) -> tuple[object, tuple[int, int]]:
        """Validated forward of the wrapped model; returns its output and the patch grid."""
        x = self.prepare_input(x)
        grid = self.grid_size(tuple(x.shape[-2:]))
        kwargs = {}
        if self._interpolates and grid != self.grid_size():
            kwargs["interpolate_pos_encoding"] = True
        dtype = next(self.model.parameters()).dtype
        out = self.model(
            pixel_values=x.to(dtype), output_hidden_states=output_hidden_states, **kwargs
        )
        return out, grid

    def forward_features(self, x: Tensor) -> Tensor:
        """``(B, C_in, H, W) -> (B, H/p * W/p, C)`` patch tokens of ``last_hidden_state``."""
        out, _ = self._run(x, output_hidden_states=False)
        return out.last_hidden_state[:, self.num_prefix_tokens :]

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | Sequence[int] | None = None,
        *,
        norm: bool = False,
        intermediates_only: bool = False,
    ) -> tuple[Tensor, list[Tensor]] | list[Tensor]:
        """Block outputs as ``(B, C, H/p, W/p)`` maps (final norm applied if ``norm``).

        Returns ``(tokens (B, N, C), maps)`` or only ``maps`` with ``intermediates_only``.
        """
        wanted = self.resolve_indices(indices)
        out, grid = self._run(x, output_hidden_states=True)
        maps = []
        for i in wanted:
            h = out.hidden_states[i + 1]
            maps.append(self.tokens_to_map(self._final_norm(h) if norm else h, grid))
        if intermediates_only:
            return maps
        return out.last_hidden_state[:, self.num_prefix_tokens :], maps
