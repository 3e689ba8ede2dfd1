"""Encoder probes: how well image encoders read a label, trained side by side from scratch.

Each encoder gets a mean-pool + linear head (:class:`EncoderClassifier`) and all are trained in
lock step on the same batches (:func:`train_side_by_side`), so their step times are paired
(median of per-step ratios, as every echomoe benchmark reports them) and their accuracies
differ by the encoder alone::

    from echomoe.vision import ConvNet, VisionTransformer
    from echomoe.vision.probe import train_side_by_side, grouped_accuracy, majority_accuracy

    encoders = {"vit": VisionTransformer(image_size=64, patch_size=8, hidden_size=48, depth=2,
                                         num_heads=4),
                "convnet": ConvNet(image_size=64, widths=(16, 32, 48), depths=(1, 1, 2))}
    probes = train_side_by_side(encoders, images, labels, num_classes=K, steps=1000)
    grouped_accuracy(probes["convnet"].model, test_images, test_labels, allowed)

``allowed`` (``(N, K)`` bool) restricts each test image's prediction to its group's labels (for
the synthetic diagnoses: the labels of the sample's region, as the evaluation harness ranks a
diagnosis among its region's options); :func:`majority_accuracy` is the matching prior, the
most common train label of each group.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from echomoe.vision.encoder import ImageEncoder


class EncoderClassifier(nn.Module):
    """``encoder`` -> mean over its tokens -> linear: ``(B, C_in, H, W) -> (B, K)`` logits."""

    def __init__(self, encoder: ImageEncoder, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.hidden_size, num_classes)

    def forward(self, images: Tensor) -> Tensor:
        """``(B, C_in, H, W) -> (B, K)`` class logits."""
        return self.head(self.encoder.forward_features(images).mean(dim=1))


@dataclass
class ProbeRun:
    """One trained probe: the model, its encoder's parameter count and its step times (ms)."""

    model: EncoderClassifier
    parameters: int
    step_ms: list[float] = field(default_factory=list)


def _check(images: Tensor, labels: Tensor, num_classes: int) -> None:
    if images.dim() != 4 or labels.dim() != 1 or len(images) != len(labels):
        raise ValueError(f"need images (N, C, H, W) and labels (N,), got "
                         f"{tuple(images.shape)} and {tuple(labels.shape)}")
    if len(labels) == 0 or labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must be in [0, {num_classes}) and not empty")


def train_side_by_side(
    encoders: Mapping[str, ImageEncoder],
    images: Tensor,
    labels: Tensor,
    *,
    num_classes: int,
    steps: int,
    batch_size: int = 16,
    lr: float = 3e-3,
    warmup: int = 50,
    weight_decay: float = 0.01,
    seed: int = 0,
) -> dict[str, ProbeRun]:
    """Train one :class:`EncoderClassifier` per encoder on the same batches, step by step.

    AdamW, linear warm-up then cosine decay to 0, cross-entropy; batches drawn with
    replacement from ``images (N, C, H, W)`` / ``labels (N,)`` by a generator seeded with
    ``seed``.  Every step runs the encoders in the same order and times each one
    (``ProbeRun.step_ms``).  The models come back in eval mode.
    """
    _check(images, labels, num_classes)
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}")

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    runs, optims, scheds = {}, {}, {}
    for name, encoder in encoders.items():
        model = EncoderClassifier(encoder, num_classes).train()
        runs[name] = ProbeRun(model, sum(p.numel() for p in encoder.parameters()))
        optims[name] = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        scheds[name] = torch.optim.lr_scheduler.LambdaLR(optims[name], factor)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(labels), (batch_size,), generator=generator)
        x, y = images[idx], labels[idx]
        for name, run in runs.items():
            start = time.perf_counter()
            loss = F.cross_entropy(run.model(x), y)
            optims[name].zero_grad(set_to_none=True)
            loss.backward()
            optims[name].step()
            scheds[name].step()
            run.step_ms.append((time.perf_counter() - start) * 1e3)
    for run in runs.values():
        run.model.eval()
    return runs


@torch.no_grad()
def grouped_accuracy(model: nn.Module, images: Tensor, labels: Tensor,
                     allowed: Tensor | None = None, batch_size: int = 64) -> float:
    """Accuracy of ``model``'s argmax on ``images``; with ``allowed (N, K)`` bool, the argmax
    over each image's allowed labels only (its true label must be allowed)."""
    logits = torch.cat([model(images[i:i + batch_size]) for i in range(0, len(images),
                                                                        batch_size)])
    if allowed is not None:
        if allowed.shape != logits.shape or not allowed[torch.arange(len(labels)), labels].all():
            raise ValueError("allowed must be (N, num_classes) and allow every true label")
        logits = logits.masked_fill(~allowed, float("-inf"))
    return (logits.argmax(-1) == labels).float().mean().item()


def majority_accuracy(train_labels: Sequence[Hashable], train_groups: Sequence[Hashable],
                      test_labels: Sequence[Hashable], test_groups: Sequence[Hashable]) -> float:
    """Accuracy of predicting each test item's group's most common train label (ties: the
    label seen first); a group without train items gets the global majority."""
    if len(train_labels) != len(train_groups) or len(test_labels) != len(test_groups):
        raise ValueError("labels and groups must have the same lengths")
    if not train_labels or not test_labels:
        raise ValueError("need at least one train and one test item")
    overall = Counter(train_labels).most_common(1)[0][0]
    by_group: dict[Hashable, Counter] = {}
    for label, group in zip(train_labels, train_groups, strict=True):
        by_group.setdefault(group, Counter())[label] += 1
    guess = {g: c.most_common(1)[0][0] for g, c in by_group.items()}
    hits = sum(guess.get(g, overall) == y for y, g in zip(test_labels, test_groups, strict=True))
    return hits / len(test_labels)
