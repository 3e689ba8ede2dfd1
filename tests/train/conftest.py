"""Shared fixtures of the training tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def train_kwargs_of(monkeypatch):
    """``train_kwargs_of(cfg) -> dict``: the keyword arguments ``run_experiment(cfg)`` passes to
    ``train``, captured by a stand-in that stops the run there (no training happens)."""
    from echomoe.train import loop
    from echomoe.train.experiment import run_experiment

    class Stop(Exception):
        pass

    seen: dict = {}

    def fake_train(model, batches, **kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setattr(loop, "train", fake_train)

    def capture(cfg) -> dict:
        seen.clear()
        with pytest.raises(Stop):
            run_experiment(cfg, progress=False)
        return dict(seen)

    return capture
