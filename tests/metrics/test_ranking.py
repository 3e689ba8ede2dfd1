"""Closed answers by likelihood: option parsing and the ranking against a direct computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from echomoe.data.synthetic.generate import generate
from echomoe.data.tasks import build_task
from echomoe.metrics.ranking import closed_options, diagnosis_options, rank_options


def test_closed_options():
    assert closed_options("vqa", "Is there a lesion?", "yes_no") == ["yes", "no"]
    assert closed_options(
        "vqa", "<image>\nQuestion: What is the margin? Options: angular, spiculated, "
        "circumscribed.\n", "choice") == ["angular", "spiculated", "circumscribed"]
    assert closed_options("vqa", "Select the lesion type (or none) from: mass, none.",
                          "choice") == ["mass", "none"]
    assert closed_options("vqa", "Is it cystic or solid? Options: cystic or solid",
                          "choice") == ["cystic", "solid"]
    assert closed_options("vqa", "Which fits best: tr2, tr3 or tr4?", "choice") == [
        "tr2", "tr3", "tr4"]
    assert closed_options("vqa", "Is the mass oval, round or irregular?", "choice") is None
    assert closed_options("vqa", "Is the mass oval, round or irregular?", "choice",
                          ["oval", "round", "irregular"]) == ["oval", "round", "irregular"]
    assert closed_options("vqa", "Which one is it?", "choice") is None
    assert closed_options("vqa", "What organ is shown?", "open") is None
    assert closed_options("segment", "Segment the lesion.") is None
    labels = closed_options("diagnosis", "What is the diagnosis?")
    assert labels == diagnosis_options() and {"birads_4", "tr3", "normal"} <= set(labels)
    assert len(labels) == len(set(labels))


def test_every_synthetic_closed_question_has_its_answer_among_the_options():
    for sample in generate(12, seed=3):
        for qa in sample.qa:
            if qa["type"] in ("yes_no", "choice"):
                options = closed_options("vqa", qa["question"], qa["type"],
                                         qa.get("options"))
                assert options and qa["answer"] in options, qa
        if sample.diagnosis:
            assert sample.diagnosis in diagnosis_options()


@pytest.fixture(scope="module")
def tiny():
    from echomoe.models import build_model, build_processor

    torch.manual_seed(0)
    model = build_model("tiny", "moe_topk").eval()
    return model, build_processor("tiny", num_samples=40, config=model.config)


def _direct_score(model, processor, image, prompt: str, option: str) -> float:
    tok = processor.tokenizer
    inputs = processor(images=[[image]], text=[prompt], padding_side="right")
    prompt_ids = inputs["input_ids"][0].tolist()
    target = tok.encode(option, add_special_tokens=False) + [tok.eos_token_id]
    ids = torch.tensor([prompt_ids + target])
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=inputs["pixel_values"]).logits[0]
    logp = torch.log_softmax(logits.float(), -1)
    return float(sum(logp[len(prompt_ids) + j - 1, t] for j, t in enumerate(target)))


def test_rank_options_picks_the_most_likely_option(tiny):
    model, processor = tiny
    samples = generate(3, seed=1)
    prompts, images, options = [], [], []
    for i, s in enumerate(samples):
        prompt, _ = build_task("vqa", s, np.random.default_rng([0, i]))[0]
        prompts.append(prompt)
        images.append([s.images[0]])
        options.append(["yes", "no", "birads_4", "a fibroid"][: 2 + i])
    best = rank_options(model, processor, images, prompts, options)
    for i in range(3):
        direct = [_direct_score(model, processor, images[i][0], prompts[i], o)
                  for o in options[i]]
        assert best[i] == int(np.argmax(direct))
    assert rank_options(model, processor, images, prompts, options, max_rows=1) == best
    with pytest.raises(ValueError, match="at least one option"):
        rank_options(model, processor, images[:1], prompts[:1], [[]])
