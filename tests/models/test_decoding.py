"""Minimum-Bayes-risk decoding: the seeded sampler and the harness option (the consensus choice,
``echomoe.metrics.text.consensus_index``, is tested in tests/metrics/test_text.py)."""

import numpy as np
import pytest
import torch

from echomoe.data.synthetic.generate import SyntheticConfig, generate
from echomoe.metrics.harness import evaluate_model, report_texts
from echomoe.models import build_model, build_processor
from echomoe.models.decoding import sample_sequences


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = build_model("tiny", "moe_region_soft").eval()  # beams repeat the region ids
    processor = build_processor("tiny", num_samples=40, config=model.config)
    return model, processor, generate(5, seed=3, config=SyntheticConfig(image_size=32))


@pytest.fixture(scope="module")
def report_prompt(tiny):
    """Two left-padded report prompts and the generation limits the sampler tests use."""
    model, processor, samples = tiny
    inputs = processor(images=[list(s.images) for s in samples[:2]],
                       text=["Write the ultrasound report for this study."] * 2,
                       padding_side="left")
    return model, inputs, {"max_new_tokens": 6, "pad_token_id": 0, "eos_token_id": 2}


def test_sampling_is_seeded_and_leaves_the_global_rng_alone(report_prompt):
    model, inputs, kwargs = report_prompt
    state = torch.random.get_rng_state()
    a = sample_sequences(model, inputs, num_samples=3, seed=7, **kwargs)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = sample_sequences(model, inputs, num_samples=3, seed=7, **kwargs)
    c = sample_sequences(model, inputs, num_samples=3, seed=8, **kwargs)
    assert a.shape[0] == 6 and torch.equal(a, b)
    assert not torch.equal(a, c)
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        sample_sequences(model, inputs, num_samples=0, seed=0, **kwargs)


def test_sampling_temperature_sharpens_towards_the_greedy_sequence(report_prompt):
    model, inputs, kwargs = report_prompt
    greedy = model.generate(**inputs, do_sample=False, num_beams=1, **kwargs)
    cold = sample_sequences(model, inputs, num_samples=3, seed=7, temperature=1e-4, **kwargs)
    warm = sample_sequences(model, inputs, num_samples=3, seed=7, **kwargs)
    assert torch.equal(cold, greedy.repeat_interleave(3, dim=0))
    assert not torch.equal(warm, cold)  # an untrained model's samples differ at temperature 1
    with pytest.raises(ValueError, match="temperature must be > 0"):
        sample_sequences(model, inputs, num_samples=2, seed=7, temperature=0.0, **kwargs)


def test_harness_reports_by_mbr_are_reproducible_and_among_the_samples(tiny):
    model, processor, samples = tiny
    run = lambda n: evaluate_model(model, processor, samples, ["report"], batch_size=2,  # noqa: E731
                                   max_new_tokens=8, progress=False, report_samples=n)
    first, again = run(4), run(4)
    predictions = [r["prediction"] for r in first.records]
    assert predictions == [r["prediction"] for r in again.records]
    assert first.settings["report_samples"] == 4
    assert len(predictions) == len(samples)
    with pytest.raises(ValueError, match="report_samples must be >= 1"):
        run(0)
    cold = evaluate_model(model, processor, samples, ["report"], batch_size=2, max_new_tokens=8,
                          progress=False, report_samples=4, report_temperature=0.5)
    assert cold.settings["report_temperature"] == 0.5
    with pytest.raises(ValueError, match="report_temperature must be > 0"):
        evaluate_model(model, processor, samples, ["report"], max_new_tokens=8, progress=False,
                       report_samples=4, report_temperature=-1.0)


def test_harness_report_pool_either_keeps_the_consensus_or_takes_a_pool_report(tiny):
    model, processor, samples = tiny
    run = lambda pool: evaluate_model(model, processor, samples, ["report"],  # noqa: E731
                                      batch_size=2, max_new_tokens=8, progress=False,
                                      report_samples=4, report_pool=pool)
    plain = [r["prediction"] for r in run(None).records]
    # The pool: reference reports, and the sampled consensus of case 0 as a pool text too.
    pool = report_texts(generate(6, seed=11, config=SyntheticConfig(image_size=32)))
    pooled = run(pool + [plain[0]])
    assert pooled.settings["report_pool"] == len(pool) + 1
    taken = [r["scores"]["from_pool"] for r in pooled.records]
    for before, after, from_pool in zip(plain, [r["prediction"] for r in pooled.records], taken,
                                        strict=True):
        assert after == before if not from_pool else after in pool + [plain[0]]
    assert pooled.metrics["per_task"]["report"]["pool_rate"] == pytest.approx(np.mean(taken))
    assert np.isnan(run(None).metrics["per_task"]["report"]["pool_rate"])
    with pytest.raises(ValueError, match="report_pool needs report_samples >= 2"):
        evaluate_model(model, processor, samples, ["report"], max_new_tokens=8, progress=False,
                       report_samples=1, report_pool=pool)
