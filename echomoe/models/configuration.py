"""``EchoMoEConfig``: the assembled VLM's configuration, saved as JSON beside its weights.

It nests four parts, each a plain dict of keyword arguments for the block that consumes it
(validated against that block's signature, so an unknown key is an error that lists the valid
ones), plus the text model's own ``transformers`` config:

* ``vision_config``: ``{"kind": "native", ...VisionTransformer kwargs}``,
  ``{"kind": "convnet", ...ConvNet kwargs}`` (a ConvNeXt-style CNN), or
  ``{"kind": "siglip" | "clip" | "dinov2", "config": {...HF config dict}}`` or
  ``{"kind": "pretrained", "path": "/local/dir"}``, or ``{"kind": "backbone"}`` (set by
  ``backbone``).
* ``text_config``: any causal-LM ``PretrainedConfig`` (Qwen2, Llama, Mistral, ...), or
  ``language_model_path``: a local directory with a pretrained causal LM, whose config and
  weights are loaded from disk (never from a hub).
* ``backbone``: a pretrained HF VLM (Qwen2-VL, Qwen2.5-VL, LLaVA) decomposed into the three parts
  above: its vision tower, its own projector / merger and its LM (``{"path": "/local/dir"}``, or
  ``{"config": {...}}`` for the structure alone; see :mod:`echomoe.models.backbone`).
* ``moe_config``: ``None`` (dense) or :func:`~echomoe.moe.upcycle.moefy` arguments
  (``layers``, ``num_experts``, ``top_k``, ``router``, ``intermediate_size``, ...).
* ``grounding_config``: pixel decoder / mask decoder / heads sizes.

Loss weights multiply the raw named losses when they are summed into the total.
"""

from __future__ import annotations

import copy
from typing import Any

from transformers import AutoConfig, PretrainedConfig

from echomoe.data.schema import REGIONS
from echomoe.models.losses import LM_LOSS_REDUCTIONS

DEFAULT_GROUNDING: dict[str, Any] = {
    "mask_decoder": "dynamic_conv",  # or "dot_product"
    "pixel_dim": 32,
    "output_stride": 4,
    "intermediate_layers": 2,  # last n ViT blocks feed the pixel decoder
    "conv_channels": 8,
    "conv_layers": 3,
    "num_keypoints": 4,
    "measure_pairs": [[0, 1], [2, 3]],  # caliper pairs: long axis, short axis
    "match_pairs": True,  # a caliper pair's ends are unordered: match targets to predictions
    "box_head": "heatmap",  # centre by soft-argmax over the pixel features; or "mlp"
    "keypoint_head": "heatmap",  # one soft-argmax heatmap per keypoint; or "mlp"
    "image_stem": True,  # a strided CNN on the raw image feeds the pixel decoder
}

DEFAULT_LOSS_WEIGHTS: dict[str, float] = {
    "lm": 1.0,
    "seg_bce": 2.0,
    "seg_dice": 0.5,
    "box_l1": 1.0,
    "box_giou": 1.0,
    "keypoint": 1.0,
    "keypoint_heatmap": 0.0,  # > 0: also supervise heatmap keypoint heads' maps (off by default)
    "moe_balance": 0.01,
    "moe_z": 0.001,
    "moe_region": 0.01,
    "region_cls": 0.1,
    "diagnosis_cls": 1.0,  # the image-level diagnosis classifier (with ``diagnoses`` only)
}

SPECIAL_TOKENS = ("image", "seg", "det", "kpt")


def _local_config(path: str) -> PretrainedConfig:
    """The config of a local pretrained model; a clear error for anything else."""
    from pathlib import Path

    if not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(
            f"language_model_path {path!r} is not a local model directory (no config.json). "
            "echomoe never downloads weights: download the model elsewhere (e.g. "
            "`huggingface-cli download <name> --local-dir DIR`) and pass DIR."
        )
    return AutoConfig.from_pretrained(path, local_files_only=True)


def _merge_known(name: str, given: dict[str, Any] | None, defaults: dict[str, Any]) -> dict:
    """``defaults`` updated with ``given``; unknown keys are an error listing the valid ones."""
    unknown = sorted(set(given or {}) - set(defaults))
    if unknown:
        raise ValueError(f"unknown {name} keys {unknown}; valid: {sorted(defaults)}")
    return {**copy.deepcopy(defaults), **(given or {})}


class EchoMoEConfig(PretrainedConfig):
    """Configuration of :class:`~echomoe.models.modeling.EchoMoEForConditionalGeneration`.

    Args:
        vision_config: see the module docstring.
        text_config: a causal-LM config (object or dict with ``model_type``).
        language_model_path: local directory of a pretrained causal LM; its config replaces
            ``text_config`` and the model loads its weights when built (before ``moefy``).
        moe_config: ``moefy`` keyword arguments, or ``None`` for a dense LM.
        grounding_config: overrides of :data:`DEFAULT_GROUNDING`.
        projector_pool: 2x2-pool image tokens in the projector.
        image_size: input side in pixels (images are resized to it by the processor).
        in_channels: 1 (grayscale ultrasound) or 3.
        regions: region names; their indices are routing ids.
        predict_region: route every sample without a region id (none given, or ``-1``) with
            the region classifier's prediction.
        diagnoses: labels of an auxiliary image-level diagnosis classifier on the pooled
            vision tokens (loss ``diagnosis_cls`` against ``diagnosis_ids``): a direct signal
            that teaches the vision tower what the reports and answers need it to see.
            ``None``: no such classifier.
        image_token_id, seg_token_id, det_token_id, kpt_token_id: tokenizer ids.
        loss_weights: overrides of :data:`DEFAULT_LOSS_WEIGHTS`.
        lm_loss_reduction: how the ``lm`` loss weighs examples: ``"token"`` (mean over the
            batch's supervised tokens, as ``transformers``) or ``"example"`` (each example's
            token mean, averaged over examples; see :mod:`echomoe.models.losses`).
        labels_only_logits: with ``labels``, run the LM head only at the supervised positions
            for the loss (a faster training step); the output's ``logits`` are then ``None``.
        backbone: a pretrained VLM as vision tower + projector + LM
            (:func:`~echomoe.models.backbone.resolve_backbone` forms).  Its LM config becomes
            ``text_config`` unless one is given, and ``vision_config`` is ``{"kind":
            "backbone"}``; with ``"path"`` the model loads the VLM's weights when built, and a
            saved config keeps the structure (``"config"``) without the path.  A patch-14 tower
            sets the ``grounding_config`` defaults ``output_stride=7``, ``image_stem=False``
            (:func:`~echomoe.models.backbone.backbone_grounding_defaults`).
        **kwargs: ``PretrainedConfig`` fields.  ``pad_token_id`` / ``bos_token_id`` /
            ``eos_token_id`` default to 0 / 1 / 2, the ids of
            :func:`echomoe.data.tokenizer.train_tokenizer`, so ``generate()`` stops at the end of
            the text without being told; set them to your tokenizer's ids otherwise.
    """

    model_type = "echomoe"
    sub_configs = {"text_config": AutoConfig}

    def __init__(
        self,
        vision_config: dict[str, Any] | None = None,
        text_config: PretrainedConfig | dict[str, Any] | None = None,
        moe_config: dict[str, Any] | None = None,
        language_model_path: str | None = None,
        grounding_config: dict[str, Any] | None = None,
        projector_pool: bool = False,
        image_size: int = 64,
        in_channels: int = 1,
        regions: list[str] | tuple[str, ...] = REGIONS,
        predict_region: bool = True,
        diagnoses: list[str] | tuple[str, ...] | None = None,
        image_token_id: int = 3,
        seg_token_id: int = 4,
        det_token_id: int = 5,
        kpt_token_id: int = 6,
        loss_weights: dict[str, float] | None = None,
        lm_loss_reduction: str = "token",
        labels_only_logits: bool = False,
        backbone: str | dict[str, Any] | None = None,
        **kwargs,
    ) -> None:
        self.backbone = None
        if backbone is not None:
            from echomoe.models.backbone import (
                backbone_grounding_defaults,
                backbone_text_config,
                resolve_backbone,
            )

            if language_model_path is not None:
                raise ValueError("give backbone or language_model_path, not both (the "
                                 "backbone brings its own language model)")
            if vision_config not in (None, {"kind": "backbone"}):
                raise ValueError("vision_config must be left out with a backbone (its vision "
                                 f"tower is the encoder), got {vision_config}")
            self.backbone = resolve_backbone(backbone)
            vision_config = {"kind": "backbone"}
            if text_config is None:
                text_config = backbone_text_config(self.backbone)
            grounding_config = {**backbone_grounding_defaults(self.backbone),
                                **(grounding_config or {})}
        self.vision_config = copy.deepcopy(vision_config) or {
            "kind": "native", "patch_size": 8, "hidden_size": 64, "depth": 2, "num_heads": 4,
        }
        self.language_model_path = language_model_path
        if language_model_path is not None and text_config is None:
            text_config = _local_config(language_model_path)
        if isinstance(text_config, dict):
            text_config = dict(text_config)
            model_type = text_config.pop("model_type", "qwen2")
            text_config = AutoConfig.for_model(model_type, **text_config)
        elif text_config is None:
            text_config = AutoConfig.for_model(
                "qwen2", vocab_size=512, hidden_size=64, intermediate_size=128,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                tie_word_embeddings=False,
            )
        self.text_config = text_config
        self.moe_config = copy.deepcopy(moe_config)
        self.grounding_config = _merge_known("grounding_config", grounding_config,
                                             DEFAULT_GROUNDING)
        self.loss_weights = _merge_known("loss_weights", loss_weights, DEFAULT_LOSS_WEIGHTS)
        if lm_loss_reduction not in LM_LOSS_REDUCTIONS:
            raise ValueError(f"lm_loss_reduction must be one of {', '.join(LM_LOSS_REDUCTIONS)}, "
                             f"got {lm_loss_reduction!r}")
        self.lm_loss_reduction = lm_loss_reduction
        self.labels_only_logits = bool(labels_only_logits)
        self.projector_pool = projector_pool
        self.image_size = image_size
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {in_channels}")
        self.in_channels = in_channels
        self.regions = list(regions)
        self.predict_region = predict_region
        if diagnoses is not None:
            diagnoses = list(diagnoses)
            if not diagnoses or not all(isinstance(d, str) and d for d in diagnoses) \
                    or len(set(diagnoses)) != len(diagnoses):
                raise ValueError(f"diagnoses must be distinct non-empty label strings, got "
                                 f"{diagnoses}")
        self.diagnoses = diagnoses
        self.image_token_id = image_token_id
        self.seg_token_id = seg_token_id
        self.det_token_id = det_token_id
        self.kpt_token_id = kpt_token_id
        kwargs.setdefault("tie_word_embeddings", False)
        for name, value in (("pad_token_id", 0), ("bos_token_id", 1), ("eos_token_id", 2)):
            kwargs.setdefault(name, value)
        super().__init__(**kwargs)

    @property
    def num_regions(self) -> int:
        """Number of anatomical regions (routing ids ``0 .. num_regions - 1``)."""
        return len(self.regions)

    @property
    def hidden_size(self) -> int:
        """The language model's hidden size (used by generation utilities)."""
        return self.text_config.hidden_size

    def get_text_config(self, *args, **kwargs) -> PretrainedConfig:
        return self.text_config
