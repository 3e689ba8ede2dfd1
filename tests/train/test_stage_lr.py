"""Per-stage learning-rate multipliers (``Stage.lr_scale`` / ``train.stages[*].lr_scale``): the
rate the loop uses and logs, every parameter group, resume, validation and the config path."""

from __future__ import annotations

import io
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from echomoe.config import ConfigError, load_config
from echomoe.train import (
    Stage,
    StagedSchedule,
    build_optimizer,
    build_scheduler,
    lr_schedule,
    stage_at,
    train,
)

REPO = Path(__file__).resolve().parents[2]
BASE = REPO / "configs" / "experiments" / "base.yaml"
STAGED = REPO / "configs" / "experiments" / "staged.yaml"


class Toy(nn.Module):
    """Linear regression with the echomoe output contract; ``moe.experts`` holds expert
    parameters (their own AdamW groups, see ``is_expert_param``)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(3, 1)
        self.moe = nn.Module()
        self.moe.experts = nn.Linear(3, 1)

    def forward(self, x, y):
        pred = (self.lin(x) + self.moe.experts(x)).squeeze(-1)
        loss = ((pred - y) ** 2).mean()
        return {"loss": loss, "losses": {"mse": loss}}


def toy_batches(epoch: int):
    g = torch.Generator().manual_seed(epoch)
    return [{"x": torch.randn(4, 3, generator=g), "y": torch.randn(4, generator=g)}
            for _ in range(3)]


def expected_lrs(lr: float, stages, *, schedule: str, warmup: int, steps: int) -> list[float]:
    """``lr * schedule(s) * lr_scale`` of the stage in force, for each step's rate."""
    base = lr_schedule(schedule, warmup=warmup, total=steps, min_ratio=0.0)
    return [lr * base(s) * stage_at(stages, s)[1].lr_scale for s in range(steps)]


# ----------------------------------------------------------------------------- the loop
def test_stage_lr_scale_multiplies_the_logged_rate():
    stages = [Stage("low", 3, lr_scale=0.1), Stage("rest", None, lr_scale=1.0)]
    history = train(Toy(), toy_batches, steps=5, lr=2.0, warmup=0, schedule="constant",
                    stages=stages, clip=None, seed=0, progress=False)
    assert [r["lr"] for r in history] == pytest.approx([0.2, 0.2, 0.2, 2.0, 2.0], abs=1e-12)
    assert [r["stage"] for r in history] == ["low"] * 3 + ["rest"] * 2
    # without lr_scale the stages train at the plain schedule, as before
    plain = train(Toy(), toy_batches, steps=5, lr=2.0, warmup=0, schedule="constant",
                  stages=[Stage("a", 3), Stage("b", None)], clip=None, seed=0, progress=False)
    assert [r["lr"] for r in plain] == [2.0] * 5


def test_resume_mid_stage_gives_the_uninterrupted_rates(tmp_path):
    stages = [Stage("a", 2, lr_scale=0.5), Stage("b", 2, lr_scale=0.25),
              Stage("c", None, lr_scale=2.0)]
    kw = {"steps": 6, "lr": 1.0, "warmup": 1, "schedule": "cosine", "min_lr_ratio": 0.0,
          "stages": stages, "clip": None, "seed": 0, "progress": False}
    want = expected_lrs(1.0, stages, schedule="cosine", warmup=1, steps=6)
    full = train(Toy(), toy_batches, **kw)
    assert [r["lr"] for r in full] == pytest.approx(want, abs=1e-12)
    first = train(Toy(), toy_batches, checkpoint_dir=tmp_path, stop_at=3, **kw)  # inside "b"
    second = train(Toy(), toy_batches, checkpoint_dir=tmp_path, **kw)
    assert second.resumed_from.name == "step_00000003"
    assert [r["lr"] for r in first + second] == [r["lr"] for r in full]
    assert [r["stage"] for r in second] == ["b", "c", "c"]
    assert [r["loss"] for r in first + second] == [r["loss"] for r in full]


# ----------------------------------------------------------------------------- the schedule
def test_every_param_group_composes_its_scale_with_the_stage_scale():
    stages = [Stage("warm", 2, lr_scale=0.1), Stage("main", 3, lr_scale=0.5),
              Stage("tail", 1, lr_scale=0.2)]  # the last stage continues past its steps
    opt = build_optimizer(Toy(), lr=2.0, expert_lr_scale=0.3)
    sched = build_scheduler(opt, schedule="linear", warmup=1, total=8, stages=stages)
    base = lr_schedule("linear", warmup=1, total=8)
    group_scale = {g["name"]: g["lr_scale"] for g in opt.param_groups}
    assert set(group_scale) == {"decay", "no_decay", "expert_decay", "expert_no_decay"}
    for step in range(10):
        stage_scale = stage_at(stages, step)[1].lr_scale
        for group in opt.param_groups:
            want = 2.0 * group_scale[group["name"]] * base(step) * stage_scale
            assert group["lr"] == pytest.approx(want, abs=1e-12), (step, group["name"])
        opt.step()
        sched.step()


def test_staged_schedule_from_stages_follows_stage_at():
    stages = [Stage("a", 2, lr_scale=0.5), Stage("b", None, lr_scale=0.25),
              Stage("never", 3, lr_scale=4.0)]  # after an open-ended stage: never in force
    f = StagedSchedule.from_stages(stages, schedule="constant", warmup=0, total=10)
    assert (f.ends, f.scales) == ((2,), (0.5, 0.25))
    assert [f(s) for s in range(12)] == [stage_at(stages, s)[1].lr_scale for s in range(12)]
    closed = StagedSchedule.from_stages([Stage("a", 2, lr_scale=0.5), Stage("b", 3)],
                                        schedule="cosine", warmup=0, total=5)
    assert (closed.ends, closed.scales) == ((2,), (0.5, 1.0))


def test_staged_scheduler_state_reloads_with_weights_only():
    stages = [Stage("a", 3, lr_scale=0.1), Stage("b", None)]
    opt = build_optimizer(Toy(), lr=1.0)
    sched = build_scheduler(opt, schedule="cosine", warmup=1, total=6, min_ratio=0.1,
                            stages=stages)
    for _ in range(4):
        opt.step()
        sched.step()
    state = sched.state_dict()
    assert state["lr_lambdas"][0] == {"schedule": "cosine", "warmup": 1, "total": 6,
                                      "min_ratio": 0.1, "ends": (3,), "scales": (0.1, 1.0)}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    reloaded = torch.load(buffer, weights_only=True)
    fresh_opt = build_optimizer(Toy(), lr=1.0)
    fresh_opt.load_state_dict(opt.state_dict())
    fresh = build_scheduler(fresh_opt, schedule="cosine", warmup=1, total=6, min_ratio=0.1,
                            stages=stages)
    fresh.load_state_dict(reloaded)
    for _ in range(3):
        opt.step()
        sched.step()
        fresh_opt.step()
        fresh.step()
        assert fresh.get_last_lr() == sched.get_last_lr()


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize("scale", [0, 0.0, -0.5, float("nan"), float("inf"), True, "0.1", None])
def test_bad_lr_scale_names_the_stage(scale):
    with pytest.raises(ValueError, match=r"stage 'warm': lr_scale must be a finite number > 0"):
        Stage("warm", 3, lr_scale=scale)


def test_staged_schedule_rejects_inconsistent_fields():
    with pytest.raises(ValueError, match="need one more scale than ends"):
        StagedSchedule("constant", 0, 5, ends=(2,), scales=(1.0,))
    with pytest.raises(ValueError, match="scales must be finite numbers > 0"):
        StagedSchedule("constant", 0, 5, ends=(2,), scales=(1.0, 0.0))
    with pytest.raises(ValueError, match="ends must be increasing positive steps"):
        StagedSchedule("constant", 0, 5, ends=(3, 3), scales=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="schedule must be one of"):
        StagedSchedule("step", 0, 5)


@pytest.mark.parametrize("scale", ["0", "-1"])
def test_bad_lr_scale_in_the_config_names_the_field(scale):
    with pytest.raises(ConfigError,
                       match=r"train\.stages\[1\]: stage 'stage': lr_scale must be a finite"):
        load_config(BASE, ["train.steps=4", "train.warmup=0",
                           f"train.stages=[{{steps: 2}}, {{steps: null, lr_scale: {scale}}}]"])


# ----------------------------------------------------------------------------- config path
def test_run_experiment_passes_stage_lr_scale(tmp_path, train_kwargs_of):
    cfg = load_config(STAGED, [
        "model.variant=moe_topk", "train.steps=300", "train.batch_size=2", "train.device=cpu",
        "data.n=12", "data.synthetic.image_size=32", "model.corpus_samples=12",
        "eval.num_samples=2", "logging.mode=disabled", f"output_dir={tmp_path / 'run'}"])
    seen = train_kwargs_of(cfg)
    stages = seen["stages"]
    assert [(s.name, s.steps, s.lr_scale) for s in stages] == \
        [("projector", 50, 1.0), ("moe_and_heads", 150, 1.0), ("all", None, 0.5)]
    assert all(isinstance(s, Stage) for s in stages)
    assert stages[0].trainable == ("projector.*",)
    assert math.isclose(cfg.train.stages[-1].lr_scale, 0.5)
