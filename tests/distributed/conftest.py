"""Session fixtures: the batches, the initial checkpoints and the one-process reference."""

from __future__ import annotations

import pytest
import torch
from _launch import STEPS, TRAIN_KW, ListBatches, make_batches


@pytest.fixture(scope="session")
def setup_dir(tmp_path_factory):
    """``batches.pt``, ``init_ep`` (moe_topk, backend expert_parallel), ``init`` (moe_topk,
    grouped_mm) with identical weights, and the one-process reference (``grad_accum = 2``)."""
    from echomoe.models import build_model
    from echomoe.train import train

    root = tmp_path_factory.mktemp("dist")
    batches = make_batches()
    torch.save(batches, root / "batches.pt")
    torch.manual_seed(0)
    model = build_model("tiny", "moe_topk", moe_config={"backend": "expert_parallel"})
    model.save_pretrained(root / "init_ep")
    plain = build_model("tiny", "moe_topk")
    plain.load_state_dict(model.state_dict())
    plain.save_pretrained(root / "init")
    history = train(plain, ListBatches(batches), grad_accum=2, **TRAIN_KW)
    assert len(history) == STEPS
    torch.save({"losses": [r["loss"] for r in history],
                "grad_norms": [r["grad_norm"] for r in history],
                "state": {k: v.clone() for k, v in plain.state_dict().items()}},
               root / "reference.pt")
    return root
