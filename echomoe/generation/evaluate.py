"""Scoring generated ultrasound images by code: does a segmenter find what was asked for?

A generated image is judged by a :class:`~echomoe.generation.unet.UNet` lesion / organ
segmenter trained on *real* (synthetic-benchmark) images (:func:`train_segmenter`):

* ``dice``: Dice of the segmenter's lesion mask on the generated image against the requested
  lesion mask (cases that ask for a lesion);
* ``presence``: agreement between "the segmenter finds a lesion" (at least ``min_area``
  pixels) and "a lesion was asked for" (all cases);
* ``feature_distance``: the Fréchet distance between the segmenter's bottleneck features of the
  generated images and of real images (:func:`frechet_distance`; an FID with the segmenter as
  the feature network, comparable only between runs scored with the same segmenter).

:func:`generation_report` scores the generated images beside two reference rows computed the
same way: ``real`` (the real images of the requested cases: what a perfect generator would
score) and ``shuffled`` (real images of *other* cases: a generator that ignores the request
scores about this), so a number is read against its prior.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from echomoe.generation.flow import to_model_range
from echomoe.generation.unet import UNet

MASKS: tuple[str, ...] = ("organ", "lesion")
"""The segmenter's output channels."""


def sample_tensors(samples: Sequence, image_size: int) -> tuple[Tensor, Tensor]:
    """``(images [N, 1, S, S] in [-1, 1], masks [N, 2, S, S] bool)`` of
    :class:`~echomoe.data.schema.UltrasoundSample` objects (first image; ``organ`` and
    ``lesion`` masks, all-false when missing), resized to ``S = image_size``."""
    images, masks = [], []
    for sample in samples:
        image = torch.from_numpy(np.asarray(sample.image_array(0), dtype=np.uint8))
        if image.dim() != 2:
            raise ValueError(f"sample {sample.id!r}: expected a grayscale (H, W) image, got "
                             f"{tuple(image.shape)}")
        pair = [torch.from_numpy(np.asarray(sample.masks[k], dtype=bool)) if k in sample.masks
                else torch.zeros(image.shape, dtype=torch.bool) for k in MASKS]
        images.append(F.interpolate(image[None, None].float(), size=(image_size, image_size),
                                    mode="bilinear", align_corners=False)[0])
        masks.append(F.interpolate(torch.stack(pair)[None].float(),
                                   size=(image_size, image_size), mode="nearest")[0] > 0.5)
    return to_model_range(torch.stack(images)), torch.stack(masks)


def _dice_loss(logits: Tensor, targets: Tensor) -> Tensor:
    probs = logits.sigmoid()
    inter = (probs * targets).sum(dim=(-2, -1))
    return (1 - (2 * inter + 1) / (probs.sum(dim=(-2, -1)) + targets.sum(dim=(-2, -1)) + 1)).mean()


def train_segmenter(samples: Sequence, *, image_size: int, steps: int = 300,
                    batch_size: int = 16, lr: float = 3e-3, width: int = 16, depth: int = 3,
                    seed: int = 0) -> UNet:
    """A :class:`UNet` (1 -> 2 channels: :data:`MASKS`) trained with BCE + Dice on the real
    images and masks of ``samples`` for ``steps`` AdamW steps; returned in eval mode."""
    images, masks = sample_tensors(samples, image_size)
    targets = masks.float()
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = UNet(1, len(MASKS), width=width, depth=depth)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    net.train()
    for _ in range(steps):
        idx = torch.randint(len(images), (min(batch_size, len(images)),), generator=g)
        x, y = images[idx], targets[idx]
        flip = torch.rand(len(idx), generator=g) < 0.5  # left-right flips: anatomy allows them
        x, y = torch.where(flip[:, None, None, None], x.flip(-1), x), \
            torch.where(flip[:, None, None, None], y.flip(-1), y)
        logits = net(x)
        loss = F.binary_cross_entropy_with_logits(logits, y) + _dice_loss(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return net.eval()


@torch.no_grad()
def segment(segmenter: UNet, images: Tensor, batch_size: int = 64) -> Tensor:
    """Predicted masks ``[N, 2, S, S]`` bool (:data:`MASKS`) of ``images [N, 1, S, S]`` in
    ``[-1, 1]``."""
    out = [segmenter(images[i:i + batch_size]) > 0 for i in range(0, len(images), batch_size)]
    return torch.cat(out)


@torch.no_grad()
def features(segmenter: UNet, images: Tensor, batch_size: int = 64) -> np.ndarray:
    """The segmenter's bottleneck features ``[N, F]`` (float64) of ``images``."""
    out = [segmenter.features(images[i:i + batch_size]) for i in range(0, len(images),
                                                                       batch_size)]
    return torch.cat(out).double().numpy()


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))`` between the Gaussians fitted to
    feature rows ``a [N, F]`` and ``b [M, F]`` (each needs at least 2 rows).  The matrix square
    root's trace is ``sum sqrt(eig(S_a^(1/2) S_b S_a^(1/2)))`` (symmetric, so exact)."""
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"frechet_distance needs >= 2 rows on each side, got {len(a)} and "
                         f"{len(b)}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a = np.atleast_2d(np.cov(a, rowvar=False))
    cov_b = np.atleast_2d(np.cov(b, rowvar=False))
    w, v = np.linalg.eigh(cov_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    trace = np.trace(cov_a) + np.trace(cov_b) - 2 * np.sqrt(np.clip(cross, 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + max(trace, 0.0))


def generation_scores(segmenter: UNet, images: Tensor, requested: Tensor, reference: Tensor,
                      *, min_area: int = 4) -> dict[str, float]:
    """Scores of ``images [N, 1, S, S]`` (in ``[-1, 1]``) generated for the requested lesion
    masks ``requested [N, S, S]`` (all-false: no lesion asked for), with ``reference`` real
    images ``[M, 1, S, S]`` for the feature distance (see the module docstring)."""
    if images.shape[0] != requested.shape[0] or images.shape[-2:] != requested.shape[-2:]:
        raise ValueError(f"images {tuple(images.shape)} and requested masks "
                         f"{tuple(requested.shape)} do not match")
    lesion = segment(segmenter, images)[:, MASKS.index("lesion")]
    asked = requested.flatten(1).any(dim=1)
    found = lesion.flatten(1).sum(dim=1) >= min_area
    inter = (lesion & requested).flatten(1).sum(dim=1).double()
    total = (lesion.flatten(1).sum(dim=1) + requested.flatten(1).sum(dim=1)).double()
    dice = 2 * inter / total.clamp_min(1)
    return {
        "dice": float(dice[asked].mean()) if asked.any() else float("nan"),
        "presence": float((found == asked).double().mean()),
        "feature_distance": frechet_distance(features(segmenter, images),
                                             features(segmenter, reference)),
    }


def generation_report(segmenter: UNet, generated: Tensor, cases: Sequence, *, image_size: int,
                      reference: Sequence, seed: int = 0) -> dict[str, dict[str, float]]:
    """``{"generated", "real", "shuffled"}`` scores (:func:`generation_scores`) of images
    ``generated`` for ``cases`` (the requested samples: their lesion masks are the request),
    of the cases' own real images, and of real images of other cases (a fixed derangement
    drawn with ``seed``); ``reference`` samples give the real feature statistics."""
    real, masks = sample_tensors(cases, image_size)
    requested = masks[:, MASKS.index("lesion")]
    ref_images, _ = sample_tensors(reference, image_size)
    n = len(cases)
    order = np.random.default_rng(seed).permutation(n)
    shuffled = np.roll(order, 1)[np.argsort(order)] if n > 1 else order  # no case keeps its own
    return {"generated": generation_scores(segmenter, generated, requested, ref_images),
            "real": generation_scores(segmenter, real, requested, ref_images),
            "shuffled": generation_scores(segmenter, real[torch.as_tensor(shuffled)], requested,
                                          ref_images)}
