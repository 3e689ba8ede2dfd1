"""``EchoMoEForConditionalGeneration``: vision encoder + region-routed MoE LM + grounding heads.

Data flow (see ``DESIGN.md``)::

    pixel_values ─► vision encoder ─► tokens ─► projector ─► image embeddings ──┐
                        └─ intermediates ─► pixel decoder ─► pixel features      │
    region ids (given, or predicted from pooled tokens) ─► routing context      ▼
    input_ids ─► embeddings, each <image> placeholder replaced by one image token ─► causal LM
    LM last hidden at [SEG] / [DET] / [KPT] ─► mask decoder / box head / keypoint head

``forward`` returns the total loss, the raw named losses (``lm``, ``seg_bce``, ``seg_dice``,
``box_l1``, ``box_giou``, ``keypoint``, ``moe_balance``, ``moe_z``, ``moe_region``,
``region_cls``, ``diagnosis_cls``; each present when its inputs are), logits, grounding
predictions and routing.
The total is ``sum(config.loss_weights[name] * loss)``.  With ``config.backbone`` the encoder,
projector and LM are a pretrained VLM's own (:mod:`echomoe.models.backbone`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor, nn
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoProcessor,
    GenerationMixin,
    PreTrainedModel,
)
from transformers.modeling_outputs import CausalLMOutputWithPast

from echomoe.grounding import (
    BoxHead,
    DotProductMaskHead,
    DynamicConvMaskDecoder,
    HeatmapBoxHead,
    HeatmapKeypointHead,
    KeypointHead,
    PixelDecoder,
    box_loss,
    keypoint_heatmap_loss,
    keypoint_loss,
    mask_loss,
    match_point_pairs,
)
from echomoe.models.backbone import build_backbone, build_language_model, build_vision_encoder
from echomoe.models.configuration import EchoMoEConfig
from echomoe.models.losses import causal_lm_loss, supervised_lm_loss
from echomoe.models.processor import EchoMoEProcessor
from echomoe.moe.context import RoutingContext
from echomoe.moe.layer import RoutingInfo, validate_region_ids
from echomoe.moe.upcycle import moefy
from echomoe.vision import Projector, RegionClassifier

_MOE_LOSS_NAMES = {"balance": "moe_balance", "z": "moe_z", "region": "moe_region"}

#: The name transformers gives the LM cache in model inputs and outputs: ``cache`` since
#: transformers 5.24, ``past_key_values`` before. Read off transformers' own causal-LM output.
CACHE_NAME = next(f.name for f in fields(CausalLMOutputWithPast)
                  if f.name in ("cache", "past_key_values"))


@dataclass
class EchoMoEOutput(CausalLMOutputWithPast):
    """Output of :class:`EchoMoEForConditionalGeneration`: transformers' causal-LM output
    (``loss``, ``logits``, the cache under :data:`CACHE_NAME`, ``hidden_states``,
    ``attentions``) plus the fields below.

    Attributes:
        losses: raw named losses (``loss`` is their weighted total; ``None`` without targets).
        pred_masks: ``(B, H, W)`` mask logits at each sample's first ``[SEG]`` (0 without one).
        pred_boxes: ``(B, 4)`` normalised ``(cx, cy, w, h)`` at ``[DET]``.
        pred_keypoints: ``(B, K, 2)`` normalised points at ``[KPT]``.
        region_logits: ``(B, R)`` region classifier logits (when images were given).
        diagnosis_logits: ``(B, len(config.diagnoses))`` diagnosis classifier logits (when
            images were given and the config has ``diagnoses``).
        region_ids: ``(B,)`` the region ids the experts were routed with.
        routing: per-layer :class:`~echomoe.moe.layer.RoutingInfo` of the LM's MoE layers.
    """

    losses: dict[str, Tensor] | None = None
    pred_masks: Tensor | None = None
    pred_boxes: Tensor | None = None
    pred_keypoints: Tensor | None = None
    region_logits: Tensor | None = None
    diagnosis_logits: Tensor | None = None
    region_ids: Tensor | None = None
    routing: dict[str, RoutingInfo] | None = None


def _initialise_missing(model: nn.Module, names: Sequence[str]) -> None:
    """Copy the weights ``names`` from a freshly built model of the same config into
    ``model`` (each submodule initialises itself on construction; ``_init_weights`` is a
    no-op, so loading alone would leave them as allocated)."""
    fresh = type(model)(model.config).state_dict()
    own = model.state_dict()
    with torch.no_grad():
        for name in names:
            if name in own and name in fresh:
                own[name].copy_(fresh[name].to(own[name].dtype))


_PASSTHROUGH_KWARGS = frozenset({
    "task_ids", "pixel_spacing", "original_sizes",  # VLMCollator keys the forward does not use
    "return_dict", "output_attentions", "output_hidden_states", "cache_position",  # generate
    "num_items_in_batch",  # transformers' Trainer
})


def _unexpected_kwargs_message(names: list[str], forward) -> str:
    """``forward() got unexpected keyword argument(s) 'region_id' (did you mean
    'region_ids'?)``."""
    import difflib
    import inspect

    known = [p for p in inspect.signature(forward).parameters if p != "kwargs"]
    parts = []
    for name in names:
        close = difflib.get_close_matches(name, known, n=1)
        parts.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return (f"EchoMoEForConditionalGeneration.forward() got unexpected keyword argument(s) "
            f"{', '.join(parts)}")


class EchoMoEPreTrainedModel(PreTrainedModel):
    """``PreTrainedModel`` base of the echomoe VLM: config class and HF plumbing."""

    config_class = EchoMoEConfig
    base_model_prefix = "echomoe"
    main_input_name = "input_ids"
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        # Every submodule initialises itself on construction; loading fills the rest (and
        # from_pretrained refuses checkpoints that would leave a weight unfilled).
        return

    @classmethod
    def from_pretrained(cls, *args: Any, allow_missing_keys: bool = False, **kwargs: Any):
        """``PreTrainedModel.from_pretrained``, but a checkpoint whose keys do not match the
        model (missing, unexpected or mismatched weights: another architecture, a LoRA run's
        unmerged adapters) is a ``ValueError`` listing them, instead of a warning and weights
        left at their initial values.  ``allow_missing_keys=True`` loads it anyway (for
        upcycling or adding a head), with transformers' report, and gives every missing weight
        the model's own initialisation (that of a freshly built model: never uninitialised
        memory); ``output_loading_info=True`` returns ``(model, info)`` as usual."""
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        bad = {key: sorted(info.get(key) or []) for key in
               ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(key)}
        if info.get("missing_keys") and allow_missing_keys:
            _initialise_missing(model, info["missing_keys"])
        if bad and not allow_missing_keys:
            where = args[0] if args else kwargs.get("pretrained_model_name_or_path")
            listed = "; ".join(f"{key.replace('_', ' ')} ({len(names)}): "
                               f"{', '.join(map(str, names[:4]))}"
                               f"{', ...' if len(names) > 4 else ''}"
                               for key, names in bad.items())
            raise ValueError(f"{where}: the checkpoint does not match the model: {listed}. "
                             "Pass allow_missing_keys=True to load it anyway.")
        return (model, info) if want_info else model


class EchoMoEForConditionalGeneration(EchoMoEPreTrainedModel, GenerationMixin):
    """The echomoe vision-language model (see the module docstring)."""

    def __init__(self, config: EchoMoEConfig) -> None:
        super().__init__(config)
        g = config.grounding_config
        lm_dim, language_model = config.text_config.hidden_size, None
        if config.backbone is not None:  # the VLM's tower, its projector / merger and its LM
            self.vision, self.projector, language_model = build_backbone(config)
        else:
            self.vision = build_vision_encoder(config)
            self.projector = Projector(self.vision.hidden_size, lm_dim, pool=config.projector_pool)
        vision_dim = self.vision.hidden_size  # features the region classifier / pixel decoder read
        self.region_classifier = RegionClassifier(vision_dim, config.num_regions)
        self.diagnosis_classifier = (RegionClassifier(vision_dim, len(config.diagnoses))
                                     if config.diagnoses else None)
        self.language_model = (language_model if language_model is not None
                               else build_language_model(config))
        if config.moe_config:
            moe = {"num_regions": config.num_regions, **config.moe_config}
            self.routing_context = moefy(self.language_model, **moe)
        else:
            self.routing_context = RoutingContext()
        n_maps = g["intermediate_layers"]
        self.pixel_decoder = PixelDecoder(
            in_channels=[vision_dim] * n_maps, dim=g["pixel_dim"],
            input_stride=self.vision.patch_size, output_stride=g["output_stride"],
            image_channels=config.in_channels if g["image_stem"] else 0,
        )
        if g["mask_decoder"] == "dynamic_conv":
            self.mask_decoder: nn.Module = DynamicConvMaskDecoder(
                hidden_size=lm_dim, in_channels=self.pixel_decoder.out_channels,
                conv_channels=g["conv_channels"], num_layers=g["conv_layers"],
            )
        elif g["mask_decoder"] == "dot_product":
            self.mask_decoder = DotProductMaskHead(
                hidden_size=lm_dim, in_channels=self.pixel_decoder.out_channels
            )
        else:
            raise ValueError(
                f"unknown mask_decoder {g['mask_decoder']!r}; valid: dynamic_conv, dot_product"
            )
        pixel_dim = self.pixel_decoder.out_channels
        for key in ("box_head", "keypoint_head"):
            if g[key] not in ("mlp", "heatmap"):
                raise ValueError(f"unknown grounding_config {key} {g[key]!r}; valid: mlp, heatmap")
        self.box_head = (BoxHead(hidden_size=lm_dim) if g["box_head"] == "mlp" else
                         HeatmapBoxHead(hidden_size=lm_dim, in_channels=pixel_dim))
        self.keypoint_head = (
            KeypointHead(hidden_size=lm_dim, num_keypoints=g["num_keypoints"])
            if g["keypoint_head"] == "mlp" else
            HeatmapKeypointHead(hidden_size=lm_dim, in_channels=pixel_dim,
                                num_keypoints=g["num_keypoints"]))
        if g["keypoint_head"] == "mlp" and config.loss_weights["keypoint_heatmap"] > 0:
            raise ValueError("loss_weights.keypoint_heatmap > 0 needs grounding_config "
                             "keypoint_head='heatmap' (an 'mlp' keypoint head has no heatmap)")
        self.post_init()

    # -- HF plumbing ----------------------------------------------------------------------
    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save config + all weights; the saved config no longer points at the LM's (or the
        backbone's) source directory, since the checkpoint itself carries their weights."""
        source, backbone = self.config.language_model_path, self.config.backbone
        self.config.language_model_path = None
        if backbone is not None:
            self.config.backbone = {**backbone, "path": None}
        try:
            return super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            self.config.language_model_path, self.config.backbone = source, backbone

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        """The language model's LM head."""
        return self.language_model.get_output_embeddings()

    def get_decoder(self):
        return self.language_model.get_decoder()

    @property
    def routes_by_region(self) -> bool:
        """Whether a router reads the region ids (region-hard / region-soft routing); such
        models are evaluated with predicted regions and, separately, with the oracle."""
        from echomoe.moe.modality import ModalityRouter
        from echomoe.moe.routers import RegionHardRouter, RegionSoftRouter

        return any(isinstance(m, RegionHardRouter | RegionSoftRouter)
                   or (isinstance(m, ModalityRouter) and m.route_regions)
                   for m in self.modules())

    @property
    def tokens_per_image(self) -> int:
        """``<image>`` placeholder tokens each image expands to in ``input_ids``."""
        from echomoe.models.processor import image_tokens_per_image

        return image_tokens_per_image(self.config)

    # -- images ---------------------------------------------------------------------------
    def _flatten_images(self, pixel_values: Tensor, image_counts: Tensor | None) -> tuple:
        """``(B, N, C, H, W)`` or ``(B, C, H, W)`` -> ``(M, C, H, W)`` valid images + counts."""
        if pixel_values.dim() == 4:
            pixel_values = pixel_values.unsqueeze(1)
        if pixel_values.dim() != 5:
            raise ValueError(
                "pixel_values must be (batch, images, channels, H, W) or (batch, channels, H, W),"
                f" got shape {tuple(pixel_values.shape)}"
            )
        b, n, c, h, w = pixel_values.shape
        size = self.config.image_size
        if c not in (1, self.config.in_channels) or (h, w) != (size, size):
            raise ValueError(
                f"pixel_values must have {self.config.in_channels} channel(s) and size "
                f"{size}x{size}, got {c} channel(s) of {h}x{w}"
            )
        if image_counts is None:
            image_counts = torch.full((b,), n, dtype=torch.long, device=pixel_values.device)
        keep = torch.arange(n, device=pixel_values.device)[None, :] < image_counts[:, None]
        return pixel_values[keep], image_counts

    def encode_images(self, pixel_values: Tensor, image_counts: Tensor | None = None) -> dict:
        """Vision tokens, projected embeddings, pixel features of each sample's first image."""
        images, counts = self._flatten_images(pixel_values, image_counts)
        n_maps = self.config.grounding_config["intermediate_layers"]
        tokens, maps = self.vision.forward_intermediates(images, n_maps)
        first = torch.cumsum(counts, 0) - counts  # index of each sample's first image
        first_tokens = tokens[first]
        return {
            "embeds": self.projector(tokens),  # (M, P, D_lm)
            "counts": counts,
            "pooled_tokens": first_tokens,  # (B, P, C_v)
            "pixel_features": self.pixel_decoder([m[first] for m in maps], images[first]),
        }

    def _merge_image_embeds(self, input_ids: Tensor, embeds: Tensor, image_embeds: Tensor,
                            counts: Tensor) -> Tensor:
        is_image = input_ids == self.config.image_token_id  # (B, T)
        expected = counts * image_embeds.shape[1]
        found = is_image.sum(dim=1)
        if not torch.equal(found, expected):
            bad = int((found != expected).nonzero()[0, 0])
            raise ValueError(
                f"sample {bad}: {int(found[bad])} <image> tokens in input_ids but "
                f"{int(counts[bad])} image(s) x {image_embeds.shape[1]} tokens per image = "
                f"{int(expected[bad])} expected (use the processor to expand <image>)"
            )
        flat = image_embeds.reshape(-1, embeds.shape[-1]).to(embeds.dtype)
        return embeds.masked_scatter(is_image.unsqueeze(-1), flat)

    # -- task tokens ------------------------------------------------------------------------
    @staticmethod
    def _first_position(input_ids: Tensor, token_id: int) -> tuple[Tensor, Tensor]:
        """``(has_token (B,), position (B,))`` of each row's first ``token_id``."""
        hit = input_ids == token_id
        return hit.any(dim=1), hit.float().argmax(dim=1)

    def _task_hidden(self, hidden: Tensor, input_ids: Tensor, token_id: int):
        has, pos = self._first_position(input_ids, token_id)
        return has, hidden[torch.arange(hidden.shape[0], device=hidden.device), pos]

    # -- forward ----------------------------------------------------------------------------
    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        pixel_values: Tensor | None = None,
        region_ids: Tensor | None = None,
        labels: Tensor | None = None,
        masks: Tensor | None = None,
        boxes: Tensor | None = None,
        keypoints: Tensor | None = None,
        *,
        image_counts: Tensor | None = None,
        has_mask: Tensor | None = None,
        has_box: Tensor | None = None,
        has_keypoints: Tensor | None = None,
        keypoint_mask: Tensor | None = None,
        diagnosis_ids: Tensor | None = None,
        cache: Any = None,
        past_key_values: Any = None,
        position_ids: Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs: Any,
    ) -> EchoMoEOutput:
        """Run the VLM. Shapes: ``input_ids (B, T)``, ``pixel_values (B, N, C, H, W)``,
        ``region_ids (B,)`` (-1 unknown), ``labels (B, T)`` (-100 ignored), ``masks (B, H, W)``,
        ``boxes (B, 4)`` normalised ``(cx, cy, w, h)``, ``keypoints (B, K, 2)`` normalised;
        ``has_*`` ``(B,)`` flags (default: all samples have the target when it is given);
        ``keypoint_mask (B, K)`` the points that exist (a sample with fewer than ``K``);
        ``diagnosis_ids (B,)`` indices in ``config.diagnoses`` (-1 unknown).
        ``cache`` is the LM cache (``past_key_values``, its name before transformers 5.24, is
        accepted as well). Extra collator keys (``task_ids``, ``pixel_spacing``,
        ``original_sizes``) and the flags ``generate`` / ``Trainer`` pass (``return_dict``,
        ``cache_position``, ...) are ignored; any other keyword with a value is a ``TypeError``
        naming it (a misspelt ``region_id=`` must not silently route with no region).
        """
        unexpected = sorted(k for k, v in kwargs.items()
                            if v is not None and k not in _PASSTHROUGH_KWARGS)
        if unexpected:
            raise TypeError(_unexpected_kwargs_message(unexpected, self.forward))
        if input_ids is None:
            raise ValueError("input_ids is required")
        if input_ids.dim() != 2 or input_ids.shape[0] == 0:
            raise ValueError(f"input_ids must be a non-empty (batch, seq_len) batch, got shape "
                             f"{tuple(input_ids.shape)}")
        if past_key_values is not None:
            if cache is not None:
                raise ValueError("give the LM cache as cache or past_key_values, not both")
            cache = past_key_values
        b = input_ids.shape[0]
        embeds = self.get_input_embeddings()(input_ids)
        losses: dict[str, Tensor] = {}
        images = None
        region_logits = diagnosis_logits = None
        if diagnosis_ids is not None and self.diagnosis_classifier is None:
            raise ValueError("diagnosis_ids given, but the config has no diagnoses (set "
                             "EchoMoEConfig.diagnoses for a diagnosis classifier)")
        if region_ids is not None:
            region_ids = validate_region_ids(region_ids.to(input_ids.device), b,
                                             self.config.num_regions)
        if pixel_values is not None:
            images = self.encode_images(pixel_values, image_counts)
            embeds = self._merge_image_embeds(input_ids, embeds, images["embeds"],
                                              images["counts"])
            region_logits = self.region_classifier(images["pooled_tokens"])
            if region_ids is not None and (region_ids >= 0).any():
                losses["region_cls"] = self.region_classifier.loss(region_logits, region_ids)
            if self.config.predict_region:
                # Samples without a region (none given, or -1) route with the predicted one.
                predicted = region_logits.argmax(dim=-1).detach()
                region_ids = predicted if region_ids is None else torch.where(
                    region_ids >= 0, region_ids, predicted)
            if self.diagnosis_classifier is not None:
                diagnosis_logits = self.diagnosis_classifier(images["pooled_tokens"])
                if diagnosis_ids is not None:
                    losses["diagnosis_cls"] = self.diagnosis_classifier.loss(
                        diagnosis_logits, validate_region_ids(
                            diagnosis_ids.to(input_ids.device), b, len(self.config.diagnoses),
                            name="diagnosis_ids", count="len(config.diagnoses)"))
            for key, value in self.vision.aux_losses.items():
                losses[f"vision_{_MOE_LOSS_NAMES.get(key, key)}"] = value
        elif (input_ids == self.config.image_token_id).any() and cache is None:
            raise ValueError("input_ids contain <image> tokens but no pixel_values were given")

        grounding = masks is not None or boxes is not None or keypoints is not None
        need_hidden = grounding or images is not None
        # MoE aux losses are for training and evaluation; generate() and other unsupervised
        # forwards without gradients skip them.
        supervised = labels is not None or grounding or diagnosis_ids is not None
        # transformers' own loss is the token mean; other reductions, and the loss from the
        # supervised positions' logits only, are computed here (echomoe.models.losses).
        sparse = labels is not None and self.config.labels_only_logits
        own_loss = labels is not None and (sparse or self.config.lm_loss_reduction != "token")
        lm_labels = None if own_loss else labels
        if sparse:
            logits_to_keep = 1  # the loss needs no logits; keep one position's
        with self.routing_context.route(
            region_ids, token_mask=attention_mask,
            token_types=(input_ids == self.config.image_token_id).long(),
            compute_aux_losses=supervised or torch.is_grad_enabled(),
        ):
            out = self.language_model(
                inputs_embeds=embeds, attention_mask=attention_mask, labels=lm_labels,
                position_ids=position_ids, use_cache=use_cache,
                output_hidden_states=need_hidden or sparse,
                logits_to_keep=logits_to_keep, **{CACHE_NAME: cache},
            )
        logits = out.logits
        if sparse:
            losses["lm"] = supervised_lm_loss(out.hidden_states[-1],
                                              self.language_model.get_output_embeddings(),
                                              labels, self.config.lm_loss_reduction)
            logits = None
        elif own_loss:
            losses["lm"] = causal_lm_loss(logits, labels, self.config.lm_loss_reduction)
        elif labels is not None:
            losses["lm"] = out.loss
        for key, value in self.routing_context.aux_losses().items():
            losses[_MOE_LOSS_NAMES.get(key, f"moe_{key}")] = value

        preds = self._ground(input_ids, out.hidden_states, images, masks, boxes, keypoints,
                             has_mask, has_box, has_keypoints, keypoint_mask,
                             losses) if need_hidden else {}
        weights = self.config.loss_weights
        total = None
        if supervised and losses:
            total = sum(weights.get(k.removeprefix("vision_"), 1.0) * v for k, v in losses.items())
        return EchoMoEOutput(
            loss=total, losses=losses, logits=logits, **{CACHE_NAME: getattr(out, CACHE_NAME)},
            pred_masks=preds.get("masks"), pred_boxes=preds.get("boxes"),
            pred_keypoints=preds.get("keypoints"), region_logits=region_logits,
            diagnosis_logits=diagnosis_logits, region_ids=region_ids,
            routing=self.routing_context.routing(),
        )

    def _ground(self, input_ids, hidden_states, images, masks, boxes, keypoints, has_mask,
                has_box, has_keypoints, keypoint_mask, losses) -> dict[str, Tensor]:
        hidden = hidden_states[-1]  # (B, T, D_lm)
        preds: dict[str, Tensor] = {}
        cfg = self.config
        has_seg, seg_h = self._task_hidden(hidden, input_ids, cfg.seg_token_id)
        if masks is not None:
            has_mask = _flags(has_mask, masks.shape[0], masks.device)
            missing = has_mask & ~has_seg
            if missing.any():
                raise ValueError(
                    f"sample {int(missing.nonzero()[0, 0])} has a mask target but no [SEG] token "
                    f"(id {cfg.seg_token_id}) in input_ids"
                )
            if images is None:
                raise ValueError("mask targets need pixel_values")
        if images is not None and (has_seg.any() or masks is not None):
            logits = self.mask_decoder(seg_h, images["pixel_features"], cfg.image_size)
            preds["masks"] = logits * has_seg[:, None, None].to(logits.dtype)
            if masks is not None:
                losses.update(mask_loss(logits, masks.to(logits.dtype), has_mask & has_seg,
                                        bce_weight=1.0, dice_weight=1.0))
        has_det, det_h = self._task_hidden(hidden, input_ids, cfg.det_token_id)
        if has_det.any() or boxes is not None:
            preds["boxes"] = self._spatial_head(self.box_head, det_h, images)
            if boxes is not None:
                flags = _flags(has_box, boxes.shape[0], boxes.device) & has_det
                losses.update(box_loss(preds["boxes"], boxes.to(hidden.dtype), flags))
        has_kpt, kpt_h = self._task_hidden(hidden, input_ids, cfg.kpt_token_id)
        if has_kpt.any() or keypoints is not None:
            maps = keypoints is not None and cfg.loss_weights["keypoint_heatmap"] > 0
            out = self._spatial_head(self.keypoint_head, kpt_h, images, return_scores=maps)
            preds["keypoints"], scores = out if maps else (out, None)
            if keypoints is not None:
                flags = _flags(has_keypoints, keypoints.shape[0], keypoints.device) & has_kpt
                if keypoint_mask is not None:
                    if keypoint_mask.shape != keypoints.shape[:2]:
                        raise ValueError(f"keypoint_mask must be {tuple(keypoints.shape[:2])} "
                                         f"(one flag per keypoint), got "
                                         f"{tuple(keypoint_mask.shape)}")
                    flags = flags[:, None] & keypoint_mask.to(flags.device, torch.bool)
                target = keypoints.to(hidden.dtype)
                if cfg.grounding_config["match_pairs"]:
                    target = match_point_pairs(preds["keypoints"], target,
                                               cfg.grounding_config["measure_pairs"], flags)
                losses.update(keypoint_loss(preds["keypoints"], target, flags))
                if maps:
                    losses.update(keypoint_heatmap_loss(scores, target, flags))
        return preds

    @staticmethod
    def _spatial_head(head: nn.Module, hidden: Tensor, images: dict | None,
                      return_scores: bool = False):
        """Run a box / keypoint head; heatmap heads also read the pixel features.
        ``return_scores`` (heatmap keypoint heads only) also returns the heatmap logits."""
        if isinstance(head, HeatmapBoxHead | HeatmapKeypointHead):
            if images is None:
                raise ValueError(f"{type(head).__name__} needs pixel_values")
            if return_scores:
                return head(hidden, images["pixel_features"], return_scores=True)
            return head(hidden, images["pixel_features"])
        return head(hidden)

    # -- from generated task tokens to pixels -----------------------------------------------
    @torch.no_grad()
    def ground(
        self,
        sequences: Tensor,
        pixel_values: Tensor,
        *,
        image_counts: Tensor | None = None,
        region_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        original_sizes: Tensor | None = None,
        pixel_spacing: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Turn the task tokens in (generated) ``sequences (B, T)`` into pixel predictions.

        Runs one forward over prompt + generated tokens and reads the heads at each row's first
        ``[SEG]`` / ``[DET]`` / ``[KPT]``.  Returns (keys present when a row has the token):

        * ``has_seg`` / ``has_det`` / ``has_kpt`` ``(B,)`` booleans;
        * ``masks`` ``(B, S, S)`` boolean at the model's image size ``S``;
        * ``boxes`` ``(B, 4)`` normalised ``(cx, cy, w, h)`` and ``boxes_xyxy`` ``(B, 4)``
          pixel edges in ``original_sizes`` (``(B, 2)`` or one ``(H, W)``; default ``S x S``);
        * ``keypoints`` ``(B, K, 2)`` normalised and ``keypoints_px`` in original pixels;
        * ``measurements_mm`` ``(B, P)`` for ``grounding_config["measure_pairs"]`` when
          ``pixel_spacing (B,)`` (mm per original pixel) is given.
        """
        from echomoe.grounding.heads import boxes_to_xyxy, keypoints_to_pixels, measure_mm

        out = self(input_ids=sequences, attention_mask=attention_mask, pixel_values=pixel_values,
                   image_counts=image_counts, region_ids=region_ids)
        cfg = self.config
        size = cfg.image_size
        sizes = original_sizes if original_sizes is not None else torch.tensor([size, size])
        result = {
            f"has_{name}": (sequences == token).any(dim=1)
            for name, token in (("seg", cfg.seg_token_id), ("det", cfg.det_token_id),
                                ("kpt", cfg.kpt_token_id))
        }
        if out.pred_masks is not None:
            result["masks"] = (out.pred_masks > 0) & result["has_seg"][:, None, None]
        if out.pred_boxes is not None:
            result["boxes"] = out.pred_boxes
            result["boxes_xyxy"] = boxes_to_xyxy(out.pred_boxes, sizes)
        if out.pred_keypoints is not None:
            result["keypoints"] = out.pred_keypoints
            result["keypoints_px"] = keypoints_to_pixels(out.pred_keypoints, sizes)
            if pixel_spacing is not None:
                pairs = [tuple(p) for p in cfg.grounding_config["measure_pairs"]]
                result["measurements_mm"] = measure_mm(out.pred_keypoints, pairs, sizes,
                                                       pixel_spacing)
        return result

    # -- generation -------------------------------------------------------------------------
    def prepare_inputs_for_generation(self, input_ids, *, is_first_iteration=False,
                                      pixel_values=None, image_counts=None, region_ids=None,
                                      **kwargs):
        # The cache and the attention mask travel in kwargs under transformers' own names.
        inputs = super().prepare_inputs_for_generation(
            input_ids, is_first_iteration=is_first_iteration, **kwargs
        )
        # Images enter at the prefill only (and at every step without a cache).
        if is_first_iteration or inputs.get(CACHE_NAME) is None:
            inputs["pixel_values"] = pixel_values
            inputs["image_counts"] = image_counts
        inputs["region_ids"] = region_ids
        return inputs

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, *args, **kwargs):
        model_kwargs = super()._update_model_kwargs_for_generation(
            outputs, model_kwargs, *args, **kwargs
        )
        # Keep routing with the prefill's (given or predicted) regions at every decoding step.
        if outputs.region_ids is not None:
            model_kwargs["region_ids"] = outputs.region_ids
        return model_kwargs


def _flags(flags: Tensor | None, batch: int, device) -> Tensor:
    if flags is None:
        return torch.ones(batch, dtype=torch.bool, device=device)
    return flags.to(device=device, dtype=torch.bool)


def masks_from_logits(mask_logits: Tensor, threshold: float = 0.0) -> Tensor:
    """Boolean ``(B, H, W)`` masks from mask logits (``> threshold``)."""
    return mask_logits > threshold


# HF auto classes: AutoConfig / AutoModelForImageTextToText / AutoProcessor resolve "echomoe"
# checkpoints and processors saved with save_pretrained.
AutoConfig.register(EchoMoEConfig.model_type, EchoMoEConfig, exist_ok=True)
AutoModelForImageTextToText.register(EchoMoEConfig, EchoMoEForConditionalGeneration, exist_ok=True)
AutoProcessor.register(EchoMoEConfig, EchoMoEProcessor, exist_ok=True)
