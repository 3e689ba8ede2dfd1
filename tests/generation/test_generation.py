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
