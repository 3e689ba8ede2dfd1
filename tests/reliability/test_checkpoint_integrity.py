"""A damaged latest checkpoint (truncated weights, truncated training state, garbled meta) is
skipped with a warning naming the file, and training resumes from the previous intact one;
checkpoints are verified when written."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from echomoe.train import checkpoint as ckpt_module
from echomoe.train import train
from echomoe.train.checkpoint import (
    MODEL_FILE,
    STATE_FILE,
    CorruptCheckpointError,
    latest_valid_checkpoint,
    list_checkpoints,
    save_checkpoint,
    verify_checkpoint,
)


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 1)

    def forward(self, x, y):
        return type("Out", (), {"loss": ((self.lin(x) - y) ** 2).mean(), "losses": {}})()


def _batches(epoch):
    g = torch.Generator().manual_seed(epoch)
    return [{"x": torch.randn(4, 3, generator=g), "y": torch.randn(4, 1, generator=g)}
            for _ in range(3)]


def _run(tmp_path, steps, **kw):
    torch.manual_seed(0)
    return train(Toy(), _batches, steps=steps, lr=1e-2, checkpoint_dir=tmp_path,
                 checkpoint_every=2, keep_last=5, progress=False, **kw)


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("damage", [
    lambda p: _truncate(p / MODEL_FILE),
    lambda p: _truncate(p / STATE_FILE),
    lambda p: (p / "meta.json").write_text("{not json"),
], ids=["truncated weights", "truncated state", "garbled meta"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous(tmp_path, damage):
    _run(tmp_path, 8, stop_at=6)
    assert [p.name for p in list_checkpoints(tmp_path)][-2:] == ["step_00000004",
                                                                 "step_00000006"]
    latest = list_checkpoints(tmp_path)[-1]
    damage(latest)
    with pytest.raises(CorruptCheckpointError, match="step_00000006"):
        verify_checkpoint(latest)
    with pytest.warns(UserWarning, match="damaged checkpoint: .*step_00000006"):
        assert latest_valid_checkpoint(tmp_path).name == "step_00000004"
    with pytest.warns(UserWarning, match="step_00000006"):
        history = _run(tmp_path, 8)
    assert history.resumed_from.name == "step_00000004"
    assert [r["step"] for r in history] == [5, 6, 7, 8]


def test_checkpoints_are_verified_before_they_become_visible(tmp_path, monkeypatch):
    def broken_write(tmp, *args):
        real_write(tmp, *args)
        (tmp / "meta.json").write_text(json.dumps({"format": 1, "step": "x"}))

    real_write = ckpt_module._write_files
    monkeypatch.setattr(ckpt_module, "_write_files", broken_write)
    with pytest.raises(CorruptCheckpointError, match="meta.json"):
        save_checkpoint(tmp_path / "step_00000001", Toy(), step=1)
    assert list(tmp_path.iterdir()) == []  # nothing half-written left behind


def test_resuming_with_other_steps_is_refused_clearly(tmp_path):
    _run(tmp_path, 4)
    with pytest.raises(ValueError, match=r"step_00000004 was saved by a run of 4 steps and "
                                         r"this one asks for 10.*Resume with steps=4"):
        _run(tmp_path, 10)
    assert [r["step"] for r in _run(tmp_path, 10, resume=False)][-1] == 10  # a new run is fine


# ----------------------------------------------------------------------------- model loading
def test_loading_a_mismatched_checkpoint_is_an_error_unless_asked(tmp_path):
    from echomoe.models import build_model
    from echomoe.models.modeling import EchoMoEForConditionalGeneration
    from echomoe.train import apply_lora, merge_lora

    model = build_model("tiny", "dense").eval()
    apply_lora(model, target_modules=["q_proj"], r=2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.fill_(0.05)  # trained adapters: outputs differ from the base model
    ids = torch.randint(10, 200, (2, 6))
    with torch.no_grad():
        trained = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "unmerged")
    with pytest.raises(ValueError, match=r"unmerged: the checkpoint does not match the model: "
                                         r"missing keys \(4\).*q_proj.weight.*unexpected keys"):
        EchoMoEForConditionalGeneration.from_pretrained(tmp_path / "unmerged")
    loose = EchoMoEForConditionalGeneration.from_pretrained(tmp_path / "unmerged",
                                                            allow_missing_keys=True)
    assert loose is not None
    # merged, the saved model reloads with its trained attention weights
    merge_lora(model)
    assert not any("lora_" in n for n, _ in model.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, trained, rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path / "merged")
    back = EchoMoEForConditionalGeneration.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, trained, rtol=1e-5, atol=1e-5)


def test_missing_weights_get_the_models_own_initialisation(tmp_path):
    from safetensors.torch import load_file, save_file

    from echomoe.models import build_model
    from echomoe.models.modeling import EchoMoEForConditionalGeneration

    model = build_model("tiny", "dense")
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    dropped = ["box_head.heatmaps.log_scale", "region_classifier.head.weight"]
    dropped = [k for k in dropped if k in weights] or sorted(weights)[:2]
    save_file({k: v for k, v in weights.items() if k not in dropped},
              tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing keys"):
        EchoMoEForConditionalGeneration.from_pretrained(tmp_path)
    loaded = EchoMoEForConditionalGeneration.from_pretrained(tmp_path, allow_missing_keys=True)
    state = loaded.state_dict()
    for key in dropped:
        assert torch.isfinite(state[key]).all(), key
    if "box_head.heatmaps.log_scale" in dropped:  # its own init: a temperature of 10
        torch.testing.assert_close(state["box_head.heatmaps.log_scale"],
                                   torch.tensor([math.log(10.0)]))
    # the weights that were there are the saved ones
    kept = next(k for k in weights if k not in dropped)
    torch.testing.assert_close(state[kept], weights[kept])
