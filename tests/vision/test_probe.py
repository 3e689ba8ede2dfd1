"""echomoe.vision.probe: side-by-side encoder probes, grouped accuracy and the majority prior."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from echomoe.vision import ConvNet, VisionTransformer
from echomoe.vision.probe import (
    EncoderClassifier,
    grouped_accuracy,
    majority_accuracy,
    train_side_by_side,
)


class Fixed(nn.Module):
    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits[: len(images)]


def test_majority_accuracy_by_hand():
    train_y = ["a", "a", "b", "c", "c", "c", "b"]
    train_g = ["x", "x", "x", "y", "y", "y", "x"]  # x: a a b b -> a (seen first); y: c
    test_y = ["a", "b", "c", "c", "c"]
    test_g = ["x", "x", "y", "z", "y"]             # z unseen: global majority c
    assert majority_accuracy(train_y, train_g, test_y, test_g) == pytest.approx(4 / 5)
    with pytest.raises(ValueError, match="same lengths"):
        majority_accuracy(train_y, train_g[:-1], test_y, test_g)
    with pytest.raises(ValueError, match="at least one"):
        majority_accuracy([], [], test_y, test_g)


def test_grouped_accuracy_masks_other_groups():
    logits = torch.tensor([[5.0, 1.0, 0.0], [5.0, 1.0, 0.0], [0.0, 2.0, 3.0]])
    labels = torch.tensor([0, 1, 1])
    model = Fixed(logits)
    images = torch.zeros(3, 1, 8, 8)
    assert grouped_accuracy(model, images, labels) == pytest.approx(1 / 3)
    allowed = torch.tensor([[True, True, False], [False, True, True], [False, True, False]])
    assert grouped_accuracy(model, images, labels, allowed) == pytest.approx(1.0)
    assert grouped_accuracy(model, images, labels, allowed, batch_size=2) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="allow every true label"):
        grouped_accuracy(model, images, labels, ~allowed)


def test_side_by_side_probes_learn_the_same_batches():
    """Bright vs dark squares in a noisy image: both encoders learn it; each ran every step."""
    torch.manual_seed(0)
    n, size = 48, 32
    labels = torch.arange(n) % 2
    images = torch.rand(n, 1, size, size) * 0.3
    images[labels == 1, :, 8:20, 8:20] += 0.7
    encoders = {"convnet": ConvNet(image_size=size, widths=(8, 12, 16), depths=(0, 1, 1),
                                   kernel_size=3),
                "vit": VisionTransformer(image_size=size, patch_size=8, hidden_size=16,
                                         depth=1, num_heads=2)}
    runs = train_side_by_side(encoders, images, labels, num_classes=2, steps=60, batch_size=8,
                              lr=3e-3, warmup=5)
    assert list(runs) == ["convnet", "vit"]
    for name, run in runs.items():
        assert isinstance(run.model, EncoderClassifier) and not run.model.training
        assert run.model.encoder is encoders[name]
        assert run.parameters == sum(p.numel() for p in encoders[name].parameters())
        assert len(run.step_ms) == 60 and min(run.step_ms) > 0
        assert grouped_accuracy(run.model, images, labels) >= 0.95


def test_side_by_side_refuses_bad_input():
    enc = {"c": ConvNet(image_size=16, widths=(8, 8), depths=(0, 1))}
    images, labels = torch.rand(4, 1, 16, 16), torch.tensor([0, 1, 0, 1])
    with pytest.raises(ValueError, match="labels must be in"):
        train_side_by_side(enc, images, labels + 1, num_classes=2, steps=1)
    with pytest.raises(ValueError, match=r"need images .* got \(4, 16, 16\)"):
        train_side_by_side(enc, images[:, 0], labels, num_classes=2, steps=1)
    with pytest.raises(ValueError, match="steps and batch_size"):
        train_side_by_side(enc, images, labels, num_classes=2, steps=0)
