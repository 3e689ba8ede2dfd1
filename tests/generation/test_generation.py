"""The image generator (flow matching), its U-Net and the code that scores generated images."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from echomoe.generation.evaluate import (
    frechet_distance,
    generation_report,
    sample_tensors,
    train_segmenter,
)
from echomoe.generation.flow import FlowMatchingHead, time_embedding, to_model_range, to_uint8
from echomoe.generation.unet import UNet


def test_unet_shapes_conditioning_and_errors():
    net = UNet(3, 2, width=6, depth=2, cond_dim=10, groups=4)
    x, c = torch.randn(3, 3, 12, 20), torch.randn(3, 10)
    assert net(x, c).shape == (3, 2, 12, 20)
    assert net.encode(x, c)[0].shape == (3, 24, 3, 5)
    assert not torch.allclose(net(x, c), net(x, c + 1))  # the condition changes the output
    with pytest.raises(ValueError, match=r"divisible by 2\*\*depth = 4, got \(12, 18\)"):
        net(torch.randn(1, 3, 12, 18), torch.randn(1, 10))
    with pytest.raises(ValueError, match=r"cond must be \[B, 10\] = \[3, 10\], got None"):
        net(x)
    assert UNet(1, 1, width=4, depth=1).features(torch.randn(2, 1, 8, 8)).shape == (2, 8)


def test_time_embedding_and_ranges():
    emb = time_embedding(torch.tensor([0.0, 0.5]), 8)
    assert emb.shape == (2, 8) and torch.equal(emb[0], torch.tensor([0.0] * 4 + [1.0] * 4))
    u8 = torch.tensor([0, 127, 255], dtype=torch.uint8)
    assert torch.equal(to_uint8(to_model_range(u8)), u8)


def _head(**kw):
    torch.manual_seed(0)
    return FlowMatchingHead(hidden_size=7, image_size=8, width=4, depth=2, cond_dim=6, **kw)


def test_the_loss_is_zero_for_the_true_velocity_and_trains_the_condition(monkeypatch):
    head = _head()
    hidden, images = torch.randn(3, 7), torch.rand(3, 1, 8, 8) * 2 - 1
    loss = head.loss(hidden, images, generator=torch.Generator().manual_seed(1))
    loss.backward()
    assert loss.dim() == 0 and head.hidden_proj[0].weight.grad.abs().sum() > 0

    def true_velocity(x, t, cond, masks=None):  # x_t = (1 - t) noise + t images
        t = t[:, None, None, None]
        return images - (x - t * images) / (1 - t)

    monkeypatch.setattr(head, "velocity", true_velocity)
    assert head.loss(hidden, images).item() < 1e-8


def test_euler_sampling_reaches_the_target_of_the_exact_field(monkeypatch):
    head = _head()
    target = torch.rand(2, 1, 8, 8) * 1.8 - 0.9
    monkeypatch.setattr(head, "velocity",
                        lambda x, t, cond, masks=None: (target - x) / (1 - t[:, None, None, None]))
    out = head.sample(torch.randn(2, 7), steps=5, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, target, atol=1e-5, rtol=0)


def test_sampling_is_seeded_guided_and_checks_its_inputs():
    head = _head(mask_channels=1, cond_dropout=0.5).eval()
    hidden, masks = torch.randn(2, 7), torch.zeros(2, 1, 8, 8, dtype=torch.bool)

    def run(**kw):
        return head.sample(hidden, steps=3, masks=masks,
                           generator=torch.Generator().manual_seed(4), **kw)

    a = run()
    assert a.shape == (2, 1, 8, 8) and a.abs().max() <= 1
    assert torch.equal(a, run()) and not torch.equal(a, run(guidance=3.0))
    with pytest.raises(ValueError, match="mask_channels=1: pass masks"):
        head.sample(hidden, steps=1)
    with pytest.raises(ValueError, match=r"images must be \[2, 1, 8, 8\]"):
        head.loss(hidden, torch.zeros(2, 1, 8, 6), masks)


def test_frechet_distance_matches_closed_forms():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 3))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(a, a + [2.0, 0.0, 0.0]) == pytest.approx(4.0, abs=1e-9)
    # 1-D: (mu_a - mu_b)^2 + (sigma_a - sigma_b)^2
    x, y = rng.normal(0, 1, size=(5000, 1)), rng.normal(1, 3, size=(5000, 1))
    want = (x.mean() - y.mean()) ** 2 + (x.std(ddof=1) - y.std(ddof=1)) ** 2
    assert frechet_distance(x, y) == pytest.approx(want, rel=1e-9)
    with pytest.raises(ValueError, match=">= 2 rows"):
        frechet_distance(a[:1], a)


@pytest.fixture(scope="module")
def benchmark():
    from echomoe.data.synthetic.generate import SyntheticConfig, generate

    samples = generate(150, 0, SyntheticConfig(image_size=32))
    segmenter = train_segmenter(samples[:120], image_size=32, steps=250, seed=0)
    return samples[:120], samples[120:], segmenter


@pytest.mark.slow
def test_the_report_reads_generated_images_against_real_and_shuffled(benchmark):
    train, test, segmenter = benchmark
    real, masks = sample_tensors(test, 32)
    report = generation_report(segmenter, real, test, image_size=32, reference=train)
    assert report["generated"] == report["real"]  # the real images are a perfect generator
    assert report["real"]["dice"] > report["shuffled"]["dice"] + 0.05
    noise = torch.rand_like(real) * 2 - 1
    assert generation_report(segmenter, noise, test, image_size=32, reference=train)[
        "generated"]["feature_distance"] > 3 * report["real"]["feature_distance"]


@pytest.mark.slow
def test_a_mask_conditioned_generator_draws_the_requested_lesion(benchmark):
    train, test, segmenter = benchmark
    images, masks = sample_tensors(train, 32)
    torch.manual_seed(0)
    head = FlowMatchingHead(4, 32, width=16, depth=3, cond_dim=32, mask_channels=1)
    opt = torch.optim.AdamW(head.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(250):
        idx = torch.randint(len(images), (16,), generator=g)
        loss = head.loss(torch.zeros(16, 4), images[idx], masks[idx, 1:2], generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    _, requested = sample_tensors(test, 32)
    generated = head.eval().sample(torch.zeros(len(test), 4), steps=10,
                                   masks=requested[:, 1:2], generator=g)
    report = generation_report(segmenter, generated, test, image_size=32, reference=train)
    assert report["generated"]["dice"] > report["shuffled"]["dice"] + 0.05, report


# ----------------------------------------------------------------------------- with a VLM
@pytest.fixture(scope="module")
def tiny_vlm_parts():
    from echomoe.models import build_processor

    return build_processor("tiny", num_samples=30).tokenizer


def _generator(variant: str, mask_channels: int = 1, **kw):
    from echomoe.generation.model import ImageGenerator
    from echomoe.models import build_model

    torch.manual_seed(0)
    vlm = build_model("tiny", variant)
    head = FlowMatchingHead(vlm.config.text_config.hidden_size, 32, width=8, depth=2,
                            cond_dim=16, mask_channels=mask_channels)
    return ImageGenerator(vlm, head, **kw)


def test_the_collator_left_pads_requests_and_carries_the_targets(benchmark, tiny_vlm_parts):
    from echomoe.generation.model import GenerationCollator, request_text

    train, test, _ = benchmark
    cases = test[:3]
    batch = GenerationCollator(tiny_vlm_parts, 32)(cases)
    assert batch["attention_mask"][:, -1].all()  # every row ends with its request
    for row, sample in zip(range(3), cases, strict=True):
        ids = batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()
        assert ids == tiny_vlm_parts(request_text(sample))["input_ids"]
    assert request_text(cases[0]).startswith(f"Generate a {cases[0].region.replace('_', ' ')}")
    assert batch["images"].shape == (3, 1, 32, 32) and batch["masks"].shape == (3, 1, 32, 32)
    assert batch["region_ids"].tolist() == [s.region_id for s in cases]


def test_the_request_conditions_the_head_through_the_language_model(benchmark, tiny_vlm_parts):
    from echomoe.generation.model import GenerationCollator

    train, _, _ = benchmark
    batch = GenerationCollator(tiny_vlm_parts, 32)(train[:4])
    gen = _generator("moe_region_hard")
    hidden = gen.condition(batch["input_ids"], batch["attention_mask"], batch["region_ids"])
    assert hidden.shape == (4, gen.vlm.config.text_config.hidden_size)
    assert not torch.allclose(hidden[0], hidden[1])  # different requests, different states
    out = gen(**batch)
    assert {"gen", "moe_balance"} <= set(out["losses"]) and out["loss"].dim() == 0
    out["loss"].backward()
    assert gen.gen_token.grad.abs().sum() > 0
    assert gen.vlm.get_input_embeddings().weight.grad.abs().sum() > 0
    frozen = _generator("dense", freeze_language_model=True)
    assert not any(p.requires_grad for p in frozen.vlm.parameters())
    with pytest.raises(ValueError, match="conditions on 5-d states"):
        from echomoe.generation.model import ImageGenerator

        ImageGenerator(gen.vlm, FlowMatchingHead(5, 32, width=8, depth=2, cond_dim=16))


@pytest.mark.slow
def test_a_vlm_generator_trains_and_draws_the_requested_lesion(benchmark, tiny_vlm_parts):
    from echomoe.generation.model import GenerationCollator
    from echomoe.train import IndexedBatches
    from echomoe.train import train as run

    train_cases, test, segmenter = benchmark
    collate = GenerationCollator(tiny_vlm_parts, 32)
    gen = _generator("dense")
    gen.head = FlowMatchingHead(gen.vlm.config.text_config.hidden_size, 32, width=16, depth=3,
                                cond_dim=32, mask_channels=1)
    history = run(gen, IndexedBatches(train_cases, collate_fn=collate, batch_size=16),
                  steps=150, lr=2e-3, warmup=10, progress=False)
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    batch = collate(test)
    images = gen.generate(batch["input_ids"], batch["attention_mask"],
                          region_ids=batch["region_ids"], masks=batch["masks"], steps=10,
                          generator=torch.Generator().manual_seed(0))
    report = generation_report(segmenter, images, test, image_size=32, reference=train_cases)
    assert report["generated"]["dice"] > report["shuffled"]["dice"] + 0.03, report
