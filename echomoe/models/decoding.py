"""Minimum-Bayes-risk (MBR) decoding of free text: sample, then keep the consensus.

Greedy decoding returns the mode *token by token*, not the most likely *report*: where a
lesion can be described in many phrasings and its absence in few, the first token of
"No focal lesion ..." can outweigh each lesion phrasing although the lesion reports together
are far more likely.  MBR decoding (Kumar & Byrne, 2004; Eikema & Aziz, 2020) samples
``num_samples`` candidates and returns the one with the highest expected utility against the
others, a Monte-Carlo estimate of the candidate that agrees best with the model's distribution.

The utility is the unigram F1 (clipped counts) between token lists of
:func:`echomoe.metrics.text.tokenize`, so Chinese text compares by character; the consensus is
:func:`echomoe.metrics.text.consensus_index`, which also picks the report prior.
"""

from __future__ import annotations

import torch

__all__ = ["sample_sequences"]


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
