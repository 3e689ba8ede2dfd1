"""Model builders: presets x variants -> :class:`EchoMoEConfig`, model and processor.

::

    from echomoe.models import build_config, build_model, build_processor, count_parameters
    model = build_model("tiny", "moe_region_hard")             # random weights, CPU seconds
    processor = build_processor("tiny")                        # tokenizer trained offline
    count_parameters(model)                                    # {"total", "active", "router"}
    build_config("small", "moe_topk", moe_config={"num_experts": 8}, projector_pool=True)

Presets (:data:`PRESETS`) fix sizes only: ``tiny`` runs a forward in CPU seconds (image 32,
ViT 48 x 2 blocks, Qwen2 64 x 2 layers, vocab 1024), ``small`` trains in CPU minutes (image 64,
ViT 128 x 4, Qwen2 256 x 4, vocab 4096).

Variants (:data:`VARIANTS`) fix the language model's FFNs (every decoder layer, ``layers="all"``;
``E = 4`` experts, ``k = 2`` per token; experts randomly initialised, ``upcycle=False``):

======================= ========================================================================
``dense``               the LM's own MLPs (``moe_config=None``)
``moe_topk``            token top-k router (Mixtral / Qwen2-MoE)
``moe_shared``          top-k experts + a sigmoid-gated always-on shared expert (Qwen2-MoE)
``moe_dual_path``       EchoVLM-like: a dense branch beside the routed experts, mixed per
                        token by a ``Linear(D, 2)`` softmax
``moe_region_hard``     each anatomical region owns a subset of the experts (top-k within it)
``moe_region_soft``     top-k router plus a learned per-region logit bias and alignment loss
``moe_modality``        UniMedVL-like hard routing by token type: experts 0-1 serve text
                        tokens, 2-3 image tokens (top-2 within the group: each modality has
                        its own FFN weights, a mixture-of-transformers FFN)
``moe_modality_region`` ``E = 8``: text tokens take top-2 of experts 0-3, image tokens
                        top-2 of their region's experts among 4-7 (the region-hard rule
                        inside the image group)
``echovlm``             EchoVLM's block: each layer keeps its own MLP (the pretrained one when
                        the LM comes from ``language_model_path``) as the dense branch and adds
                        a Qwen2-MoE block beside it (4 experts, top-2, ``normalize_topk=False``,
                        sigmoid-gated shared expert), mixed per token by ``Linear(D, 2)`` *with*
                        bias; expert / shared widths in EchoVLM's proportion to the dense width
                        (1408 and 5632 of Qwen2-VL-7B's 18944); balance-loss weight
                        ``0.001 * k`` (transformers' Qwen2-MoE loss is ``k`` times echomoe's), no
                        z-loss.  *Not* equal-active: it adds the MoE block on top of the whole
                        dense MLP.
======================= ========================================================================

**Equal active parameters per token.**  With the dense MLP width ``F`` of the preset, a shared
expert of width ``S = F / 4`` (``moe_shared``) and a dense branch of width ``F_d = F / 2``
(``moe_dual_path``), every routed expert has width
``F_e = (F - S - F_d) / k`` (:func:`~echomoe.moe.builders.equal_active_expert_size`), so a token
passes through ``k * F_e + S + F_d = F`` hidden units: the same FFN weights as the dense model
(every variant in :data:`EQUAL_ACTIVE_VARIANTS`).  Router, shared-expert gate and path-mixer
weights come on top; :func:`count_parameters` reports them separately (``"router"``), so
``active - router`` is *exactly* equal between ``dense`` and every equal-active variant of a
preset (the tests assert it).  The rule is applied after overrides: change
``text_config={"intermediate_size": ...}`` or ``moe_config={"top_k": ...}`` and the expert width
follows, unless ``moe_config={"intermediate_size": ...}`` fixes it explicitly.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any

import numpy as np
from torch import nn

from echomoe.data.schema import REGIONS
from echomoe.models.configuration import EchoMoEConfig
from echomoe.models.processor import EchoMoEProcessor
from echomoe.moe.builders import build_moe_layer, causal_routers, equal_active_expert_size
from echomoe.moe.builders import count_parameters as _count_module_parameters
from echomoe.moe.upcycle import moefy

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "image_size": 32,
        "vision_config": {"kind": "native", "patch_size": 8, "hidden_size": 48, "depth": 2,
                          "num_heads": 4},
        "text_config": {"model_type": "qwen2", "vocab_size": 1024, "hidden_size": 64,
                        "intermediate_size": 128, "num_hidden_layers": 2,
                        "num_attention_heads": 4, "num_key_value_heads": 2,
                        "max_position_embeddings": 1024, "tie_word_embeddings": False},
    },
    "small": {
        "image_size": 64,
        "vision_config": {"kind": "native", "patch_size": 8, "hidden_size": 128, "depth": 4,
                          "num_heads": 4},
        "text_config": {"model_type": "qwen2", "vocab_size": 4096, "hidden_size": 256,
                        "intermediate_size": 512, "num_hidden_layers": 4,
                        "num_attention_heads": 4, "num_key_value_heads": 2,
                        "max_position_embeddings": 2048, "tie_word_embeddings": False},
    },
}
"""Sizes of each preset (top-level :class:`EchoMoEConfig` fields)."""

_MOE_COMMON: dict[str, Any] = {"layers": "all", "num_experts": 4, "top_k": 2, "upcycle": False}
VARIANTS: dict[str, dict[str, Any] | None] = {
    "dense": None,
    "moe_topk": {**_MOE_COMMON, "router": "topk"},
    "moe_shared": {**_MOE_COMMON, "router": "topk", "shared_expert_fraction": 0.25},
    "moe_dual_path": {**_MOE_COMMON, "router": "topk", "dense_branch_fraction": 0.5},
    "moe_region_hard": {**_MOE_COMMON, "router": "region_hard"},
    "moe_region_soft": {**_MOE_COMMON, "router": "region_soft"},
    "moe_modality": {**_MOE_COMMON, "router": "modality"},
    "moe_modality_region": {**_MOE_COMMON, "router": "modality_region", "num_experts": 8},
    "echovlm": {**_MOE_COMMON, "router": "topk", "normalize_topk": False, "keep_dense": True,
                "path_mixer_bias": True, "expert_fraction": 1408 / 18944,
                "shared_expert_fraction": 5632 / 18944},
}
"""LM FFN layout of each variant (``moe_config`` before the equal-active sizes are filled in;
``*_fraction`` are shares of the dense width ``F``)."""

EQUAL_ACTIVE_VARIANTS = ("moe_topk", "moe_shared", "moe_dual_path", "moe_region_hard",
                         "moe_region_soft", "moe_modality", "moe_modality_region")
"""The MoE variants whose active FFN parameters per token equal ``dense``'s."""

VARIANT_LOSS_WEIGHTS: dict[str, dict[str, Any]] = {
    "echovlm": {"moe_balance": lambda moe: 0.001 * moe["top_k"], "moe_z": 0.0},
}
"""Loss-weight defaults of a variant (a value may be a function of its final ``moe_config``);
the config's own ``loss_weights`` override them."""

_NESTED = ("vision_config", "text_config", "moe_config", "grounding_config")
_FRACTIONS = {"shared_expert_fraction": "shared_expert_size",
              "dense_branch_fraction": "dense_branch_size",
              "expert_fraction": "intermediate_size"}


def _config_fields() -> list[str]:
    params = inspect.signature(EchoMoEConfig.__init__).parameters
    return [n for n, p in params.items() if n != "self" and p.kind is p.POSITIONAL_OR_KEYWORD]


def _moe_fields() -> set[str]:
    """Keys a ``moe_config`` may hold: ``moefy`` and ``build_moe_layer`` arguments."""
    names = set(inspect.signature(moefy).parameters) | set(
        inspect.signature(build_moe_layer).parameters)
    return names - {"model", "moe_kwargs", "hidden_size", "causal", "activation", "generator"}


def _check_choice(kind: str, name: str, valid) -> None:
    if name not in valid:
        raise ValueError(f"unknown {kind} {name!r}; valid: {', '.join(valid)}")


def _merge(base: dict[str, Any], update: dict[str, Any], where: str) -> dict[str, Any]:
    if not isinstance(update, dict):
        raise ValueError(f"override {where} must be a dict, got {type(update).__name__}")
    return {**base, **copy.deepcopy(update)}


def _text_config_keys(model_type: str) -> set[str]:
    from transformers import AutoConfig

    return set(AutoConfig.for_model(model_type).to_dict()) | {"model_type"}


def _moe_config(variant: str, dense_width: int, num_regions: int,
                overrides: dict[str, Any] | None) -> dict[str, Any] | None:
    """``moefy`` arguments of ``variant`` with equal-active widths for dense width ``F``."""
    spec = VARIANTS[variant]
    if spec is None:
        if overrides:
            raise ValueError(
                "variant 'dense' has no moe_config to override; pick one of "
                f"{', '.join(v for v in VARIANTS if v != 'dense')}"
            )
        return None
    moe = _merge(spec, overrides or {}, "moe_config")
    unknown = set(moe) - _moe_fields() - set(_FRACTIONS)
    if unknown:
        raise ValueError(f"unknown moe_config keys {sorted(unknown)}; valid: "
                         f"{', '.join(sorted(_moe_fields()))}")
    for fraction, size in _FRACTIONS.items():
        share = moe.pop(fraction, None)
        if share is not None and size not in moe:
            moe[size] = int(round(dense_width * share))
    moe.setdefault("num_regions", num_regions)
    if "intermediate_size" not in moe:
        moe["intermediate_size"] = equal_active_expert_size(
            dense_width, moe["top_k"], moe.get("shared_expert_size") or 0,
            moe.get("dense_branch_size") or 0,
        )
    return moe


def _new_vision_kind(key: str, preset: dict[str, Any], override: dict[str, Any]) -> bool:
    """Whether ``override`` is a ``vision_config`` of another encoder kind than ``preset``."""
    return key == "vision_config" and isinstance(override, dict) and \
        override.get("kind", preset.get("kind", "native")) != preset.get("kind", "native")


def build_config(preset: str = "tiny", variant: str = "dense", **overrides) -> EchoMoEConfig:
    """The :class:`EchoMoEConfig` of ``preset`` x ``variant``, with overrides.

    Args:
        preset: one of :data:`PRESETS`.
        variant: one of :data:`VARIANTS`.
        **overrides: :class:`EchoMoEConfig` fields (``image_size=64``, ``projector_pool=True``,
            ``regions=[...]``, ...).  ``vision_config``, ``text_config``, ``moe_config`` and
            ``grounding_config`` take dicts *merged* into the preset's (``moe_config=
            {"num_experts": 8}`` keeps the other MoE settings); a ``vision_config`` of
            another ``kind`` than the preset's (``{"kind": "convnet", ...}``) replaces it.
            ``backbone={"path": DIR}`` replaces the preset's vision and text configs by a
            pretrained VLM's
            (:func:`~echomoe.models.backbone.backbone_config_kwargs`), so the MoE expert widths
            follow its LM's intermediate size.

    Raises ``ValueError`` naming the valid choices for an unknown preset, variant, override or
    nested key, and when the equal-active rule cannot split the dense width.
    """
    _check_choice("preset", preset, list(PRESETS))
    _check_choice("variant", variant, list(VARIANTS))
    fields = _config_fields()
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ValueError(f"unknown override(s) {unknown}; valid: {', '.join(fields)}")
    kwargs = copy.deepcopy(PRESETS[preset])
    moe_overrides = overrides.get("moe_config")
    for key, value in overrides.items():
        if key == "moe_config":
            continue
        if key in _NESTED and key in kwargs and value is not None \
                and not _new_vision_kind(key, kwargs[key], value):
            kwargs[key] = _merge(kwargs[key], value, key)
        else:
            kwargs[key] = copy.deepcopy(value)
    if kwargs.get("backbone") is not None:  # its LM's config, tokenizer ids, image size
        from echomoe.models.backbone import backbone_config_kwargs

        kwargs.update(backbone_config_kwargs(kwargs["backbone"], overrides))
    text = kwargs["text_config"]
    if isinstance(text, dict):
        bad = set(text) - _text_config_keys(text.get("model_type", "qwen2"))
        if bad:
            raise ValueError(f"unknown text_config keys {sorted(bad)} for model type "
                             f"{text.get('model_type', 'qwen2')!r}")
        dense_width = int(text["intermediate_size"])
    else:
        dense_width = int(text.intermediate_size)
    regions = kwargs.get("regions")
    num_regions = len(regions) if regions is not None else len(REGIONS)
    if "moe_config" in overrides and moe_overrides is None:
        kwargs["moe_config"] = None  # moe_config=None: make any variant dense
    else:
        kwargs["moe_config"] = _moe_config(variant, dense_width, num_regions, moe_overrides)
    if kwargs["moe_config"] is not None and variant in VARIANT_LOSS_WEIGHTS:
        defaults = {name: value(kwargs["moe_config"]) if callable(value) else value
                    for name, value in VARIANT_LOSS_WEIGHTS[variant].items()}
        kwargs["loss_weights"] = {**defaults, **(kwargs.get("loss_weights") or {})}
    config = EchoMoEConfig(**kwargs)
    validate_config(config)
    return config


def validate_config(config: EchoMoEConfig) -> None:
    """Check a config against the blocks that consume it; raises ``ValueError`` on mismatch.

    Native ``vision_config`` keys against :class:`~echomoe.vision.VisionTransformer` (or
    :class:`~echomoe.vision.ConvNet` for ``kind: convnet``),
    ``moe_config`` keys against ``moefy`` / ``build_moe_layer`` (causal router, region count),
    image / patch / pooling arithmetic, and the special token ids against the vocabulary.
    """
    from echomoe.models.backbone import native_vision_class
    from echomoe.models.processor import image_tokens_per_image

    spec = dict(config.vision_config)
    native = native_vision_class(spec.pop("kind", "native"))
    if native is not None:
        params = inspect.signature(native.__init__).parameters
        valid = set(params) - {"self", "image_size", "in_channels"}
        bad = set(spec) - valid
        if bad:
            raise ValueError(f"unknown vision_config keys {sorted(bad)} for {native.__name__}; "
                             f"valid: kind, {', '.join(sorted(valid))} (image_size and "
                             "in_channels are top-level config fields)")
        if native.__name__ == "ConvNet":
            from echomoe.vision.convnet import check_layout

            check_layout(spec.get("widths", params["widths"].default),
                         spec.get("depths", params["depths"].default))
    image_tokens_per_image(config)  # raises on patch / pooling mismatch
    moe = config.moe_config
    if moe is not None:
        bad = set(moe) - _moe_fields()
        if bad:
            raise ValueError(f"unknown moe_config keys {sorted(bad)}; valid: "
                             f"{', '.join(sorted(_moe_fields()))}")
        router = moe.get("router", "topk")
        if router not in causal_routers():
            raise ValueError(f"moe_config router {router!r} is not causal; valid for the LM: "
                             f"{', '.join(causal_routers())}")
        if moe.get("num_regions", config.num_regions) != config.num_regions:
            raise ValueError(f"moe_config num_regions={moe['num_regions']} but the config has "
                             f"{config.num_regions} regions")
    ids = [config.image_token_id, config.seg_token_id, config.det_token_id,
           config.kpt_token_id]
    if max(ids) >= config.text_config.vocab_size:
        raise ValueError(f"special token ids {ids} do not fit the vocabulary of "
                         f"{config.text_config.vocab_size}")


def build_model(preset: str = "tiny", variant: str = "dense", **overrides) -> nn.Module:
    """``EchoMoEForConditionalGeneration(build_config(preset, variant, **overrides))``.

    Random weights, built offline; ``modeling`` is imported only here.
    """
    from echomoe.models.modeling import EchoMoEForConditionalGeneration

    return EchoMoEForConditionalGeneration(build_config(preset, variant, **overrides))


def corpus_texts(samples, seed: int = 0) -> list[str]:
    """Tokenizer-training texts of ``samples`` (any :class:`~echomoe.data.schema.UltrasoundSample`
    list: synthetic, or a real train split): each sample's report and every (prompt, target)
    pair of every task it supports (QA, diagnosis, grounding targets with ``[SEG]`` / ``[DET]``
    / ``[KPT]``, prompts with ``<image>`` tags), phrased with ``default_rng([seed, index])``;
    then every instruction template, so the prompts tokenise compactly whatever the data."""
    from echomoe.data.tasks import PROMPTS, TASKS, build_task

    texts: list[str] = []
    for i, sample in enumerate(samples):
        rng = np.random.default_rng([seed, i])
        if sample.report:
            texts.append(sample.report)
        for task in TASKS:
            for prompt, target in build_task(task, sample, rng):
                texts += [prompt, target]
    texts += [t.replace("{label}", "lesion").replace("{question}", "")
              for phrasings in PROMPTS.values() for t in phrasings]
    return texts


def synthetic_corpus(num_samples: int = 200, seed: int = 0) -> list[str]:
    """:func:`corpus_texts` of ``num_samples`` synthetic cases (``generate(num_samples, seed)``),
    the default tokenizer corpus."""
    from echomoe.data.synthetic.generate import generate

    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    return corpus_texts(generate(num_samples, seed), seed)


def build_processor(
    preset: str = "tiny",
    tokenizer=None,
    seed: int = 0,
    *,
    num_samples: int = 200,
    config: EchoMoEConfig | None = None,
) -> EchoMoEProcessor:
    """The :class:`EchoMoEProcessor` matching ``preset`` (or ``config``).

    Args:
        preset: one of :data:`PRESETS`.
        tokenizer: an HF tokenizer with the echomoe special tokens; ``None`` trains a byte-level
            BPE offline (:func:`~echomoe.data.tokenizer.train_tokenizer`) on
            :func:`synthetic_corpus` with the preset's vocabulary size as the maximum (nothing
            is cached; ~1 s).  The synthetic corpus is small: ``tiny`` reaches its 1024 tokens,
            ``small`` stops near 1.7k of its 4096 (the extra embedding rows stay unused).
        seed: synthetic corpus seed.
        num_samples: synthetic cases in the corpus (fewer = faster, smaller vocabulary).
        config: the model's config when it differs from the preset's (e.g. built with an
            ``image_size`` or ``projector_pool`` override).  With a ``backbone`` directory the
            default tokenizer is the backbone's own
            (:func:`~echomoe.models.backbone.backbone_tokenizer`).
    """
    from echomoe.data.tokenizer import train_tokenizer

    config = config if config is not None else build_config(preset)
    if tokenizer is None and config.backbone is not None:
        from echomoe.models.backbone import backbone_tokenizer

        tokenizer = backbone_tokenizer(config)  # the VLM's own, with the echomoe tokens
    if tokenizer is None:
        tokenizer = train_tokenizer(synthetic_corpus(num_samples, seed),
                                    config.text_config.vocab_size)
    return EchoMoEProcessor.from_config(config, tokenizer)


def count_parameters(model: nn.Module) -> dict[str, int]:
    """``{"total", "active", "router"}`` parameters of a whole model (or any module).

    ``active`` counts routed experts at ``k / E`` (for expert-choice / soft MoE in the vision
    tower: their average experts per token / ``E``) and everything else fully, routers and gates
    included; ``router`` is the share of router, shared-expert gate and path-mixer weights.  See
    :func:`echomoe.moe.builders.count_parameters`.
    """
    return _count_module_parameters(model)
