"""``EchoMoEProcessor``: images + prompts -> model inputs, saved and loaded beside the model.

The whole inference story::

    processor = EchoMoEProcessor.from_pretrained("/runs/tiny")      # local directory only
    model = EchoMoEForConditionalGeneration.from_pretrained("/runs/tiny")
    inputs = processor(images=image, text="Write the ultrasound report for this study.\\n",
                       regions="breast", return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=64)
    print(processor.batch_decode(out, skip_special_tokens=True))

Conventions (shared with :class:`~echomoe.data.collate.VLMCollator`, whose helpers do the work,
so a prompt is tokenized at inference exactly as during training):

* Images: PIL images, ``(H, W)`` / ``(H, W, 1 | 3 | 4)`` uint8 numpy arrays, or paths.  They are
  converted to grayscale (``in_channels=1``, PIL ``"L"``) or RGB, resized to ``image_size`` with
  PIL bilinear, and scaled to [0, 1]: ``pixel_values`` is ``(B, N, C, H, W)`` float32, zeros past
  each sample's ``image_counts``.  No mean/std normalisation (the encoders are trained on [0, 1]).
* Text: each ``<image>`` tag takes one image, in order; a text without tags gets
  ``"<image>" * n + "\\n"`` in front (the prefix of the training prompts in
  :mod:`echomoe.data.tasks`).  Each tag is expanded to ``image_tokens_per_image`` copies of the
  image token, and ``<s>`` is prepended (when the tokenizer has a bos token).
* Batches are padded on the LEFT by default (``padding_side="left"``) so that generation appends
  to the real last token of every row; ``attention_mask`` is 0 on padding.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from transformers import BatchFeature, ProcessorMixin
from transformers.image_processing_utils import BaseImageProcessor

from echomoe.data.collate import VLMCollator, resize_image
from echomoe.data.schema import REGIONS, region_index
from echomoe.data.tokenizer import IMAGE_TOKEN, load_tokenizer
from echomoe.utils.sizes import image_hw

PROCESSOR_CONFIG = "processor_config.json"
HUB_LOADING_OPTIONS: tuple[str, ...] = (
    "trust_remote_code", "local_files_only", "cache_dir", "revision", "token", "subfolder",
    "force_download", "proxies", "_from_auto",
)
"""Keywords of ``from_pretrained`` that ``transformers`` passes for hub downloads; a local
directory has no use for them."""
_PIL_MODES = {1: "L", 3: "RGB"}
_IGNORED_KEYS = ("image_processor_type", "processor_class")


def _is_image(obj: Any) -> bool:
    """True for one image (PIL image, numpy array or path), False for a list of them."""
    from PIL import Image

    return isinstance(obj, (Image.Image, np.ndarray, str, os.PathLike))


def _load_image(image: Any, in_channels: int) -> np.ndarray:
    """One image -> ``(H, W)`` (grayscale) or ``(H, W, 3)`` (RGB) uint8 array."""
    from PIL import Image, UnidentifiedImageError

    mode = _PIL_MODES[in_channels]
    if isinstance(image, (str, os.PathLike)):
        try:
            with Image.open(image) as im:
                return np.asarray(im.convert(mode), dtype=np.uint8).copy()
        except (OSError, UnidentifiedImageError) as err:
            raise ValueError(f"{image}: cannot read image ({err})") from err
    if isinstance(image, Image.Image):
        return np.asarray(image.convert(mode), dtype=np.uint8)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(
                f"expected a uint8 image array, got dtype {image.dtype} (convert with "
                "(x * 255).round().astype(np.uint8) for images in [0, 1])"
            )
        if image.ndim == 3 and image.shape[-1] == 1:
            image = image[..., 0]
        if image.ndim == 2 and in_channels == 1:
            return image
        if image.ndim == 2 or (image.ndim == 3 and image.shape[-1] in (3, 4)):
            return np.asarray(Image.fromarray(image).convert(mode), dtype=np.uint8)
        raise ValueError(
            f"expected an image array of shape (H, W) or (H, W, 1 | 3 | 4), got {image.shape}"
        )
    raise TypeError(
        f"unsupported image type {type(image).__name__}; pass a PIL image, a uint8 numpy "
        "array (H, W) or (H, W, C), or a path"
    )


class EchoMoEImageProcessor(BaseImageProcessor):
    """Grayscale/RGB conversion, bilinear resize to ``image_size`` and scaling to [0, 1].

    Args:
        image_size: side (int) or ``(height, width)`` of the model's input.
        in_channels: 1 (grayscale, PIL ``"L"``) or 3 (RGB).

    Calling it on a batch returns ``pixel_values (B, N, C, H, W)`` float32 and
    ``image_counts (B,)`` (see :meth:`preprocess`).
    """

    model_input_names = ["pixel_values"]

    def __init__(self, image_size: int | Sequence[int] = 64, in_channels: int = 1, **kwargs):
        unknown = set(kwargs) - set(_IGNORED_KEYS)
        if unknown:
            raise TypeError(
                f"unknown image processor settings {sorted(unknown)}; valid: image_size, "
                "in_channels"
            )
        super().__init__()
        if in_channels not in _PIL_MODES:
            raise ValueError(f"in_channels must be 1 or 3, got {in_channels}")
        size = image_hw(image_size)
        self.image_size = size[0] if size[0] == size[1] else list(size)
        self.in_channels = int(in_channels)

    def to_dict(self) -> dict[str, Any]:
        """The settings (what :meth:`__init__` takes) plus ``image_processor_type``."""
        return {
            "image_processor_type": type(self).__name__,
            "image_size": self.image_size,
            "in_channels": self.in_channels,
        }

    def process_image(self, image: Any) -> np.ndarray:
        """One image -> ``(C, H, W)`` float32 in [0, 1]."""
        size = image_hw(self.image_size)
        array = _load_image(image, self.in_channels)
        if array.ndim == 2:
            return resize_image(array, size)[None]
        return np.stack([resize_image(np.ascontiguousarray(array[..., c]), size)
                         for c in range(array.shape[-1])])

    def preprocess(self, images: Any, return_tensors: str | None = None) -> BatchFeature:
        """Images -> ``{"pixel_values": (B, N, C, H, W), "image_counts": (B,)}``.

        ``images``: one image (``B = N = 1``), a flat list (one image per sample), or a list of
        lists (the images of each sample; an empty list is a sample without images).
        ``return_tensors``: ``"pt"``, ``"np"`` or ``None`` (numpy).
        """
        if _is_image(images):
            groups = [[images]]
        elif isinstance(images, (list, tuple)):
            groups = [[im] if _is_image(im) else list(im) for im in images]
        else:
            raise TypeError(
                f"images must be an image, a list of images or a list of lists, got "
                f"{type(images).__name__}"
            )
        h, w = image_hw(self.image_size)
        counts = np.array([len(g) for g in groups], dtype=np.int64)
        pixels = np.zeros((len(groups), int(counts.max(initial=0)), self.in_channels, h, w),
                          dtype=np.float32)
        for i, group in enumerate(groups):
            for j, image in enumerate(group):
                try:
                    pixels[i, j] = self.process_image(image)
                except (ValueError, TypeError) as err:
                    raise type(err)(f"sample {i}, image {j}: {err}") from err
        return BatchFeature({"pixel_values": pixels, "image_counts": counts},
                            tensor_type=return_tensors)


def image_tokens_per_image(config) -> int:
    """Image embeddings the model puts per image for an :class:`EchoMoEConfig`.

    ``(image_size / patch_size) ** 2`` patch tokens (class / register tokens are dropped), divided
    by 4 with ``projector_pool`` (2x2 pooling).  ``patch_size`` comes from ``vision_config``:
    native ViT kwargs, a transformers vision ``config`` dict, or a local ``pretrained`` path.
    With a ``backbone``: :func:`~echomoe.models.backbone.backbone_tokens_per_image`.
    """
    from echomoe.models.backbone import backbone_tokens_per_image, vision_patch_size

    if config.vision_config.get("kind", "native") == "backbone":  # the VLM's own merger
        return backbone_tokens_per_image(config)
    patch = vision_patch_size(config.vision_config)
    h, w = image_hw(config.image_size)
    if h % patch or w % patch:
        raise ValueError(f"image_size {h}x{w} is not a multiple of the patch size {patch}")
    gh, gw = h // patch, w // patch
    if config.projector_pool:
        if gh % 2 or gw % 2:
            raise ValueError(f"projector_pool needs an even patch grid, got {gh}x{gw}")
        return gh * gw // 4
    return gh * gw


class EchoMoEProcessor(ProcessorMixin):
    """Tokenizer + :class:`EchoMoEImageProcessor`: images and prompts -> model inputs.

    Args:
        image_processor: an :class:`EchoMoEImageProcessor`.
        tokenizer: an HF tokenizer with pad / eos and the echomoe special tokens
            (:func:`~echomoe.data.tokenizer.train_tokenizer` or
            :func:`~echomoe.data.tokenizer.add_special_tokens_to`).
        image_tokens_per_image: image embeddings per image (:func:`image_tokens_per_image`).
        regions: region names, in routing-id order (``config.regions``).
        add_bos: prepend the tokenizer's bos token.

    Build one for a model with :meth:`from_config`; save with ``save_pretrained(dir)`` (tokenizer
    files + ``processor_config.json``) and reload with :meth:`from_pretrained` (local only).
    ``decode`` / ``batch_decode`` pass through to the tokenizer.
    """

    def __init__(
        self,
        image_processor: EchoMoEImageProcessor,
        tokenizer,
        image_tokens_per_image: int,
        regions: Sequence[str] = REGIONS,
        add_bos: bool = True,
    ) -> None:
        super().__init__(image_processor, tokenizer)
        self.image_tokens_per_image = int(image_tokens_per_image)
        self.regions = list(regions)
        self.add_bos = bool(add_bos)
        # Raises (with instructions) if pad / eos / <image> ... are missing.
        self._collator = VLMCollator(tokenizer, self.image_tokens_per_image,
                                     image_processor.image_size, add_bos=self.add_bos)
        self.image_token_id = self._collator.token_ids[IMAGE_TOKEN]

    @classmethod
    def from_config(cls, config, tokenizer) -> EchoMoEProcessor:
        """The processor matching an :class:`~echomoe.models.configuration.EchoMoEConfig`.

        Raises ``ValueError`` when the tokenizer's ``<image>`` id differs from
        ``config.image_token_id`` or its vocabulary exceeds the LM's.
        """
        image_processor = EchoMoEImageProcessor(config.image_size, config.in_channels)
        processor = cls(image_processor, tokenizer, image_tokens_per_image(config),
                        regions=config.regions)
        ids = processor._collator.token_ids
        expected = {"<image>": config.image_token_id, "[SEG]": config.seg_token_id,
                    "[DET]": config.det_token_id, "[KPT]": config.kpt_token_id}
        wrong = {t: (ids[t], i) for t, i in expected.items() if ids[t] != i}
        for name in ("pad_token_id", "eos_token_id"):  # generate() stops / pads with these
            mine, theirs = getattr(tokenizer, name), getattr(config, name, None)
            if theirs is not None and mine != theirs:
                wrong[name.removesuffix("_id")] = (mine, theirs)
        if wrong:
            detail = ", ".join(f"{t}: tokenizer {a}, config {b}" for t, (a, b) in wrong.items())
            raise ValueError(f"tokenizer and config disagree on special token ids ({detail}); "
                             "set image_token_id / seg_token_id / ... / eos_token_id in the "
                             "config")
        vocab = config.text_config.vocab_size
        if len(tokenizer) > vocab:
            raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the LM vocabulary is "
                             f"{vocab}; build the config with text_config={{'vocab_size': "
                             f"{len(tokenizer)}}}")
        return processor

    # ----------------------------------------------------------------------------- call
    def _group_images(self, images: Any, batch: int | None) -> list[list[Any]]:
        if images is None:
            return [[] for _ in range(batch or 0)]
        if _is_image(images):
            return [[images]]
        if not isinstance(images, (list, tuple)):
            raise TypeError(f"images must be an image or a list, got {type(images).__name__}")
        if images and all(isinstance(g, (list, tuple)) for g in images):
            return [list(g) for g in images]  # explicit: the images of each sample
        if not all(_is_image(im) for im in images):
            raise TypeError("images must be a flat list of images or a list of lists of images")
        if batch in (None, 1):
            return [list(images)]  # one sample with all images
        if len(images) == batch:
            return [[im] for im in images]  # one image per sample
        raise ValueError(
            f"got {len(images)} images for {batch} texts: pass one image per text, or a list of "
            "lists with the images of each text"
        )

    def _region_ids(self, regions: Any, batch: int) -> list[int]:
        if isinstance(regions, (str, int, np.integer)):
            regions = [regions] * batch
        if len(regions) != batch:
            raise ValueError(f"got {len(regions)} regions for a batch of {batch}")
        ids = []
        for r in regions:
            if isinstance(r, str):
                ids.append(region_index(r, tuple(self.regions)))
            elif -1 <= int(r) < len(self.regions):
                ids.append(int(r))
            else:
                raise ValueError(f"region id {r} out of range [-1, {len(self.regions)})")
        return ids

    def __call__(
        self,
        images: Any = None,
        text: str | Sequence[str] | None = None,
        regions: str | int | Sequence[str | int] | None = None,
        return_tensors: str | None = "pt",
        padding_side: str = "left",
    ) -> BatchFeature:
        """Tokenize prompts and preprocess their images.

        Args:
            images: one image; a flat list (one sample with all of them when ``text`` is one
                string or ``None``, else one image per text); or a list of lists (the images of
                each text; ``[]`` for a text without images).
            text: a prompt or a list of prompts (``None``: empty prompts).
            regions: optional region name(s) / id(s) (one for all, or one per sample) ->
                ``region_ids``; ``"unknown"`` / ``-1`` routes that sample without region
                information.  Leave ``regions`` out to let the model predict every sample's
                region (``config.predict_region``).
            return_tensors: ``"pt"``, ``"np"`` or ``None`` (numpy arrays / lists).
            padding_side: ``"left"`` (generation) or ``"right"``.

        Returns a ``BatchFeature`` with ``input_ids``, ``attention_mask`` ``(B, L)``, and, when
        any image is given, ``pixel_values (B, N, C, H, W)`` and ``image_counts (B,)``; plus
        ``region_ids (B,)`` when ``regions`` is given.
        """
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if text is None and images is None:
            raise ValueError("give images, text, or both")
        texts = [text] if isinstance(text, str) else (None if text is None else list(text))
        groups = self._group_images(images, None if texts is None else len(texts))
        texts = [""] * len(groups) if texts is None else texts
        if len(groups) != len(texts):
            raise ValueError(f"got images for {len(groups)} samples but {len(texts)} texts")
        rows = []
        for i, (prompt, group) in enumerate(zip(texts, groups, strict=True)):
            if not isinstance(prompt, str):
                raise TypeError(f"text {i} is {type(prompt).__name__}, expected str")
            found = prompt.count(IMAGE_TOKEN)
            if found == 0 and group:
                prompt = IMAGE_TOKEN * len(group) + "\n" + prompt
            elif found != len(group):
                raise ValueError(
                    f"text {i} has {found} {IMAGE_TOKEN} tag(s) but {len(group)} image(s) were "
                    f"given for it: expected {len(group)} tag(s), one per image (or none, to put "
                    "the images in front of the text)"
                )
            ids, _ = self._collator.tokenize(prompt, "", len(group), f"text {i}")
            rows.append(ids[:-1])  # drop the eos the collator appends to the (empty) target
        length = max(len(r) for r in rows)
        input_ids = np.full((len(rows), length), self.tokenizer.pad_token_id, dtype=np.int64)
        attention_mask = np.zeros((len(rows), length), dtype=np.int64)
        for i, r in enumerate(rows):
            span = slice(length - len(r), length) if padding_side == "left" else slice(0, len(r))
            input_ids[i, span] = r
            attention_mask[i, span] = 1
        data: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if any(groups):
            data.update(self.image_processor.preprocess(groups, return_tensors=None))
        if regions is not None:
            data["region_ids"] = np.array(self._region_ids(regions, len(rows)), dtype=np.int64)
        return BatchFeature(data, tensor_type=return_tensors)

    # ----------------------------------------------------------------------------- save / load
    def to_dict(self) -> dict[str, Any]:
        """The settings saved in ``processor_config.json`` (the tokenizer has its own files)."""
        return {
            "processor_class": type(self).__name__,
            "image_processor": self.image_processor.to_dict(),
            "image_tokens_per_image": self.image_tokens_per_image,
            "regions": list(self.regions),
            "add_bos": self.add_bos,
        }

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **loading_kwargs: Any) -> EchoMoEProcessor:
        """Load a processor saved with ``save_pretrained`` from a *local* directory.

        ``AutoProcessor.from_pretrained(path)`` also lands here.  The hub options it passes
        (:data:`HUB_LOADING_OPTIONS`, e.g. ``trust_remote_code``) have nothing to do for a
        local directory and are accepted; any other keyword is an error.
        """
        unknown = sorted(set(loading_kwargs) - set(HUB_LOADING_OPTIONS))
        if unknown:
            raise TypeError(f"EchoMoEProcessor.from_pretrained got unknown options {unknown}; "
                            f"accepted: {', '.join(HUB_LOADING_OPTIONS)}")
        path = Path(path)
        config_file = path / PROCESSOR_CONFIG
        if not config_file.is_file():
            raise FileNotFoundError(
                f"{path}: no {PROCESSOR_CONFIG}; expected a local directory written by "
                "EchoMoEProcessor.save_pretrained (echomoe never downloads from a hub)"
            )
        settings = json.loads(config_file.read_text())
        image_settings = {k: v for k, v in settings.get("image_processor", {}).items()
                          if k not in _IGNORED_KEYS}
        image_processor = EchoMoEImageProcessor(**image_settings)
        tokenizer = load_tokenizer(path, add_missing_special_tokens=False)
        return cls(
            image_processor,
            tokenizer,
            settings["image_tokens_per_image"],
            regions=settings.get("regions", REGIONS),
            add_bos=settings.get("add_bos", True),
        )

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(image_size={self.image_processor.image_size}, "
                f"in_channels={self.image_processor.in_channels}, "
                f"image_tokens_per_image={self.image_tokens_per_image}, "
                f"vocab={len(self.tokenizer)})")
