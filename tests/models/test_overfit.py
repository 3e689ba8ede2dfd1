"""Integration: a tiny region-routed model overfits 8 synthetic cases on the CPU."""

import numpy as np
import pytest
import torch

from echomoe.data.collate import VLMCollator
from echomoe.data.synthetic.generate import SyntheticConfig, generate
from echomoe.data.tasks import build_task
from echomoe.models import build_model, build_processor

BATCH_KEYS = ("input_ids", "attention_mask", "pixel_values", "image_counts", "region_ids",
              "labels", "masks", "has_mask")


def dice(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    inter = (pred & target).sum((1, 2))
    return 2 * inter / (pred.sum((1, 2)) + target.sum((1, 2))).clamp_min(1)


@pytest.mark.slow
def test_tiny_model_overfits_eight_synthetic_cases():
    torch.manual_seed(0)
    processor = build_processor("tiny", num_samples=60)
    model = build_model("tiny", "moe_region_hard", image_size=64)
    cases = generate(60, 0, SyntheticConfig(image_size=64, normal_fraction=0.0))
    cases = [s for s in cases if s.masks["lesion"].sum() >= 60][:8]
    assert len(cases) == 8 and len({s.region for s in cases}) >= 4
    rng = np.random.default_rng(0)
    items = [{"sample": s, "prompt": p, "target": t}
             for s in cases for p, t in build_task("segment", s, rng)[:1]]
    collate = VLMCollator(processor.tokenizer, model.tokens_per_image, model.config.image_size)
    batch = {k: collate(items)[k] for k in BATCH_KEYS}
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(160):
        out = model(**batch)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        out = model(**batch)
    assert out.losses["lm"] < 0.1
    scores = dice(out.pred_masks > 0, batch["masks"] > 0.5)
    assert scores.min() > 0.9, scores
    # region-hard routing kept each case inside its region's experts
    mask = model.language_model.model.layers[0].mlp.moe.router.region_mask
    for info in out.routing.values():
        allowed = mask[info.region_ids]
        ids = info.expert_ids  # -1: padding, which goes to no expert
        chosen = torch.zeros_like(allowed).scatter_(1, ids.clamp_min(0), ids >= 0)
        assert chosen.any(dim=1).sum() == batch["attention_mask"].sum()  # every real token
        assert not (chosen & ~allowed).any()
