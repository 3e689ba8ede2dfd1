"""Closed answers by likelihood: score each listed option, answer with the most likely one.

A closed question has a known, small answer set: ``yes`` / ``no``, the options a choice
question lists, or a diagnosis label.  Free generation can answer outside that set (a
misspelt label, an unfinished phrase) and then scores zero for a reason that has nothing to do
with what the model knows.  Ranking asks the model which option it finds most likely, as
multiple-choice benchmarks do::

    options = closed_options("vqa", "What is the margin? Options: angular, circumscribed.",
                             "choice")            # ["angular", "circumscribed"]
    best = rank_options(model, processor, images, prompts, [options], region_ids=None)

An option's score is the sum of the log-probabilities of its tokens and the eos token after
the prompt (teacher forced, exactly the tokens the model was trained to emit).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["closed_options", "rank_options", "diagnosis_options"]

_LIST_AFTER = re.compile(r":\s*(?P<list>[^:?]+?)[.?]?\s*$")


def diagnosis_options() -> list[str]:
    """Every diagnosis label of the synthetic vocabulary (all regions: the region is not
    given away by the option list)."""
    from echomoe.data.synthetic.vocab import DIAGNOSES

    return sorted({label for labels in DIAGNOSES.values() for label in labels})


def closed_options(task: str, question: str, qa_type: str = "",
                   options: Sequence[str] | None = None) -> list[str] | None:
    """The answer set of a closed question, or ``None`` when it has none to rank.

    * ``vqa`` + ``yes_no``: ``["yes", "no"]``;
    * ``vqa`` + ``choice``: ``options`` when the QA item lists them (the synthetic benchmark
      does), else the comma / ``or``-separated list after the question's last ``:``
      (``"... Options: a, b, c."``, ``"Which fits: a, b or c?"``); ``None`` when neither
      gives two or more options (the question is then answered by free generation);
    * ``diagnosis``: ``options`` when given (the harness gives the synthetic vocabulary plus
      the dataset's own labels), else :func:`diagnosis_options`.
    """
    if task == "diagnosis":
        return list(dict.fromkeys(options)) if options else diagnosis_options()
    if task != "vqa":
        return None
    if qa_type == "yes_no":
        return ["yes", "no"]
    if qa_type != "choice":
        return None
    if options:
        items = [str(o).strip() for o in options]
    else:
        match = _LIST_AFTER.search(question.strip())
        if match is None:
            return None
        items = [o.strip() for o in re.split(r",|\bor\b", match.group("list"))]
    items = list(dict.fromkeys(o for o in items if o))
    return items if len(items) >= 2 else None


@torch.no_grad()
def rank_options(model, processor, images: Sequence[Any], prompts: Sequence[str],
                 options: Sequence[Sequence[str]], *, region_ids: torch.Tensor | None = None,
                 max_rows: int = 128) -> list[int]:
    """Index of the most likely option for each prompt.

    Args:
        model: an :class:`~echomoe.models.modeling.EchoMoEForConditionalGeneration`.
        processor: its processor.
        images: each prompt's list of images.
        prompts: the prompts (with their ``<image>`` tags).
        options: the candidate answers of each prompt (at least one each).
        region_ids: ``(B,)`` routing ids, or ``None`` to let the model predict them.
        max_rows: (prompt, option) sequences per forward.
    """
    if not (len(images) == len(prompts) == len(options)):
        raise ValueError("images, prompts and options must have one entry per prompt")
    if any(not opts for opts in options):
        raise ValueError("every prompt needs at least one option")
    tok = processor.tokenizer
    device = next(model.parameters()).device
    inputs = processor(images=[list(i) for i in images], text=list(prompts),
                       padding_side="right")
    rows, owners, starts = [], [], []
    for i, opts in enumerate(options):
        prompt = inputs["input_ids"][i][inputs["attention_mask"][i].bool()].tolist()
        for option in opts:
            rows.append(prompt + tok.encode(option, add_special_tokens=False)
                        + [tok.eos_token_id])
            owners.append(i)
            starts.append(len(prompt))
    scores = torch.empty(len(rows))
    for lo in range(0, len(rows), max_rows):
        chunk = range(lo, min(lo + max_rows, len(rows)))
        length = max(len(rows[r]) for r in chunk)
        ids = torch.full((len(chunk), length), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, r in enumerate(chunk):
            ids[j, : len(rows[r])] = torch.tensor(rows[r])
            mask[j, : len(rows[r])] = 1
        who = torch.tensor([owners[r] for r in chunk])
        out = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                    pixel_values=inputs["pixel_values"][who].to(device),
                    image_counts=inputs["image_counts"][who].to(device),
                    region_ids=None if region_ids is None else region_ids[who].to(device))
        logp = torch.log_softmax(out.logits[:, :-1].float(), dim=-1)
        token_logp = logp.gather(-1, ids[:, 1:, None].to(device))[..., 0].cpu()  # (n, L-1)
        for j, r in enumerate(chunk):
            # Targets sit at positions starts[r] .. len-1; their logits one step earlier.
            scores[r] = token_logp[j, starts[r] - 1: len(rows[r]) - 1].sum()
    best, offset = [], 0
    for opts in options:
        best.append(int(scores[offset: offset + len(opts)].argmax()))
        offset += len(opts)
    return best
