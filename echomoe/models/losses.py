"""The language-modelling loss of the VLM, with a choice of how examples are weighted.

``transformers``' causal-LM loss is the mean over every supervised token of the batch
(``reduction="token"``): in a multitask batch, a 90-token report then carries 30 times the
weight of a three-token VQA answer, and the short answers (closed questions, diagnoses) get a
few per cent of the gradient.  ``reduction="example"`` averages each example's tokens first and
then the examples (every example with at least one supervised token counts once), as
sample-level averaging in instruction tuning does.

:func:`supervised_lm_loss` computes the same loss from the final hidden states, running the
LM head only at the supervised positions: in a VLM batch most positions are image and prompt
tokens, and the ``(tokens, vocab)`` logits and their softmax are a large share of a small
model's training step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["LM_LOSS_REDUCTIONS", "causal_lm_loss", "supervised_lm_loss"]

LM_LOSS_REDUCTIONS = ("token", "example")
IGNORE_INDEX = -100


def _check(what: str, values: Tensor, labels: Tensor, reduction: str) -> None:
    if reduction not in LM_LOSS_REDUCTIONS:
        raise ValueError(f"unknown LM loss reduction {reduction!r}; valid: "
                         f"{', '.join(LM_LOSS_REDUCTIONS)}")
    if values.dim() != 3 or labels.shape != values.shape[:2]:
        raise ValueError(f"{what} and labels (B, T) must agree, got "
                         f"{tuple(values.shape)} and {tuple(labels.shape)}")


def causal_lm_loss(logits: Tensor, labels: Tensor, reduction: str = "token") -> Tensor:
    """Next-token cross-entropy of ``logits (B, T, V)`` against ``labels (B, T)``.

    ``labels`` are aligned with the inputs (position ``t`` predicts ``labels[:, t + 1]``;
    ``-100`` is ignored), as for ``transformers``' causal LMs.  ``reduction``: ``"token"`` (mean
    over the batch's supervised tokens) or ``"example"`` (mean over examples of each example's
    token mean).  A batch without a supervised token gives 0 (with a gradient path).
    """
    _check("logits (B, T, V)", logits, labels, reduction)
    target = labels[:, 1:].to(logits.device)
    per_token = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), target,
                                ignore_index=IGNORE_INDEX, reduction="none")  # (B, T - 1)
    valid = (target != IGNORE_INDEX).to(per_token.dtype)
    if reduction == "token":
        return (per_token * valid).sum() / valid.sum().clamp(min=1.0)
    counts = valid.sum(dim=1)
    rows = counts > 0
    per_example = (per_token * valid).sum(dim=1) / counts.clamp(min=1.0)
    return (per_example * rows).sum() / rows.sum().clamp(min=1).to(per_example.dtype)


def supervised_lm_loss(hidden: Tensor, head: torch.nn.Module, labels: Tensor,
                       reduction: str = "token") -> Tensor:
    """:func:`causal_lm_loss` of ``head(hidden)`` without the logits of unsupervised positions.

    ``hidden (B, T, D)`` are the LM's final (normalised) hidden states, ``head`` its output
    projection, ``labels (B, T)`` as for :func:`causal_lm_loss`; equal to
    ``causal_lm_loss(head(hidden), labels, reduction)`` up to float rounding.
    """
    _check("hidden (B, T, D)", hidden, labels, reduction)
    target = labels[:, 1:].to(hidden.device)
    rows, cols = (target != IGNORE_INDEX).nonzero(as_tuple=True)
    if rows.numel() == 0:
        return head(hidden[:, :1]).float().sum() * 0.0
    logits = head(hidden[:, :-1][rows, cols]).float()  # (N, V), N supervised tokens
    per_token = F.cross_entropy(logits, target[rows, cols], reduction="none")
    if reduction == "token":
        return per_token.mean()
    b = labels.shape[0]
    sums = per_token.new_zeros(b).index_add_(0, rows, per_token)
    counts = per_token.new_zeros(b).index_add_(0, rows, torch.ones_like(per_token))
    present = counts > 0
    return (sums[present] / counts[present]).mean()
