"""The training recipe: determinism, resume, SIGTERM, atomic checkpoints, guards, optimiser."""

from __future__ import annotations

import math
import os
import pickle
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from echomoe.data.collate import VLMCollator
from echomoe.data.synthetic.generate import SyntheticConfig, generate
from echomoe.models import build_model, build_processor
from echomoe.train import (
    MultiTaskBatches,
    NonFiniteLossError,
    Stage,
    WarmupCosine,
    apply_stage,
    build_optimizer,
    echovlm_stages,
    freeze,
    is_expert_param,
    latest_checkpoint,
    load_checkpoint,
    make_loss_eval,
    param_groups,
    save_checkpoint,
    stage_at,
    train,
    unfreeze,
    warmup_cosine_scheduler,
)
from echomoe.train import checkpoint as ckpt_module
from echomoe.train.checkpoint import read_meta, remove_stale_tmp

RATES = {"report": 1.0, "vqa": 1.0, "segment": 1.0, "detect": 1.0, "measure": 1.0}
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data():
    """Tokenizer, 16 synthetic cases at 32 px and a collator for the ``tiny`` preset."""
    processor = build_processor("tiny", num_samples=16)
    samples = generate(16, 0, SyntheticConfig(image_size=32))
    probe = build_model("tiny", "dense")
    collator = VLMCollator(processor.tokenizer, probe.tokens_per_image, probe.config.image_size)
    return {"samples": samples, "collator": collator}


def make_batches(data, *, batch_size: int = 2, seed: int = 0) -> MultiTaskBatches:
    return MultiTaskBatches(data["samples"], collator=data["collator"], rates=RATES,
                            batch_size=batch_size, seed=seed)


def fresh_model(variant: str = "moe_region_soft", init_seed: int = 0) -> nn.Module:
    torch.manual_seed(init_seed)
    return build_model("tiny", variant)


def losses_of(history) -> list[float]:
    return [r["loss"] for r in history]


# ----------------------------------------------------------------------------- recipe
def test_recipe_smoke_is_deterministic_and_eval_has_no_side_effects(data, tmp_path):
    common = {"steps": 4, "lr": 3e-3, "warmup": 1, "seed": 0, "progress": False}
    first = train(fresh_model(), make_batches(data), **common)
    stored = losses_of(first)
    assert len(stored) == 4 and all(math.isfinite(v) for v in stored)
    record = first[-1]
    assert set(record) >= {"step", "loss", "losses", "lr", "grad_norm", "epoch"}
    assert {"lm", "moe_balance", "moe_region"} <= set(record["losses"])
    assert [r["lr"] for r in first][:2] == [0.0, 3e-3]  # warmup 1: f(0) = 0, then the peak

    # Same seed, with evaluation, best-checkpoint selection and checkpoints: identical losses.
    eval_batches = [make_batches(data, seed=99).batch(0, 0)]
    logged = []
    second = train(fresh_model(), make_batches(data), **common, checkpoint_dir=tmp_path,
                   checkpoint_every=2, eval_fn=make_loss_eval(eval_batches), eval_every=2,
                   metric="loss", mode="min", log_fn=lambda step, rec: logged.append(step))
    assert losses_of(second) == stored
    assert logged == [1, 2, 3, 4]
    assert "eval" in second[1] and "loss/lm" in second[1]["eval"]
    assert second.best is not None and second.best["metric"] == "loss"
    assert read_meta(tmp_path / "best")["step"] == second.best["step"]
    assert latest_checkpoint(tmp_path).name == "step_00000004"


def test_resume_reproduces_the_uninterrupted_loss_curve(data, tmp_path):
    stages = [Stage(name="heads", steps=2, trainable=("projector.*", "box_head.*")),
              Stage(name="more", steps=4, trainable=("projector.*", "language_model.*")),
              Stage(name="all", steps=None)]
    # 8 steps x grad_accum 2 x batch 2 = 32 items = 2 epochs of 16; resume lands at an epoch
    # boundary and in the middle of the second stage.
    common = {"steps": 8, "lr": 3e-3, "warmup": 2, "grad_accum": 2, "seed": 0,
              "stages": stages, "progress": False}
    full = losses_of(train(fresh_model(), make_batches(data), **common))

    part = train(fresh_model(), make_batches(data), **common, checkpoint_dir=tmp_path,
                 stop_at=4)
    assert losses_of(part) == full[:4]
    assert latest_checkpoint(tmp_path).name == "step_00000004"

    # "New process": different init, scrambled RNG, new batch source objects.
    torch.manual_seed(1234)
    random.seed(5)
    np.random.seed(6)
    rest = train(fresh_model(init_seed=7), make_batches(data), **common,
                 checkpoint_dir=tmp_path)
    assert rest.resumed_from.name == "step_00000004"
    assert [r["step"] for r in rest] == [5, 6, 7, 8]
    assert [r["stage"] for r in rest] == ["more", "more", "all", "all"]
    np.testing.assert_allclose(losses_of(rest), full[4:], rtol=0, atol=1e-6)


SIGTERM_SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path
    import torch
    from echomoe.data.collate import VLMCollator
    from echomoe.data.synthetic.generate import SyntheticConfig, generate
    from echomoe.models import build_model, build_processor
    from echomoe.train import MultiTaskBatches, train

    out = Path(sys.argv[1])
    processor = build_processor("tiny", num_samples=16)
    torch.manual_seed(0)
    model = build_model("tiny", "dense")
    collator = VLMCollator(processor.tokenizer, model.tokens_per_image, 32)
    batches = MultiTaskBatches(generate(8, 0, SyntheticConfig(image_size=32)),
                               collator=collator, rates={"report": 1}, batch_size=2)
    def log(step, record):
        (out / "progress").write_text(str(step))
    history = train(model, batches, steps=500, lr=1e-3, checkpoint_dir=out / "ckpt",
                    log_fn=log, progress=False)
    print("interrupted", history.interrupted, "steps", len(history))
""")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_sigterm_saves_a_checkpoint_then_exits_cleanly(tmp_path, sig):
    script = tmp_path / "run.py"
    script.write_text(SIGTERM_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 90
    while not (tmp_path / "progress").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "training did not reach step 1"
        time.sleep(0.1)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert "interrupted True" in stdout
    latest = latest_checkpoint(tmp_path / "ckpt")
    assert latest is not None
    steps_done = int(stdout.split("steps")[-1])
    info = load_checkpoint(latest, build_model("tiny", "dense"))
    assert 1 <= info["step"] == steps_done < 500
    # 8 samples / batch 2 = 4 batches per epoch, one batch per step
    assert info["data_state"] == {"epoch": (steps_done - 1) // 4,
                                  "index": (steps_done - 1) % 4 + 1}


# ----------------------------------------------------------------------------- checkpoints
class Toy(nn.Module):
    """A tiny model with the echomoe output contract: ``loss`` and raw ``losses``."""

    def __init__(self, poison: str | None = None):
        super().__init__()
        self.lin = nn.Linear(3, 1)
        self.norm = nn.LayerNorm(3)
        self.poison = poison

    def forward(self, x, y):
        pred = self.lin(self.norm(x)).squeeze(-1)
        losses = {"mse": ((pred - y) ** 2).mean(), "aux": pred.abs().mean() * 0}
        if self.poison:
            losses[self.poison] = losses[self.poison] * float("nan")
        return {"loss": losses["mse"] + 0.1 * losses["aux"], "losses": losses}


def toy_batches(epoch: int):
    g = torch.Generator().manual_seed(epoch)
    return [{"x": torch.randn(4, 3, generator=g), "y": torch.randn(4, generator=g)}
            for _ in range(3)]


def test_checkpoint_roundtrip_restores_state_and_rng(tmp_path):
    model = Toy()
    opt = build_optimizer(model, lr=0.1)
    sched = warmup_cosine_scheduler(opt, warmup=2, total=10)
    model(**toy_batches(0)[0])["loss"].backward()
    opt.step()
    sched.step()
    path = save_checkpoint(tmp_path / "c", model, opt, sched, step=1,
                           data_state={"epoch": 0, "index": 1}, extra={"note": "x"})
    expected = (random.random(), np.random.rand(), torch.rand(1))
    other = Toy()
    opt2 = build_optimizer(other, lr=0.1)
    sched2 = warmup_cosine_scheduler(opt2, warmup=2, total=10)
    info = load_checkpoint(path, other, opt2, sched2)  # weights_only=True throughout
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected
    assert info["step"] == 1 and info["data_state"]["index"] == 1 and info["extra"]["note"]
    assert torch.equal(other.lin.weight, model.lin.weight)
    assert opt2.state_dict()["state"][0]["exp_avg"].equal(opt.state_dict()["state"][0]["exp_avg"])
    assert sched2.last_epoch == 1 and opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]

    # A state file holding arbitrary objects is refused unless explicitly trusted.
    torch.save({"optimizer": None, "scheduler": None, "rng": None, "x": Path("/")},
               path / ckpt_module.STATE_FILE)
    with pytest.raises(pickle.UnpicklingError, match="trust_pickle"):
        load_checkpoint(path, other, restore_rng=False)
    with pytest.warns(UserWarning, match="weights_only=False"):
        load_checkpoint(path, other, restore_rng=False, trust_pickle=True)


def test_crash_mid_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    model = Toy()
    save_checkpoint(tmp_path / "step_00000001", model, step=1)
    save_checkpoint(tmp_path / "best", model, step=1)
    before = model.lin.weight.detach().clone()
    with torch.no_grad():
        model.lin.weight.add_(1.0)

    real = ckpt_module._write_files

    def crash(tmp, *args, **kwargs):
        real(tmp, *args, **kwargs)  # files fully written into the temporary directory ...
        (tmp / ckpt_module.MODEL_FILE).write_bytes(b"truncated")
        raise OSError("disk full")  # ... then the process dies before the rename

    monkeypatch.setattr(ckpt_module, "_write_files", crash)
    for name in ("step_00000002", "best"):
        with pytest.raises(OSError, match="disk full"):
            save_checkpoint(tmp_path / name, model, step=2)
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path).name == "step_00000001"
    assert not (tmp_path / "step_00000002").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "step_00000001"]
    for name in ("step_00000001", "best"):
        fresh = Toy()
        assert load_checkpoint(tmp_path / name, fresh, restore_rng=False)["step"] == 1
        assert torch.equal(fresh.lin.weight, before)

    # A hard kill (no cleanup) leaves a hidden temp dir: ignored, then removed.
    (tmp_path / ".step_00000003.tmp-1-abc").mkdir()
    assert latest_checkpoint(tmp_path).name == "step_00000001"
    assert [p.name for p in remove_stale_tmp(tmp_path)] == [".step_00000003.tmp-1-abc"]
    # A kill between the two renames of a re-save: the old copy is put back.
    os.replace(tmp_path / "best", tmp_path / ".best.old-1-abc")
    remove_stale_tmp(tmp_path)
    assert read_meta(tmp_path / "best")["step"] == 1


# ----------------------------------------------------------------------------- guards
@pytest.mark.parametrize("grad_accum", [1, 2])
def test_nan_guard_names_the_loss_and_step(grad_accum):
    model = Toy(poison="aux")
    with pytest.raises(NonFiniteLossError, match=r"step 1 .*aux=nan") as err:
        train(model, toy_batches, steps=3, lr=0.1, grad_accum=grad_accum, progress=False)
    assert err.value.step == 1 and err.value.names == ("aux",)
    assert not torch.isnan(model.lin.weight).any()  # stopped before the optimiser step


def test_toy_training_with_a_factory_runs_across_epochs():
    history = train(Toy(), toy_batches, steps=7, lr=0.05, clip=0.5, progress=False)
    assert [r["epoch"] for r in history] == [0, 0, 0, 1, 1, 1, 2]
    assert history[-1]["loss"] < history[0]["loss"] * 2  # finite and sane
    with pytest.raises(ValueError, match="lr must be"):
        train(Toy(), toy_batches, steps=1, lr=-1.0, progress=False)
    with pytest.raises(ValueError, match="unknown loss_weights"):
        train(fresh_model("dense"), toy_batches, steps=1, loss_weights={"nope": 1.0},
              progress=False)


# ----------------------------------------------------------------------------- optimiser
def test_param_groups_split_experts_and_exempt_norms_biases_embeddings():
    model = fresh_model("moe_shared")
    groups = {g["name"]: g for g in param_groups(model, weight_decay=0.1, expert_lr_scale=0.5)}
    assert set(groups) == {"decay", "no_decay", "expert_decay"}
    names = {id(p): n for n, p in model.named_parameters()}
    members = {k: {names[id(p)] for p in g["params"]} for k, g in groups.items()}
    assert sum(map(len, members.values())) == len(names)  # each parameter exactly once
    assert members["expert_decay"] == {n for n in names.values() if is_expert_param(n)}
    assert all(".mlp.moe.experts." in n for n in members["expert_decay"])
    assert "language_model.model.layers.0.mlp.moe.shared_expert.mlp.up_proj.weight" in \
        members["decay"]
    for name in ("language_model.model.embed_tokens.weight", "language_model.model.norm.weight",
                 "vision.pos_embed", "vision.cls_token", "vision.blocks.0.norm1.weight",
                 "projector.fc1.bias", "pixel_decoder.lateral.0.1.weight"):
        assert name in members["no_decay"], name
    for name in ("language_model.lm_head.weight", "projector.fc1.weight",
                 "language_model.model.layers.0.self_attn.q_proj.weight"):
        assert name in members["decay"], name
    assert groups["no_decay"]["weight_decay"] == 0.0 and groups["decay"]["weight_decay"] == 0.1
    assert groups["expert_decay"]["lr_scale"] == 0.5
    opt = build_optimizer(model, lr=1e-3, expert_lr_scale=0.5)
    assert {g["name"]: g["lr"] for g in opt.param_groups}["expert_decay"] == 5e-4


def test_warmup_cosine_values_at_known_steps():
    f = WarmupCosine(warmup=10, total=110, min_ratio=0.1)
    assert [f(s) for s in (0, 5, 10)] == [0.0, 0.5, 1.0]
    assert f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1)
    assert f(500) == pytest.approx(0.1)
    assert WarmupCosine(warmup=0, total=4)(0) == 1.0
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = warmup_cosine_scheduler(opt, warmup=2, total=4)
    lrs = []
    for _ in range(5):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.0, 1.0, 2.0, 1.0, 0.0], abs=1e-12)
    with pytest.raises(ValueError):
        WarmupCosine(warmup=5, total=4)


def test_staged_freezing_follows_the_echovlm_recipe(data):
    model = fresh_model("moe_topk")
    stages = echovlm_stages(projector_steps=1, moe_steps=2)
    assert [stage_at(stages, s)[1].name for s in range(5)] == \
        ["projector", "moe_heads", "moe_heads", "all", "all"]
    trainable = set(apply_stage(model, stages[1]))
    assert "language_model.model.layers.1.mlp.moe.router.weight" in trainable
    assert any(n.startswith("box_head.") for n in trainable)
    assert "language_model.model.layers.0.self_attn.q_proj.weight" not in trainable
    assert len(set(apply_stage(model, stages[2]))) == len(list(model.parameters()))
    assert freeze(model, "vision.*") and not model.vision.cls_token.requires_grad
    assert unfreeze(model, ["vision.cls_token"]) == ["vision.cls_token"]
    with pytest.raises(ValueError, match="matches no parameter"):
        freeze(model, "visoin.*")

    # One projector-only step: the projector moves, nothing else does.
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, make_batches(data), steps=1, lr=1e-2, stages=stages, progress=False)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith("projector.") for n in changed)


def test_lora_trains_only_adapters_and_chosen_heads(data, tmp_path):
    pytest.importorskip("peft")
    from echomoe.train import apply_lora

    model = apply_lora(fresh_model("moe_topk"), target_modules=["q_proj", "v_proj"], r=4,
                       alpha=8, trainable=["box_head.*"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("box_head.") for n in trainable)
    assert any("q_proj.lora_B" in n for n in trainable)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert all(torch.count_nonzero(p) == 0 for p in lora_b)  # LoRA starts as the identity
    frozen = model.vision.patch_embed.weight.detach().clone()
    history = train(model, make_batches(data), steps=2, lr=1e-2, checkpoint_dir=tmp_path,
                    progress=False)
    assert all(math.isfinite(r["loss"]) for r in history)
    assert any(torch.count_nonzero(p) > 0 for p in lora_b)
    assert torch.equal(model.vision.patch_embed.weight, frozen)
    again = apply_lora(fresh_model("moe_topk"), target_modules=["q_proj", "v_proj"], r=4,
                       alpha=8)
    load_checkpoint(latest_checkpoint(tmp_path), again, restore_rng=False)
    for (n, p), (_, q) in zip(model.named_parameters(), again.named_parameters(), strict=True):
        assert torch.equal(p, q), n


def test_lora_modules_to_save_are_module_names_as_in_the_shipped_config():
    pytest.importorskip("peft")
    from echomoe.config import load_config
    from echomoe.train import apply_lora

    lora = load_config(REPO / "configs" / "experiments" / "lora.yaml").train.lora
    model = apply_lora(fresh_model("moe_topk"), target_modules=lora.target_modules, r=lora.r,
                       alpha=lora.alpha, trainable=lora.trainable)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    saved = ("projector.", "mask_decoder.", "pixel_decoder.", "box_head.", "keypoint_head.",
             "region_classifier.")
    whole = {n for n in trainable | frozen if n.startswith(saved) or ".mlp." in n}
    assert whole <= trainable, sorted(whole - trainable)
    assert {p.split(".")[0] for p in whole} == {p.rstrip(".") for p in saved} | {
        "language_model", "vision"}  # "mlp" also names the vision blocks' FFN (peft's rule)
    for name in ("language_model.model.layers.1.mlp.moe.router.weight",
                 "language_model.model.layers.0.mlp.moe.experts.gate_up_proj",
                 "language_model.model.layers.0.self_attn.o_proj.lora_B.default.weight"):
        assert name in trainable, name
    assert trainable == whole | {n for n in trainable if "lora_" in n}
    for name in ("language_model.model.layers.0.self_attn.q_proj.base_layer.weight",
                 "language_model.model.embed_tokens.weight", "vision.patch_embed.weight"):
        assert name in frozen, name
    with pytest.raises(ValueError, match="module name 'box_haed' matches no module"):
        apply_lora(fresh_model("dense"), target_modules=["q_proj"], trainable=["box_haed"])
