"""The echomoe VLM's three parts: vision encoder, projector and causal LM, built natively or
decomposed from a pretrained HF VLM (``backbone``) in a local directory.

::

    config = build_config("tiny", "moe_region_hard", backbone={"path": "/models/Qwen2-VL-2B"},
                          image_size=448)
    model = EchoMoEForConditionalGeneration(config)       # weights read from the directory
    processor = build_processor(config=config)            # the backbone's own tokenizer

Supported backbones (:data:`BACKBONE_CLASSES`) and what each part becomes:

* **Qwen2-VL / Qwen2.5-VL**: vision encoder = the VLM's vision tower in a
  :class:`~echomoe.vision.backbone.QwenVisionAdapter` (the image processor's patchification done
  inside it, at the fixed square ``image_size``); projector = its own ``PatchMerger``
  (:class:`~echomoe.vision.backbone.QwenMerger`); LM = a ``Qwen2ForCausalLM`` holding its
  ``language_model`` + ``lm_head`` weights.  The echomoe LM gives every token a 1-D RoPE position
  (``0, 1, 2, ...``), image tokens included, instead of Qwen2-VL's M-RoPE, whose image tokens
  take 2-D (row, column) positions; on text alone the two are the same, so text-only logits match
  the original VLM's (measured on tiny random Qwen2-VL / Qwen2.5-VL / LLaVA models in float32,
  left padding included: a max absolute difference of 0; ``tests/models/test_backbone.py``
  allows 1e-5).
* **LLaVA** (``LlavaForConditionalGeneration``): vision encoder = its CLIP / SigLIP tower in a
  :class:`~echomoe.vision.backbone.LlavaVisionAdapter` (``vision_feature_layer`` and
  ``vision_feature_select_strategy`` as its config says); projector = its
  ``multi_modal_projector`` (:class:`~echomoe.vision.backbone.LlavaProjector`); LM = its text
  model + ``lm_head`` as the matching causal LM (Llama, Mistral, Qwen2, ...).

``EchoMoEConfig(backbone=...)`` takes ``{"path": DIR}`` (or just ``DIR``): the VLM's config is
read from ``DIR`` (``local_files_only``; echomoe never downloads) and the model loads its weights
when built; or ``{"config": {...the VLM's config dict...}}``: the same structure with random
weights.  ``image_mean`` / ``image_std`` default to the directory's ``preprocessor_config.json``
(else CLIP's, the default of both families).  A saved model keeps ``config`` and drops
``path``: ``from_pretrained`` rebuilds the structure and fills it from the checkpoint itself.
"""

from __future__ import annotations

import copy
import inspect
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from echomoe.utils.sizes import image_hw
from echomoe.vision.backbone import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    LlavaProjector,
    LlavaVisionAdapter,
    QwenMerger,
    QwenVisionAdapter,
)

BACKBONE_CLASSES = {
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "llava": "LlavaForConditionalGeneration",
}
"""VLM ``model_type`` -> the ``transformers`` class a backbone is loaded with."""

BACKBONE_KEYS = ("path", "config", "image_mean", "image_std")
"""Keys of the ``backbone`` config field."""

_QWEN = ("qwen2_vl", "qwen2_5_vl")
_TOKEN_FIELDS = {"image_token_id": "<image>", "seg_token_id": "[SEG]", "det_token_id": "[DET]",
                 "kpt_token_id": "[KPT]"}
_DROP_TEXT_KEYS = ("architectures", "_name_or_path", "transformers_version", "model_type",
                   "dtype")


def _missing(path: str, what: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"backbone path {path!r} is not a local model directory ({what}). echomoe never "
        "downloads weights: download the VLM elsewhere (e.g. `huggingface-cli download "
        "Qwen/Qwen2-VL-2B-Instruct --local-dir DIR`), copy DIR here and pass its path."
    )


def _config_dict(config: PretrainedConfig) -> dict[str, Any]:
    """A JSON-safe dict of a VLM config (the form kept in ``EchoMoEConfig.backbone``)."""
    return json.loads(config.to_json_string(use_diff=False))


def resolve_backbone(spec: str | os.PathLike | dict[str, Any]) -> dict[str, Any]:
    """Normalise a ``backbone`` value to ``{"path", "config", "image_mean", "image_std"}``.

    ``spec``: a local directory, ``{"path": DIR}`` (config and image processor settings read from
    it) or ``{"config": {...}}``; ``image_mean`` / ``image_std`` override the normalisation.
    Raises ``FileNotFoundError`` for a path that is not a local model directory and
    ``ValueError`` for unknown keys or an unsupported VLM type.
    """
    if isinstance(spec, (str, os.PathLike)):
        spec = {"path": os.fspath(spec)}
    if not isinstance(spec, dict):
        raise ValueError(f"backbone must be a local directory or a dict with keys "
                         f"{', '.join(BACKBONE_KEYS)}, got {type(spec).__name__}")
    unknown = sorted(set(spec) - set(BACKBONE_KEYS))
    if unknown:
        raise ValueError(f"unknown backbone keys {unknown}; valid: {', '.join(BACKBONE_KEYS)}")
    path, config = spec.get("path"), spec.get("config")
    if path is None and config is None:
        raise ValueError("backbone needs 'path' (a local VLM directory) or 'config' (its config)")
    mean, std = spec.get("image_mean"), spec.get("image_std")
    if path is not None:
        path = os.fspath(path)
        if not (Path(path) / "config.json").is_file():
            raise _missing(path, "no config.json")
        if config is None:
            config = AutoConfig.from_pretrained(path, local_files_only=True)
        processor_file = Path(path) / "preprocessor_config.json"
        if processor_file.is_file():
            settings = json.loads(processor_file.read_text())
            mean = settings.get("image_mean") if mean is None else mean
            std = settings.get("image_std") if std is None else std
    if isinstance(config, PretrainedConfig):
        config = _config_dict(config)
    if not isinstance(config, dict) or config.get("model_type") not in BACKBONE_CLASSES:
        found = config.get("model_type") if isinstance(config, dict) else type(config).__name__
        raise ValueError(f"unsupported backbone model type {found!r}; supported: "
                         f"{', '.join(BACKBONE_CLASSES)}")
    return {"path": path, "config": copy.deepcopy(config),
            "image_mean": list(mean if mean is not None else OPENAI_CLIP_MEAN),
            "image_std": list(std if std is not None else OPENAI_CLIP_STD)}


def vlm_config(backbone: dict[str, Any]) -> PretrainedConfig:
    """The ``transformers`` config of a resolved backbone's VLM."""
    spec = dict(backbone["config"])
    return AutoConfig.for_model(spec.pop("model_type"), **spec)


def backbone_text_config(backbone: dict[str, Any]) -> PretrainedConfig:
    """The causal-LM config of the backbone's language model.

    Qwen2-VL / Qwen2.5-VL: a ``Qwen2Config`` with the text config's values (M-RoPE's
    ``mrope_section`` dropped); LLaVA: its ``text_config``.  ``tie_word_embeddings`` comes from
    the VLM (where transformers keeps it).
    """
    vlm = vlm_config(backbone)
    text = {k: v for k, v in vlm.text_config.to_dict().items() if k not in _DROP_TEXT_KEYS}
    if vlm.model_type in _QWEN:
        valid = set(AutoConfig.for_model("qwen2").to_dict())
        text = {k: v for k, v in text.items() if k in valid}
        rope = dict(text.get("rope_parameters") or {})
        rope.pop("mrope_section", None)
        text["rope_parameters"] = rope
        model_type = "qwen2"
    else:
        model_type = vlm.text_config.model_type
    text["tie_word_embeddings"] = bool(getattr(vlm, "tie_word_embeddings", False))
    return AutoConfig.for_model(model_type, **text)


def _vision_numbers(backbone: dict[str, Any]) -> dict[str, Any]:
    vlm = vlm_config(backbone)
    vision = vlm.vision_config
    patch = vision.patch_size
    numbers = {"model_type": vlm.model_type,
               "patch_size": int(patch if isinstance(patch, int) else patch[0])}
    if vlm.model_type in _QWEN:
        numbers["merge_size"] = int(vision.spatial_merge_size)
    else:
        numbers["prefix"] = 0 if "siglip" in vision.model_type else 1
        numbers["strategy"] = vlm.vision_feature_select_strategy
    return numbers


def backbone_grounding_defaults(backbone: dict[str, Any]) -> dict[str, Any]:
    """``grounding_config`` defaults for the tower's patch size ``p``: when ``p`` is not a power
    of two (14), the pixel decoder runs at ``output_stride = p / 2^k`` (7; it upsamples by powers
    of two) without the image stem (a strided CNN reaches powers of two only)."""
    patch = _vision_numbers(backbone)["patch_size"]
    if patch & (patch - 1) == 0:
        return {}
    return {"output_stride": patch // (patch & -patch), "image_stem": False}


def backbone_tokens_per_image(config) -> int:
    """LM tokens per image of an :class:`EchoMoEConfig` with a backbone (``ValueError`` when
    ``image_size`` does not fit the tower or ``projector_pool`` is set)."""
    if config.projector_pool:
        raise ValueError("projector_pool must be False with a backbone (its own projector / "
                         "merger sets the number of image tokens)")
    n = _vision_numbers(config.backbone)
    h, w = image_hw(config.image_size)
    unit = n["patch_size"] * n.get("merge_size", 1)
    if h % unit or w % unit:
        detail = (f"patch_size x spatial_merge_size = {n['patch_size']} x {n['merge_size']}"
                  if "merge_size" in n else "the patch size")
        raise ValueError(f"image_size {h}x{w} must be a multiple of {detail} = {unit} for a "
                         f"{n['model_type']} backbone")
    patches = (h // n["patch_size"]) * (w // n["patch_size"])
    if "merge_size" in n:
        return patches // n["merge_size"] ** 2
    return patches + n["prefix"] - (n["strategy"] == "default")


def _has_tokenizer(path: str) -> bool:
    return any((Path(path) / name).is_file()
               for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def backbone_tokenizer(config):
    """The backbone's own tokenizer (from its directory) with the echomoe special tokens added
    (:func:`~echomoe.data.tokenizer.load_tokenizer`); ``config``: an ``EchoMoEConfig`` or a
    resolved backbone dict."""
    from echomoe.data.tokenizer import load_tokenizer

    backbone = getattr(config, "backbone", config)
    path = backbone.get("path")
    if path is None:
        raise ValueError("this backbone has no path (its structure only, as in a saved model): "
                         "pass the tokenizer saved beside the model (EchoMoEProcessor."
                         "from_pretrained(dir))")
    if not _has_tokenizer(path):
        raise _missing(path, "no tokenizer files")
    return load_tokenizer(path)


def backbone_config_kwargs(backbone: Any, overrides: dict[str, Any]) -> dict[str, Any]:
    """``EchoMoEConfig`` fields a backbone sets for ``build_config`` (given ``overrides`` win).

    Resolves ``backbone``; sets ``text_config`` (its LM's, vocabulary grown to the tokenizer),
    ``vision_config={"kind": "backbone"}``, the special token ids and pad / bos / eos from the
    backbone's tokenizer and ``image_size`` (LLaVA: the tower's; Qwen: 448).  ``vision_config``,
    ``text_config``, ``language_model_path`` or ``projector_pool`` in ``overrides`` are a
    ``ValueError`` (the backbone provides them).
    """
    clash = [k for k in ("vision_config", "text_config", "language_model_path")
             if overrides.get(k) is not None]
    clash += ["projector_pool"] if overrides.get("projector_pool") else []
    if clash:
        raise ValueError(f"backbone provides the vision tower, projector and language model; "
                         f"drop the override(s) {clash}")
    resolved = resolve_backbone(backbone)
    text = backbone_text_config(resolved)
    forced: dict[str, Any] = {"backbone": resolved, "text_config": text,
                              "vision_config": {"kind": "backbone"}}
    defaults: dict[str, Any] = {}
    numbers = _vision_numbers(resolved)
    vision = vlm_config(resolved).vision_config
    defaults["image_size"] = 448 if numbers["model_type"] in _QWEN else int(vision.image_size)
    path = resolved["path"]
    if path is None or not _has_tokenizer(path):
        missing = [k for k in _TOKEN_FIELDS if k not in overrides]
        if missing:
            where = "it has no path" if path is None else f"{path} has no tokenizer files"
            raise ValueError(f"set {', '.join(missing)} for this backbone ({where})")
    else:
        from echomoe.data.tokenizer import special_token_ids

        tokenizer = backbone_tokenizer(resolved)
        text.vocab_size = max(int(text.vocab_size), len(tokenizer))
        ids = special_token_ids(tokenizer)
        defaults.update({field: ids[token] for field, token in _TOKEN_FIELDS.items()})
        defaults.update({name: getattr(tokenizer, name)
                         for name in ("pad_token_id", "bos_token_id", "eos_token_id")})
    return {**{k: v for k, v in defaults.items() if k not in overrides}, **forced}


def _vlm_class(model_type: str) -> type:
    import transformers

    return getattr(transformers, BACKBONE_CLASSES[model_type])


def _language_model(vlm: nn.Module, text_config: PretrainedConfig) -> nn.Module:
    """A causal LM of ``text_config`` holding the VLM's text weights (no copies made)."""
    config = copy.deepcopy(text_config)
    head = vlm.lm_head.weight
    config.vocab_size = head.shape[0]
    state = {f"model.{k}": v for k, v in vlm.model.language_model.state_dict().items()}
    state["lm_head.weight"] = head
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    model_cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    from transformers.utils import logging

    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()  # no loading report: every weight is checked below
    logging.disable_progress_bar()
    try:
        lm, info = model_cls.from_pretrained(None, config=config, state_dict=state,
                                             output_loading_info=True, dtype=head.dtype)
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()
    bad = {k: sorted(v) for k, v in info.items() if k != "error_msgs" and v}
    if bad:
        raise ValueError(f"the backbone's text weights do not fit {model_cls.__name__}: {bad}")
    return lm


def build_backbone(config) -> tuple[nn.Module, nn.Module, nn.Module]:
    """``(vision encoder, projector, language model)`` of ``config.backbone``: loaded from its
    directory (float32; ``local_files_only``) or, without a path, the same structure with random
    weights.  The LM's embeddings are resized to ``config.text_config.vocab_size`` when the
    tokenizer outgrew the VLM's vocabulary."""
    backbone = config.backbone
    vlm_cfg = vlm_config(backbone)
    vlm_cls = _vlm_class(vlm_cfg.model_type)
    if backbone["path"] is not None:
        path = backbone["path"]
        if not (Path(path) / "config.json").is_file():
            raise _missing(path, "no config.json")
        vlm = vlm_cls.from_pretrained(path, local_files_only=True, dtype=torch.float32)
        lm = _language_model(vlm, config.text_config)
    else:
        vlm = vlm_cls(vlm_cfg)
        lm = AutoModelForCausalLM.from_config(config.text_config)
    if lm.get_input_embeddings().weight.shape[0] != config.text_config.vocab_size:
        lm.resize_token_embeddings(config.text_config.vocab_size)
    lm_dim = config.text_config.hidden_size
    mean, std = backbone["image_mean"], backbone["image_std"]
    if vlm_cfg.model_type in _QWEN:
        visual = vlm.model.visual
        merger, visual.merger = visual.merger, nn.Identity()
        vision = QwenVisionAdapter(visual, config.image_size, mean, std, output_size=lm_dim)
        projector: nn.Module = QwenMerger(merger, vision.merge_size, vision.hidden_size, lm_dim)
    else:
        vision = LlavaVisionAdapter(vlm.model.vision_tower, config.image_size,
                                    vlm_cfg.vision_feature_layer,
                                    vlm_cfg.vision_feature_select_strategy, mean, std,
                                    output_size=lm_dim)
        projector = LlavaProjector(vlm.model.multi_modal_projector, vision.hidden_size, lm_dim)
    return vision, projector, lm


HF_VISION_KINDS = {"siglip": "siglip_vision_model", "clip": "clip_vision_model",
                   "dinov2": "dinov2"}
"""``vision_config`` kind -> the ``transformers`` vision ``model_type`` built from ``config``."""

VISION_KINDS = ("native", "convnet", "pretrained", *HF_VISION_KINDS, "backbone")


def _vision_kind(spec: dict) -> str:
    kind = spec.get("kind", "native")
    if kind not in VISION_KINDS:
        raise ValueError(f"unknown vision_config kind {kind!r}; valid: {', '.join(VISION_KINDS)}")
    return kind


def _hf_vision_config(spec: dict):
    """The ``transformers`` config of a ``siglip`` / ``clip`` / ``dinov2`` or ``pretrained``
    ``vision_config`` (a pretrained one read from its local directory only)."""
    kind = _vision_kind(spec)
    if kind == "pretrained":
        hf = AutoConfig.from_pretrained(str(spec["path"]), local_files_only=True)
        return getattr(hf, "vision_config", hf)
    return AutoConfig.for_model(HF_VISION_KINDS[kind], **spec.get("config", {}))


def _convnet_default(name: str):
    from echomoe.vision import ConvNet

    return inspect.signature(ConvNet.__init__).parameters[name].default


def native_vision_class(kind: str) -> type | None:
    """The echomoe encoder class a ``native`` / ``convnet`` ``vision_config`` builds (its
    other keys are that class's keyword arguments), else ``None``."""
    from echomoe.vision import ConvNet, VisionTransformer

    return {"native": VisionTransformer, "convnet": ConvNet}.get(kind)


def vision_patch_size(vision_config: dict) -> int:
    """Patch size of the encoder a (non-backbone) ``vision_config`` describes, without
    building it."""
    spec = dict(vision_config)
    kind = _vision_kind(spec)
    if kind == "backbone":
        raise ValueError("vision_config kind 'backbone' has no patch size of its own; see "
                         "backbone_tokens_per_image")
    if kind == "native":
        patch = spec.get("patch_size", 16)
    elif kind == "convnet":
        patch = 2 ** len(spec.get("widths", _convnet_default("widths")))
    else:
        patch = _hf_vision_config(spec).patch_size
    return int(image_hw(patch, "patch_size")[0])


def build_vision_encoder(config) -> nn.Module:
    """The image encoder described by ``config.vision_config`` (native ViT, ConvNet, HF or
    pretrained)."""
    from echomoe.vision import HFVisionEncoder

    spec = dict(config.vision_config)
    kind = _vision_kind(spec)
    native = native_vision_class(kind)
    if native is not None:
        spec.pop("kind", None)
        return native(image_size=config.image_size, in_channels=config.in_channels, **spec)
    if kind == "pretrained":
        return HFVisionEncoder.from_pretrained(spec["path"])
    if kind == "backbone":
        raise ValueError("vision_config kind 'backbone' needs the config's backbone field")
    return HFVisionEncoder.from_config(_hf_vision_config(spec))


def build_language_model(config) -> nn.Module:
    """The causal LM of ``config.text_config``, with the weights of ``language_model_path``
    when it is set (read from disk only)."""
    if config.language_model_path is not None:
        return AutoModelForCausalLM.from_pretrained(
            config.language_model_path, config=config.text_config, local_files_only=True
        )
    return AutoModelForCausalLM.from_config(config.text_config)
