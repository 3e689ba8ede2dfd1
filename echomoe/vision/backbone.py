"""Vision towers of pretrained HF VLMs behind the echomoe encoder face, and their own projectors.

A VLM decomposed by :mod:`echomoe.models.backbone` gives the echomoe model three parts; this
module holds the first two::

    enc = QwenVisionAdapter(vlm.model.visual, image_size=448)   # Qwen2-VL / Qwen2.5-VL tower
    proj = QwenMerger(merger)                                   # its PatchMerger, moved here
    tokens, maps = enc.forward_intermediates(images, 2)         # (B, N, C_v), 2 x (B, C_v, h, w)
    embeds = proj(tokens)                                       # (B, N / m^2, D_lm)

    enc = LlavaVisionAdapter(vlm.model.vision_tower, 336, feature_layer=-2,
                             select_strategy="default")         # CLIP / SigLIP tower
    embeds = LlavaProjector(vlm.model.multi_modal_projector)(tokens)

Each adapter is an :class:`~echomoe.vision.encoder.ImageEncoder`: ``hidden_size`` is the tower's
feature dim ``C_v`` (what the region classifier and the pixel decoder read), ``output_size`` the
LM dim ``D_lm`` of the tokens its projector hands to the LM, ``num_output_tokens(image_size)``
the LM tokens per image.  Input: echomoe pixels in [0, 1], ``(B, 1 | 3, S, S)``; the adapter does
what the VLM's HF image processor would do to an image already at ``S x S``: grayscale to 3
channels, ``(x - image_mean) / image_std``, and (Qwen) the patchification.

Axis legend: ``B`` batch, ``C_v`` tower width, ``D`` LM width, ``N`` patches ``(S/p)^2``,
``h``/``w`` patch-grid rows/columns, ``m`` Qwen's spatial merge size, ``p`` patch size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from einops import rearrange
from torch import Tensor, nn

from echomoe.utils.sizes import image_hw
from echomoe.vision.encoder import ImageEncoder, Size

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
"""The image normalisation of Qwen2-VL's and CLIP's image processors (their defaults)."""


class _BackboneEncoder(ImageEncoder):
    """Shared parts: per-channel normalisation and mean / std kept as plain tuples (no buffers:
    nothing here needs initialising when a checkpoint is loaded)."""

    def __init__(self, image_mean: Sequence[float], image_std: Sequence[float]) -> None:
        super().__init__()
        if len(image_mean) != 3 or len(image_std) != 3:
            raise ValueError(f"image_mean and image_std need 3 values (RGB), got {image_mean} "
                             f"and {image_std}")
        self.image_mean = tuple(float(v) for v in image_mean)
        self.image_std = tuple(float(v) for v in image_std)

    def normalise(self, x: Tensor) -> Tensor:
        """``(B, 1 | 3, H, W)`` pixels in [0, 1] -> ``(B, 3, H, W)`` ``(x - mean) / std``."""
        x = self.prepare_input(x)
        mean = torch.tensor(self.image_mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.image_std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return (x - mean) / std

    def forward_features(self, x: Tensor) -> Tensor:
        """The tokens the VLM's projector reads: ``(B, N', C_v)`` (see the subclass)."""
        return self.forward_intermediates(x, 1)[0]


class QwenVisionAdapter(_BackboneEncoder):
    """A Qwen2-VL / Qwen2.5-VL vision tower (its ``PatchMerger`` removed) at a square image size.

    Patchification as Qwen2-VL's image processor emits it: each image becomes ``N = (S/p)^2``
    flat patches ``(C * T * p * p)`` (the single frame repeated ``T = temporal_patch_size``
    times), ordered in ``m x m`` blocks (``(h/m, w/m, m, m)``), with ``grid_thw = (1, S/p, S/p)``.
    Block outputs come back in the tower's order (merge blocks; Qwen2.5-VL also permutes them into
    attention windows) and are un-permuted to row-major ``(h, w)``.

    Args:
        visual: ``Qwen2VisionTransformerPretrainedModel`` or
            ``Qwen2_5_VisionTransformerPretrainedModel`` (its ``merger`` replaced by
            ``nn.Identity``, see :class:`QwenMerger`).
        image_size: ``S``, a multiple of ``patch_size * spatial_merge_size`` (28 for Qwen2-VL).
        image_mean, image_std: the image processor's normalisation.
        output_size: ``D``, the merger's output width (the LM hidden size).
    """

    def __init__(self, visual: nn.Module, image_size: Size, image_mean: Sequence[float] =
                 OPENAI_CLIP_MEAN, image_std: Sequence[float] = OPENAI_CLIP_STD, *,
                 output_size: int) -> None:
        super().__init__(image_mean, image_std)
        cfg = visual.config
        self.visual = visual
        self.model_type = cfg.model_type
        self.patch_size = int(cfg.patch_size)
        self.merge_size = int(cfg.spatial_merge_size)
        self.temporal_patch_size = int(cfg.temporal_patch_size)
        self.in_channels = int(cfg.in_channels)
        self.hidden_size = int(cfg.embed_dim if cfg.model_type == "qwen2_vl_vision"
                               else cfg.hidden_size)
        self.output_size = int(output_size)
        self.depth = int(cfg.depth)
        self.num_prefix_tokens = 0
        self.image_size = image_hw(image_size)
        self._check_size(self.image_size)

    def _check_size(self, size: tuple[int, int]) -> None:
        unit = self.patch_size * self.merge_size
        if size[0] % unit or size[1] % unit:
            raise ValueError(f"image_size {size[0]}x{size[1]} must be a multiple of patch_size x "
                             f"spatial_merge_size = {self.patch_size} x {self.merge_size} = {unit} "
                             "for a Qwen2-VL vision tower")

    def num_output_tokens(self, image_size: Size | None = None) -> int:
        """LM tokens per image: ``N / m^2``."""
        size = self.image_size if image_size is None else image_hw(image_size)
        self._check_size(size)
        return self.num_patches(size) // self.merge_size**2

    def patchify(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Normalised ``(B, 3, H, W)`` -> flat patches ``(B * N, 3 * T * p * p)`` in the image
        processor's order and ``grid_thw (B, 3)`` int64."""
        b, c, height, width = x.shape
        self._check_size((height, width))
        p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
        gh, gw = height // p, width // p
        x = x.reshape(b, c, gh // m, m, p, gw // m, m, p).permute(0, 2, 5, 3, 6, 1, 4, 7)
        x = x.unsqueeze(6).expand(b, gh // m, gw // m, m, m, c, t, p, p)
        grid = torch.tensor([[1, gh, gw]] * b, device=x.device, dtype=torch.long)
        return x.reshape(b * gh * gw, c * t * p * p), grid

    def _to_grid(self, hidden: Tensor, b: int, gh: int, gw: int, order: Tensor | None) -> Tensor:
        """Tower-order ``(B * N, C)`` -> row-major ``(B, N, C)``."""
        m = self.merge_size
        if order is not None:  # Qwen2.5-VL windows: undo the permutation of the merge blocks
            hidden = hidden.reshape(-1, m * m, hidden.shape[-1])[order].flatten(0, 1)
        return rearrange(hidden, "(b h w m1 m2) c -> b (h m1 w m2) c", b=b, h=gh // m,
                         w=gw // m, m1=m, m2=m)

    def _window_order(self, grid: Tensor) -> Tensor | None:
        if self.model_type != "qwen2_5_vl_vision":
            return None
        from transformers.vision_utils import get_vision_window_index

        cfg = self.visual.config
        window_index, _ = get_vision_window_index(grid, self.merge_size, cfg.window_size,
                                                  self.patch_size)
        return torch.argsort(window_index.to(grid.device))

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | Sequence[int] | None = None,
        *,
        norm: bool = False,
        intermediates_only: bool = False,
    ) -> tuple[Tensor, list[Tensor]] | list[Tensor]:
        """``(tokens (B, N, C_v), maps)``: the last block's output (what the merger reads) in
        row-major order and the requested blocks' outputs as ``(B, C_v, S/p, S/p)`` maps.

        The tower has no final norm (the merger's ``ln_q`` belongs to the projector), so
        ``norm`` changes nothing.
        """
        wanted = self.resolve_indices(indices)
        flat, grid = self.patchify(self.normalise(x))
        b, gh, gw = x.shape[0], int(grid[0, 1]), int(grid[0, 2])
        dtype = next(self.visual.parameters()).dtype
        out = self.visual(flat.to(dtype), grid_thw=grid, output_hidden_states=True)
        order = self._window_order(grid)
        maps = [rearrange(self._to_grid(out.hidden_states[i + 1], b, gh, gw, order),
                          "b (h w) c -> b c h w", h=gh) for i in wanted]
        if intermediates_only:
            return maps
        return self._to_grid(out.last_hidden_state, b, gh, gw, order), maps


class QwenMerger(nn.Module):
    """Qwen2-VL's own ``PatchMerger`` as the echomoe projector: row-major tokens
    ``(B, N, C_v)`` -> ``(B, N / m^2, D)``, one LM token per ``m x m`` block in the order the VLM
    puts them in its prompt (block rows, then block columns).

    Args:
        merger: the tower's ``merger`` module (``ln_q`` + MLP over ``m^2 * C_v``).
        merge_size: ``m``.
        in_dim: ``C_v``; out_dim: ``D``.
    """

    def __init__(self, merger: nn.Module, merge_size: int, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.merger = merger
        self.merge_size = int(merge_size)
        self.in_dim = int(in_dim)
        self.out_dim = int(out_dim)

    def num_output_tokens(self, num_tokens: int) -> int:
        """LM tokens for ``num_tokens`` patch tokens."""
        return num_tokens // self.merge_size**2

    def forward(self, x: Tensor, grid_size: tuple[int, int] | None = None) -> Tensor:
        """``(B, N, C_v) -> (B, N / m^2, D)``; ``grid_size`` defaults to a square grid."""
        if x.dim() != 3 or x.shape[-1] != self.in_dim:
            raise ValueError(f"QwenMerger expected tokens (batch, tokens, {self.in_dim}), got "
                             f"{tuple(x.shape)}")
        b, n, c = x.shape
        h, w = grid_size if grid_size is not None else (int(n**0.5), int(n**0.5))
        m = self.merge_size
        if h * w != n or h % m or w % m:
            raise ValueError(f"QwenMerger needs an h x w grid of {n} tokens divisible by {m}, "
                             f"got {h}x{w}")
        blocks = rearrange(x, "b (h m1 w m2) c -> (b h w m1 m2) c", h=h // m, w=w // m, m1=m,
                           m2=m)
        dtype = next(self.merger.parameters()).dtype
        return self.merger(blocks.to(dtype)).reshape(b, n // m**2, -1)


class LlavaVisionAdapter(_BackboneEncoder):
    """A LLaVA vision tower (``CLIPVisionModel`` / ``SiglipVisionModel``) with LLaVA's feature
    selection.

    ``tokens`` are ``hidden_states[feature_layer]`` with the first token dropped for
    ``select_strategy="default"`` (LLaVA's own rule: CLIP's cls token) and kept for ``"full"``;
    ``depth`` counts the blocks up to the feature layer, so maps ``indices=n`` are the last ``n``
    blocks the VLM uses (prefix tokens dropped, ``(B, C_v, S/p, S/p)``); blocks after the feature
    layer and the ``post_layernorm`` get no gradient.  An ``image_size`` other than the tower's
    interpolates its position embeddings.

    Args:
        tower: the VLM's ``vision_tower``.
        image_size: ``S`` (multiple of the patch size).
        feature_layer: ``vision_feature_layer`` (an int; negative counts from the end).
        select_strategy: ``vision_feature_select_strategy`` (``"default"`` or ``"full"``).
        image_mean, image_std: the image processor's normalisation.
        output_size: ``D`` of the VLM's ``multi_modal_projector``.
    """

    def __init__(self, tower: nn.Module, image_size: Size, feature_layer: int,
                 select_strategy: str, image_mean: Sequence[float] = OPENAI_CLIP_MEAN,
                 image_std: Sequence[float] = OPENAI_CLIP_STD, *, output_size: int) -> None:
        super().__init__(image_mean, image_std)
        cfg = tower.config
        if not isinstance(feature_layer, int) or isinstance(feature_layer, bool):
            raise ValueError(f"vision_feature_layer must be one int, got {feature_layer!r} "
                             "(lists of layers are not supported)")
        if select_strategy not in ("default", "full"):
            raise ValueError(f"vision_feature_select_strategy must be 'default' or 'full', got "
                             f"{select_strategy!r}")
        self.tower = tower
        layers = int(cfg.num_hidden_layers)
        index = feature_layer + layers + 1 if feature_layer < 0 else feature_layer
        if not 1 <= index <= layers:
            raise ValueError(f"vision_feature_layer {feature_layer} selects no block of a "
                             f"{layers}-block tower")
        self.feature_layer = feature_layer
        self.select_strategy = select_strategy
        self.hidden_size = int(cfg.hidden_size)
        self.output_size = int(output_size)
        self.patch_size = int(image_hw(cfg.patch_size, "patch_size")[0])
        self.in_channels = int(cfg.num_channels)
        self.image_size = image_hw(image_size)
        self.tower_size = image_hw(cfg.image_size)
        self.depth = index
        self.num_prefix_tokens = 0 if "siglip" in cfg.model_type else 1
        self.grid_size(self.image_size)

    def num_output_tokens(self, image_size: Size | None = None) -> int:
        """LM tokens per image: patches, plus the prefix token(s), minus one for ``default``."""
        n = self.num_patches(self.image_size if image_size is None else image_size)
        return n + self.num_prefix_tokens - (self.select_strategy == "default")

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | Sequence[int] | None = None,
        *,
        norm: bool = False,
        intermediates_only: bool = False,
    ) -> tuple[Tensor, list[Tensor]] | list[Tensor]:
        """``(tokens (B, N', C_v), maps)``: the selected features (what the projector reads)
        and the requested blocks as ``(B, C_v, S/p, S/p)`` maps (the tower's
        ``post_layernorm`` applied with ``norm``)."""
        wanted = self.resolve_indices(indices)
        x = self.normalise(x)
        grid = self.grid_size(tuple(x.shape[-2:]))
        kwargs = {"interpolate_pos_encoding": True} if grid != self.grid_size(self.tower_size) \
            else {}
        dtype = next(self.tower.parameters()).dtype
        out = self.tower(pixel_values=x.to(dtype), output_hidden_states=True, **kwargs)
        final = getattr(getattr(self.tower, "vision_model", self.tower), "post_layernorm", None)
        maps = []
        for i in wanted:
            h = out.hidden_states[i + 1]
            h = final(h) if norm and final is not None else h
            maps.append(self.tokens_to_map(h, grid))
        if intermediates_only:
            return maps
        tokens = out.hidden_states[self.feature_layer]
        return (tokens[:, 1:] if self.select_strategy == "default" else tokens), maps


class LlavaProjector(nn.Module):
    """LLaVA's own ``multi_modal_projector`` as the echomoe projector: ``(B, N', C_v) ->
    (B, N', D)``.

    Args:
        projector: the VLM's ``multi_modal_projector``.
        in_dim: ``C_v``; out_dim: ``D``.
    """

    def __init__(self, projector: nn.Module, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.multi_modal_projector = projector
        self.in_dim = int(in_dim)
        self.out_dim = int(out_dim)

    def num_output_tokens(self, num_tokens: int) -> int:
        """LM tokens for ``num_tokens`` tokens (one each)."""
        return num_tokens

    def forward(self, x: Tensor, grid_size: tuple[int, int] | None = None) -> Tensor:
        """``(B, N', C_v) -> (B, N', D)``."""
        if x.dim() != 3 or x.shape[-1] != self.in_dim:
            raise ValueError(f"LlavaProjector expected tokens (batch, tokens, {self.in_dim}), "
                             f"got {tuple(x.shape)}")
        dtype = next(self.multi_modal_projector.parameters()).dtype
        return self.multi_modal_projector(x.to(dtype))
