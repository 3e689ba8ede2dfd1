"""Learning-rate schedules, AdamW betas / eps and the training precision, from ``train()``
arguments and from the experiment config."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from echomoe.config import ConfigError, load_config
from echomoe.train import (
    WarmupConstant,
    WarmupCosine,
    WarmupLinear,
    build_optimizer,
    build_scheduler,
    lr_schedule,
    train,
)
from echomoe.train import loop as loop_module
from echomoe.train import optim as optim_module
from echomoe.train.deepspeed import deepspeed_precision
from echomoe.train.precision import resolve_precision

REPO = Path(__file__).resolve().parents[2]
BASE = REPO / "configs" / "experiments" / "base.yaml"
RATES = {"report": 1.0, "vqa": 1.0, "segment": 1.0, "detect": 1.0, "measure": 1.0}


class Toy(nn.Module):
    """Linear regression with the echomoe output contract (``loss`` + ``losses``)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(3, 1)

    def forward(self, x, y):
        loss = ((self.lin(x).squeeze(-1) - y) ** 2).mean()
        return {"loss": loss, "losses": {"mse": loss}}


def toy_batches(epoch: int):
    g = torch.Generator().manual_seed(epoch)
    return [{"x": torch.randn(4, 3, generator=g), "y": torch.randn(4, generator=g)}
            for _ in range(3)]


# ----------------------------------------------------------------------------- schedules
def test_schedule_values_at_known_steps():
    kw = {"warmup": 10, "total": 110, "min_ratio": 0.1}
    warm = [0.0, 0.5, 1.0]  # steps 0, 5, 10: linear warmup from 0 in every schedule
    cosine, linear, constant = (lr_schedule(k, **kw) for k in ("cosine", "linear", "constant"))
    assert isinstance(cosine, WarmupCosine) and isinstance(linear, WarmupLinear)
    assert isinstance(constant, WarmupConstant)
    for f in (cosine, linear, constant):
        assert [f(s) for s in (0, 5, 10)] == warm
    # progress p = (s - 10) / 100 at s = 35, 60, 110 and past the end
    assert [cosine(s) for s in (35, 60, 110, 500)] == pytest.approx(
        [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)), 0.55, 0.1, 0.1])
    assert [linear(s) for s in (35, 60, 110, 500)] == pytest.approx([0.775, 0.55, 0.1, 0.1])
    assert [constant(s) for s in (35, 60, 110, 500)] == [1.0, 1.0, 1.0, 1.0]
    assert lr_schedule("linear", warmup=0, total=4)(0) == 1.0
    with pytest.raises(ValueError, match="schedule must be one of cosine, linear, constant"):
        lr_schedule("step", warmup=0, total=4)
    with pytest.raises(ValueError, match="min_ratio must be a number in"):
        lr_schedule("linear", warmup=0, total=4, min_ratio=1.5)


@pytest.mark.parametrize("schedule, want", [
    ("cosine", [0.0, 2.0, 2.0 * (0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi / 4))), 1.2,
                2.0 * (0.2 + 0.8 * 0.5 * (1 + math.cos(3 * math.pi / 4)))]),
    ("linear", [0.0, 2.0, 1.6, 1.2, 0.8]),
    ("constant", [0.0, 2.0, 2.0, 2.0, 2.0]),
])
def test_train_follows_the_schedule_and_resumes_it(schedule, want, tmp_path):
    # warmup 1, 5 steps: step s (1-based) uses f(s - 1); p = (s - 2) / 4 after the warmup
    kw = {"steps": 5, "lr": 2.0, "warmup": 1, "min_lr_ratio": 0.2, "schedule": schedule,
          "seed": 0, "progress": False, "clip": None}
    full = train(Toy(), toy_batches, **kw)
    assert [r["lr"] for r in full] == pytest.approx(want, abs=1e-12)
    first = train(Toy(), toy_batches, checkpoint_dir=tmp_path, stop_at=3, **kw)
    second = train(Toy(), toy_batches, checkpoint_dir=tmp_path, **kw)
    assert [r["lr"] for r in first + second] == pytest.approx(want, abs=1e-12)
    assert [r["loss"] for r in first + second] == [r["loss"] for r in full]


def test_scheduler_state_holds_numbers_only():
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, schedule="linear", warmup=1, total=3, min_ratio=0.5)
    state = sched.state_dict()["lr_lambdas"][0]
    assert state == {"warmup": 1, "total": 3, "min_ratio": 0.5}


# ----------------------------------------------------------------------------- AdamW
def test_betas_and_eps_reach_every_param_group(monkeypatch):
    opt = build_optimizer(Toy(), lr=1e-3, betas=[0.8, 0.95], eps=1e-6)
    assert {(g["betas"], g["eps"]) for g in opt.param_groups} == {((0.8, 0.95), 1e-6)}
    built = []
    real = optim_module.build_optimizer

    def spy(*args, **kwargs):
        built.append(real(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(loop_module, "build_optimizer", spy)
    train(Toy(), toy_batches, steps=1, lr=1e-3, betas=(0.7, 0.9), eps=1e-5, progress=False)
    assert len(built[0].param_groups) == 2  # decay, no_decay
    assert all(g["betas"] == (0.7, 0.9) and g["eps"] == 1e-5 for g in built[0].param_groups)
    state = built[0].state[next(iter(built[0].state))]
    assert int(state["step"]) == 1  # the optimiser that got those settings did the step


@pytest.mark.parametrize("kwargs, pattern", [
    ({"schedule": "step"}, r"schedule must be one of cosine, linear, constant, got 'step'"),
    ({"betas": (0.9,)}, r"betas must be two numbers in \[0, 1\), got \(0\.9,\)"),
    ({"betas": (0.9, 1.0)}, r"betas must be two numbers in \[0, 1\)"),
    ({"betas": "0.9"}, r"betas must be two numbers"),
    ({"eps": 0.0}, r"eps must be a finite number > 0, got 0\.0"),
    ({"eps": float("nan")}, r"eps must be a finite number > 0"),
    ({"precision": "fp16"}, r"precision must be one of auto, fp32, bf16, got 'fp16'"),
])
def test_bad_train_arguments_name_the_field(kwargs, pattern):
    model = Toy()
    before = model.lin.weight.detach().clone()
    with pytest.raises(ValueError, match=pattern):
        train(model, toy_batches, steps=1, progress=False, **kwargs)
    assert torch.equal(model.lin.weight, before)


@pytest.mark.parametrize("overrides, pattern", [
    (["train.schedule=exp"], r"train\.schedule must be one of cosine, linear, constant, got 'exp'"),
    (["train.precision=fp16"], r"train\.precision must be one of auto, fp32, bf16, got 'fp16'"),
    (["train.betas=[0.9]"], r"train\.betas must be two numbers in \[0, 1\)"),
    (["train.betas=[0.9, 1.5]"], r"train\.betas must be two numbers in \[0, 1\)"),
    (["train.eps=0"], r"train\.eps must be a finite number > 0"),
])
def test_bad_config_values_name_the_field(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(BASE, overrides)


def test_run_experiment_passes_schedule_betas_eps_precision(tmp_path, train_kwargs_of):
    cfg = load_config(BASE, [
        "train.schedule=linear", "train.betas=[0.8, 0.95]", "train.eps=1.0e-6",
        "train.precision=bf16", "train.steps=2", "train.warmup=1", "train.batch_size=2",
        "train.device=cpu", "data.n=12", "data.synthetic.image_size=32", "model.corpus_samples=12",
        "eval.num_samples=2", "logging.mode=disabled", f"output_dir={tmp_path / 'run'}"])
    seen = train_kwargs_of(cfg)
    assert (seen["schedule"], seen["betas"], seen["eps"], seen["precision"]) == \
        ("linear", (0.8, 0.95), 1e-6, "bf16")
    assert (seen["warmup"], seen["min_lr_ratio"]) == (1, 0.1)


# ----------------------------------------------------------------------------- precision
@pytest.fixture(scope="module")
def tiny_batches():
    from echomoe.data.collate import VLMCollator
    from echomoe.data.synthetic.generate import SyntheticConfig, generate
    from echomoe.models import build_model, build_processor
    from echomoe.train import MultiTaskBatches

    processor = build_processor("tiny", num_samples=12)
    samples = generate(8, 0, SyntheticConfig(image_size=32))
    probe = build_model("tiny", "dense")
    collator = VLMCollator(processor.tokenizer, probe.tokens_per_image, probe.config.image_size)
    return MultiTaskBatches(samples, collator=collator, rates=RATES, batch_size=2, seed=0)


def _train_recording_dtypes(batches, precision: str):
    from echomoe.models import build_model

    torch.manual_seed(0)
    model = build_model("tiny", "moe_topk")
    dtypes = {"q_proj": [], "projector": []}

    def hook(name):
        def record(module, args, output):
            if module.training:
                dtypes[name].append(output.dtype)
        return record

    q_proj = model.language_model.model.layers[0].self_attn.q_proj
    handles = [q_proj.register_forward_hook(hook("q_proj")),
               model.projector.register_forward_hook(hook("projector"))]
    history = train(model, batches, steps=2, lr=1e-3, warmup=0, precision=precision,
                    seed=0, progress=False)
    for handle in handles:
        handle.remove()
    return model, history, dtypes


def test_bf16_autocasts_the_forward_and_keeps_fp32_weights(tiny_batches):
    model, bf16, dtypes = _train_recording_dtypes(tiny_batches, "bf16")
    assert dtypes["q_proj"] == [torch.bfloat16] * 2 and dtypes["projector"] == [torch.bfloat16] * 2
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in bf16)
    _, fp32, dtypes = _train_recording_dtypes(tiny_batches, "fp32")
    assert dtypes["q_proj"] == [torch.float32] * 2 and dtypes["projector"] == [torch.float32] * 2
    # same data and init: bf16 rounding moves the loss a little, not a lot
    assert bf16[0]["loss"] != fp32[0]["loss"]
    assert abs(bf16[0]["loss"] - fp32[0]["loss"]) < 0.02 * fp32[0]["loss"]
    # auto on CPU is fp32, bit for bit
    _, auto, dtypes = _train_recording_dtypes(tiny_batches, "auto")
    assert dtypes["q_proj"] == [torch.float32] * 2
    assert [r["loss"] for r in auto] == [r["loss"] for r in fp32]


def test_resolve_precision_and_deepspeed_rule():
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("auto", torch.device("cuda", 0)) == "bf16"
    assert resolve_precision("bf16", "cpu") == "bf16"
    assert resolve_precision("fp32", "cuda") == "fp32"
    # DeepSpeed: "auto" in the config follows precision; the config governs otherwise
    cfg = {"bf16": {"enabled": "auto"}}
    assert deepspeed_precision(cfg, "bf16", "cpu") == "bf16" and cfg["bf16"]["enabled"] is True
    cfg = {"bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"}}
    assert deepspeed_precision(cfg, "auto", "cpu") == "fp32"
    assert cfg == {"bf16": {"enabled": False}, "fp16": {"enabled": False}}
    assert deepspeed_precision({"bf16": {"enabled": True}}, "auto", "cpu") == "bf16"
    assert deepspeed_precision({"bf16": {"enabled": False}}, "fp32", "cpu") == "fp32"
    assert deepspeed_precision({}, "auto", "cuda") == "fp32"
    with pytest.raises(ValueError, match=r"precision='bf16' conflicts with the DeepSpeed config, "
                                         r"which trains in fp32 \(bf16\.enabled=False"):
        deepspeed_precision({"bf16": {"enabled": False}}, "bf16", "cpu")
    with pytest.raises(ValueError, match=r"precision='fp32' conflicts.*trains in bf16"):
        deepspeed_precision({"bf16": {"enabled": True}}, "fp32", "cpu")
    with pytest.raises(ValueError, match=r"precision='bf16' conflicts.*trains in fp16"):
        deepspeed_precision({"fp16": {"enabled": True}}, "bf16", "cpu")


def test_experiment_deepspeed_config_fills_bf16_auto_from_precision(tmp_path):
    from echomoe.config import deepspeed_config

    ds = tmp_path / "ds.json"
    ds.write_text('{"train_micro_batch_size_per_gpu": "auto", "bf16": {"enabled": "auto"}}')
    filled = {p: deepspeed_config(load_config(BASE, [f"deepspeed={ds}", f"train.precision={p}"]))
              for p in ("auto", "fp32", "bf16")}
    assert [filled[p]["bf16"]["enabled"] for p in ("auto", "fp32", "bf16")] == \
        ["auto", False, True]  # "auto": the strategy decides on the device (CUDA only)
