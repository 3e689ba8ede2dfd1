"""Image generation by an echomoe VLM: the language model reads the request, a head draws.

:class:`ImageGenerator` puts a :class:`~echomoe.generation.flow.FlowMatchingHead` on an
:class:`~echomoe.models.modeling.EchoMoEForConditionalGeneration`.  A request is text
(:func:`request_text`: the region and the report of the case to draw); its token embeddings are
followed by a learned *generation task token* (``gen_token``, an embedding of the generator, so
the tokenizer and the vocabulary stay as they are), the language model runs over both (through
its MoE layers, routed by the requested region), and the last hidden state, at the task token,
conditions the head.  Optionally the requested lesion mask conditions it too
(``mask_channels=1``).  Training uses the same loop as everything else::

    generator = ImageGenerator(vlm, FlowMatchingHead(hidden, 64, mask_channels=1))
    batches = IndexedBatches(train_samples, collate_fn=GenerationCollator(tokenizer, 64),
                             batch_size=16)
    train(generator, batches, steps=2000, lr=1e-3)
    batch = GenerationCollator(tokenizer, 64)(test_samples)
    images = generator.generate(batch["input_ids"], batch["attention_mask"],
                                region_ids=batch["region_ids"], masks=batch["masks"])

and :func:`~echomoe.generation.evaluate.generation_report` scores the result.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from echomoe.data.schema import region_index
from echomoe.generation.evaluate import MASKS, sample_tensors
from echomoe.generation.flow import FlowMatchingHead


def request_text(sample) -> str:
    """The request for ``sample``'s image: ``"Generate a <region> ultrasound image.
    <report>"`` (findings and impression)."""
    region = sample.region.replace("_", " ")
    return f"Generate a {region} ultrasound image. {sample.report}".strip()


class GenerationCollator:
    """Samples -> a batch for :class:`ImageGenerator`: ``input_ids`` / ``attention_mask``
    ``[B, T]`` (the :func:`request_text`, padded on the left so that every row ends at the
    task token), ``region_ids [B]``, ``images [B, 1, S, S]`` in ``[-1, 1]`` and ``masks
    [B, 1, S, S]`` (the lesion mask) at ``S = image_size``."""

    def __init__(self, tokenizer, image_size: int):
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer needs a pad token")
        self.tokenizer, self.image_size = tokenizer, int(image_size)

    def __call__(self, samples: Sequence) -> dict[str, Tensor]:
        ids = [self.tokenizer(request_text(s), add_special_tokens=True)["input_ids"]
               for s in samples]
        width = max(len(i) for i in ids)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(i)) + i for i in ids])
        attention_mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
        images, masks = sample_tensors(samples, self.image_size)
        regions = torch.tensor([region_index(s.region) for s in samples])
        return {"input_ids": input_ids, "attention_mask": attention_mask, "region_ids": regions,
                "images": images, "masks": masks[:, MASKS.index("lesion")][:, None]}


class ImageGenerator(nn.Module):
    """An echomoe VLM's language model conditioning a :class:`FlowMatchingHead`.

    Args:
        vlm: the VLM (its language model, embeddings and routing context are used; the
            vision tower is not: the request is text).
        head: the image head, built with ``hidden_size`` = the LM's hidden size.
        freeze_language_model: train the head (and the task token) only.
    """

    def __init__(self, vlm: nn.Module, head: FlowMatchingHead, *,
                 freeze_language_model: bool = False):
        super().__init__()
        hidden = vlm.config.text_config.hidden_size
        if head.hidden_proj[0].in_features != hidden:
            raise ValueError(f"the head conditions on {head.hidden_proj[0].in_features}-d "
                             f"states, the language model's hidden size is {hidden}")
        self.vlm, self.head = vlm, head
        self.gen_token = nn.Parameter(torch.randn(1, 1, hidden) * 0.02)
        if freeze_language_model:
            for param in vlm.parameters():
                param.requires_grad_(False)

    def condition(self, input_ids: Tensor, attention_mask: Tensor,
                  region_ids: Tensor | None = None) -> Tensor:
        """The LM's last hidden state at the task token after the request ``[B, hidden]``
        (``input_ids`` left-padded, as :class:`GenerationCollator` makes them)."""
        b = input_ids.shape[0]
        embeds = self.vlm.get_input_embeddings()(input_ids)
        embeds = torch.cat([embeds, self.gen_token.to(embeds.dtype).expand(b, -1, -1)], dim=1)
        mask = torch.cat([attention_mask, attention_mask.new_ones(b, 1)], dim=1)
        context = self.vlm.routing_context
        # The request and the task token are text to a modality router (no image tokens).
        with context.route(region_ids, token_mask=mask, token_types=torch.zeros_like(mask),
                           compute_aux_losses=self.training):
            out = self.vlm.language_model(inputs_embeds=embeds, attention_mask=mask,
                                          output_hidden_states=True)
        self._aux = context.aux_losses() if self.training else {}
        return out.hidden_states[-1][:, -1]

    def forward(self, input_ids: Tensor, attention_mask: Tensor, images: Tensor,
                masks: Tensor | None = None, region_ids: Tensor | None = None) -> dict[str, Any]:
        """``{"loss", "losses"}``: the flow-matching loss ``gen`` plus the MoE aux losses of
        the request's forward, weighted by the VLM's ``loss_weights``."""
        hidden = self.condition(input_ids, attention_mask, region_ids)
        use_masks = masks if self.head.mask_channels else None
        losses = {"gen": self.head.loss(hidden, images.to(hidden.dtype), use_masks)}
        weights = self.vlm.config.loss_weights
        for key, value in self._aux.items():  # balance -> moe_balance, as the VLM names them
            losses[f"moe_{key}"] = value
        total = losses["gen"] + sum(weights.get(k, 1.0) * v for k, v in losses.items()
                                    if k != "gen")
        return {"loss": total, "losses": losses}

    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Tensor, *,
                 region_ids: Tensor | None = None, masks: Tensor | None = None,
                 steps: int = 20, guidance: float = 1.0,
                 generator: torch.Generator | None = None) -> Tensor:
        """Images ``[B, 1, S, S]`` in ``[-1, 1]`` for the requests (``masks``: the requested
        lesion masks, used when the head takes them)."""
        was = self.training
        self.eval()
        try:
            hidden = self.condition(input_ids, attention_mask, region_ids)
            return self.head.sample(hidden, steps=steps, guidance=guidance, generator=generator,
                                    masks=masks if self.head.mask_channels else None)
        finally:
            self.train(was)
