"""Each value rule is written once: a YAML field and the ``train()`` argument it feeds are
refused by the same rule, in the same words; old field names still load."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from echomoe.config import ConfigError, Stage, load_config, rules
from echomoe.data.tasks import TaskSampler
from echomoe.train import train

BASE = Path(__file__).resolve().parents[1] / "configs" / "experiments" / "base.yaml"


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 1)

    def forward(self, x, y):
        loss = (self.lin(x).squeeze(-1) - y).pow(2).mean()
        return {"loss": loss, "losses": {"mse": loss}}


def toy_batches(epoch: int):
    g = torch.Generator().manual_seed(epoch)
    return [{"x": torch.randn(4, 3, generator=g), "y": torch.randn(4, generator=g)}]


def _config_error(override: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(BASE, ["train.steps=10", "train.warmup=0", override])
    return str(info.value)


def _train_error(**kwargs) -> str:
    kwargs = {"steps": 10, "progress": False, **kwargs}
    with pytest.raises(ValueError) as info:
        train(Toy(), toy_batches, **kwargs)
    return str(info.value)


@pytest.mark.parametrize("field, value, argument", [
    ("betas", "[0.9, 1.0]", [0.9, 1.0]),
    ("eps", "0", 0.0),
    ("lr", "-1.0", -1.0),
    ("warmup", "11", 11),
    ("schedule", "step", "step"),
    ("precision", "fp16", "fp16"),
    ("mode", "best", "best"),
    ("grad_accum", "0", 0),
    ("keep_last", "0", 0),
])
def test_a_field_and_its_argument_share_the_rule(field, value, argument):
    from_config = _config_error(f"train.{field}={value}")
    from_train = _train_error(**{field: argument})
    assert from_train.startswith(f"{field} "), from_train
    message = from_config.split("overrides): ", 1)[1]  # after the file name
    assert message.startswith(f"train.{field} ")
    assert message.replace("train.", "") == from_train


def test_stages_are_one_class_for_yaml_and_train():
    cfg = load_config(BASE, ["train.steps=6", "train.warmup=0",
                             "train.stages=[{name: a, steps: 2, trainable: ['lin.*']},"
                             " {name: b, lr_scale: 0.5}]"])
    first, second = cfg.train.stages
    assert isinstance(first, Stage) and first == Stage("a", 2, ("lin.*",))
    assert second == Stage("b", None, ("*",), 0.5)
    from echomoe.train import Stage as TrainStage

    assert TrainStage is Stage
    with pytest.raises(ValueError, match=r"stage 'w': lr_scale must be a finite number > 0"):
        Stage("w", 2, lr_scale=0)
    message = _config_error("train.stages=[{name: w, steps: 10, lr_scale: 0}]")
    assert message.endswith("train.stages[0]: stage 'w': lr_scale must be a finite number > 0, "
                            "got 0.0")


def test_stage_plan_is_checked_for_the_config():
    assert "train.stages steps sum to 3, but train.steps is 10" in _config_error(
        "train.stages=[{steps: 3}]")
    assert "train.stages[0].steps may be null only in the last stage" in _config_error(
        "train.stages=[{steps: null}, {steps: 3}]")
    rules.check_stage_plan([4, None], "stages", 10)  # the last stage gets the other 6


def test_task_rates_share_their_rule():
    with pytest.raises(ValueError, match=r"^rates\.vqa rate must be a finite number >= 0"):
        TaskSampler({"vqa": -1.0, "report": 1.0})
    with pytest.raises(ConfigError, match=r"tasks\.vqa rate must be a finite number >= 0"):
        load_config(BASE, ["tasks.vqa=-1"])


@pytest.mark.parametrize("old, new, value", [
    ("warmup_steps", "warmup", 3), ("keep_checkpoints", "keep_last", 5),
    ("best_metric", "metric", "eval/report/bleu1"), ("best_mode", "mode", "max"),
    ("lora.modules_to_save", "lora.trainable", ["mlp"]),
])
def test_old_field_names_still_load_with_a_warning(tmp_path, old, new, value):
    path = tmp_path / "old.yaml"
    def nested(key: str) -> str:  # "lora.trainable" -> "lora:\n    trainable: ..."
        *parents, last = key.split(".")
        lines = [f"{'  ' * (i + 1)}{p}:" for i, p in enumerate(parents)]
        return "\n".join([*lines, f"{'  ' * (len(parents) + 1)}{last}: {value}"])

    def read(cfg):
        obj = cfg.train
        for part in new.split("."):
            obj = getattr(obj, part)
        return obj

    path.write_text(f"base: {BASE}\ntrain:\n{nested(old)}\n")
    with pytest.warns(FutureWarning, match=re.escape(f"train.{old} is now called train.{new}")):
        assert read(load_config(path)) == value
    with pytest.warns(FutureWarning):
        assert read(load_config(BASE, [f"train.{old}={value}"])) == value
    both = {**{old: value}, **{new: value}}
    text = "\n".join(nested(k) for k in both) if "." not in old else (
        f"  lora:\n    {old.split('.')[1]}: {value}\n    {new.split('.')[1]}: {value}")
    path.write_text(f"base: {BASE}\ntrain:\n{text}\n")
    with pytest.raises(ConfigError, match=f"train.{old} and train.{new} are both set"):
        load_config(path)


def test_the_new_names_load_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        cfg = load_config(BASE, ["train.warmup=4", "train.keep_last=1"])
    assert (cfg.train.warmup, cfg.train.keep_last) == (4, 1)
