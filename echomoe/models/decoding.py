"""Minimum-Bayes-risk (MBR) decoding of free text: sample, then keep the consensus.

Greedy decoding returns the mode *token by token*, not the most likely *report*: where a
lesion can be described in many phrasings and its absence in few, the first token of
"No focal lesion ..." can outweigh each lesion phrasing although the lesion reports together
are far more likely.  MBR decoding (Kumar & Byrne, 2004; Eikema & Aziz, 2020) samples
``num_samples`` candidates and returns the one with the highest expected utility against the
others, a Monte-Carlo estimate of the candidate that agrees best with the model's distribution.

The utility is the unigram F1 (clipped counts) between token lists of
:func:`echomoe.metrics.text.tokenize`, so Chinese text compares by character.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch

from echomoe.metrics.text import tokenize

__all__ = ["unigram_f1", "mbr_select", "sample_sequences"]


def unigram_f1(a: Sequence[str], b: Sequence[str]) -> float:
    """F1 of the clipped unigram overlap of two token lists (1.0 for two empty lists)."""
    if not a and not b:
        return 1.0
    overlap = sum((Counter(a) & Counter(b)).values())
    return 2.0 * overlap / (len(a) + len(b))


def mbr_select(candidates: Sequence[str], language: str = "auto") -> int:
    """Index of the candidate with the highest mean :func:`unigram_f1` to the other
    candidates (ties: the first).  One candidate is its own consensus."""
    if not candidates:
        raise ValueError("mbr_select needs at least one candidate")
    tokens = [tokenize(c, language) for c in candidates]
    n = len(tokens)
    if n == 1:
        return 0
    gains = [sum(unigram_f1(tokens[i], tokens[j]) for j in range(n) if j != i) for i in range(n)]
    return max(range(n), key=gains.__getitem__)


def sample_sequences(model, inputs: dict, *, num_samples: int, seed: int,
                     temperature: float = 1.0, **generate_kwargs) -> torch.Tensor:
    """``model.generate`` with ``num_samples`` sampled sequences per row (at ``temperature``,
    no top-k / top-p truncation), reproducible: the random state is seeded with ``seed`` and
    restored afterwards.  Returns ``(B * num_samples, T)``, each row's samples contiguous."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    device = inputs["input_ids"].device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        return model.generate(**inputs, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                              num_beams=1, num_return_sequences=num_samples, **generate_kwargs)
