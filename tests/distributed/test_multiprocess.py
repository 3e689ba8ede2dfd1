"""Two processes on 127.0.0.1 (gloo): DDP, expert parallelism and DeepSpeed ZeRO-2/3 against
the one-process reference run (same seed, same global batch as 2 micro-batches)."""

from __future__ import annotations

import math

import pytest
import torch
from _launch import REPO, STEPS, max_state_diff, read_result, run_single, run_torchrun

from echomoe.models.modeling import EchoMoEForConditionalGeneration
from echomoe.utils.benchmark import torch_threads

pytestmark = pytest.mark.slow
TOL = 1e-4


def reference(setup_dir) -> dict:
    return torch.load(setup_dir / "reference.pt", weights_only=False)


def assert_close_list(got, want, tol=TOL):
    assert len(got) == len(want) == STEPS
    diffs = [abs(a - b) for a, b in zip(got, want, strict=True)]
    assert max(diffs) < tol, (got, want)


@pytest.fixture(scope="module")
def ddp_run(setup_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    run_torchrun(["ddp", str(setup_dir), str(out)], timeout=300)
    return out, read_result(out / "ddp.json")


@pytest.fixture(scope="module")
def deepspeed_run(setup_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("deepspeed")
    run_torchrun(["deepspeed", str(setup_dir), str(out)], timeout=600)
    return out, read_result(out / "deepspeed.json")


def test_expert_parallel_two_processes_equal_one_process(setup_dir, ddp_run):
    out, result = ddp_run
    ref = reference(setup_dir)
    # every rank kept *its own* experts of the full checkpoint: [E/P, 2F, D] slices r*E/P...
    assert result["own_experts"] is True and result["local_shape"] == [2, 128, 64]
    assert len(result["ep_layers"]) == 2
    assert_equals_reference(ref, result["ep_losses"], result["ep_grad_norms"], out / "ep_model")


def assert_equals_reference(ref: dict, losses, grad_norms, model_dir) -> None:
    """An expert-parallel run equals the one-process reference: losses, clipping norms (each
    expert shard counted once, not scaled by the EP size) and, after 5 AdamW steps, the
    consolidated weights (expert gradients neither averaged over the EP group nor multiplied
    by its size)."""
    assert_close_list(losses, ref["losses"])
    assert_close_list(grad_norms, ref["grad_norms"], tol=1e-3)
    model = EchoMoEForConditionalGeneration.from_pretrained(model_dir)
    assert model.language_model.model.layers[0].mlp.moe.experts.gate_up_proj.shape[0] == 4
    assert max_state_diff(model.state_dict(), ref["state"]) < TOL


def test_expert_parallel_smaller_than_the_world_equals_one_process(setup_dir, tmp_path):
    """4 ranks, ep_size=2: each expert shard lives on two ranks (replicas) whose gradients
    are averaged; with the global batch of the reference, the run must equal it."""
    run_torchrun(["ep_replicas", str(setup_dir), str(tmp_path)], nproc=4, timeout=300)
    result = read_result(tmp_path / "ep_replicas.json")
    ref = reference(setup_dir)
    assert result["world_size"] == 4 and result["ep_size"] == 2
    assert result["expert_range"] == [0, 2]  # rank 0 holds experts 0-1 of 4 (rank 2 too)
    assert len(result["ep_layers"]) == 2
    assert_equals_reference(ref, result["losses"], result["grad_norms"], tmp_path / "model")


def test_distributed_runs_resume_from_their_checkpoints(setup_dir, ddp_run, deepspeed_run):
    want = reference(setup_dir)["losses"][3:]
    for got in (ddp_run[1]["ep_resumed_losses"], deepspeed_run[1]["z2_resumed_losses"]):
        assert len(got) == 2 and max(abs(a - b) for a, b in zip(got, want, strict=True)) < TOL


def test_ddp_two_processes_equal_one_process(setup_dir, ddp_run):
    out, result = ddp_run
    ref = reference(setup_dir)
    assert result["world_size"] == 2
    assert_close_list(result["ddp_losses"], ref["losses"])
    model = EchoMoEForConditionalGeneration.from_pretrained(out / "ddp_model")
    assert max_state_diff(model.state_dict(), ref["state"]) < TOL


def test_bias_balancing_updates_from_the_global_batch_on_every_rank(ddp_run):
    result = ddp_run[1]
    assert result["bias_local_update_differs"]  # else the check below proves nothing
    assert result["bias_is_global_update"] and result["bias_equal_across_ranks"]


def test_world_size_must_divide_the_number_of_experts(ddp_run):
    message = ddp_run[1]["split_error"]
    assert message is not None
    assert "cannot split 3 experts evenly" in message and "world size 2" in message


def test_zero2_two_processes_equal_one_process_and_checkpoint_loads(setup_dir,
                                                                      deepspeed_run):
    out, result = deepspeed_run
    ref = reference(setup_dir)
    assert_close_list(result["z2_losses"], ref["losses"])
    model = EchoMoEForConditionalGeneration.from_pretrained(out / "z2_model")
    assert max_state_diff(model.state_dict(), ref["state"]) < TOL
    batch = torch.load(setup_dir / "batches.pt", weights_only=False)[0]
    model.eval()
    with torch.no_grad(), torch_threads(1):  # the workers' thread count: bitwise equal
        logits = model(**batch).logits
    assert torch.equal(logits, torch.load(out / "z2_logits.pt"))


def test_zero3_trains_an_moe_variant_and_consolidates(setup_dir, deepspeed_run):
    out, result = deepspeed_run
    ref = reference(setup_dir)
    assert result["z3_partitioned"] is True  # the weights really were partitioned
    assert_close_list(result["z3_losses"], ref["losses"])
    model = EchoMoEForConditionalGeneration.from_pretrained(out / "z3_model")
    assert max_state_diff(model.state_dict(), ref["state"]) < TOL


def test_lora_with_moe_under_zero2(deepspeed_run):
    result = deepspeed_run[1]
    got = result["lora_losses"]  # 4 steps on one repeated batch
    assert len(got) == 4 and all(math.isfinite(v) for v in got)
    assert all(b < a for a, b in zip(got, got[1:], strict=False)), got
    trainable, changed = set(result["lora_trainable"]), set(result["lora_changed"])
    # trainable: the adapters, every parameter of the MoE layers and of the box head
    assert all("lora_" in n or ".mlp." in n or n.startswith("box_head.") for n in trainable)
    assert any(".mlp.moe.experts.gate_up_proj" in n for n in trainable)
    assert any(".mlp.moe.router." in n for n in trainable)
    assert not any(n.endswith("q_proj.base_layer.weight") for n in trainable)
    # what moved: only trainable parameters, and the adapters and the experts among them
    assert changed and changed <= trainable, sorted(changed - trainable)
    assert any("q_proj.lora_B" in n for n in changed) and any("lora_A" in n for n in changed)
    assert any(".mlp.moe.experts.down_proj" in n for n in changed)


def test_deepspeed_refuses_a_conflicting_precision_and_0d_parameters(deepspeed_run):
    message = deepspeed_run[1]["precision_error"]
    assert message is not None
    assert "precision='bf16' conflicts with the DeepSpeed config" in message
    assert "trains in fp32" in message and "_bf16.json" in message
    message = deepspeed_run[1]["scalar_error"]
    assert message is not None and "cannot train 0-d parameters (gain)" in message


def test_deepspeed_moe_layers_get_moe_param_groups(deepspeed_run):
    result = deepspeed_run[1]
    assert result["ds_moe_group_names"] and all(
        name == "ep_size_2" for name in result["ds_moe_group_names"])
    assert result["ds_moe_step"] is True


def test_deepspeed_single_process_equals_plain_loop(setup_dir, tmp_path):
    run_single(["deepspeed1", str(setup_dir), str(tmp_path)], timeout=400)
    result = read_result(tmp_path / "deepspeed1.json")
    assert_close_list(result["z2_losses"], reference(setup_dir)["losses"])


def test_train_script_under_torchrun_with_expert_parallelism(tmp_path):
    out = tmp_path / "run"
    proc = run_torchrun([
        "configs/experiments/multitask.yaml", "train.steps=2", "train.warmup_steps=1",
        "train.eval_every=2", "train.batch_size=2", "data.n=12", "data.synthetic.image_size=32",
        "eval.num_samples=2", "eval.max_new_tokens=2", "model.variant=moe_topk",
        "model.corpus_samples=12", "model.overrides.moe_config.backend=expert_parallel",
        "logging.mode=disabled", f"output_dir={out}"],
        script=REPO / "experiments" / "train.py", timeout=300)
    assert proc.stdout.count("summary:") == 1  # rank 0 reports, rank 1 stays quiet
    summary = read_result(out / "summary.json")
    assert summary["status"] == "finished" and summary["steps"] == 2
    ckpt = out / "checkpoints" / "step_00000002"
    assert {p.name for p in ckpt.iterdir()} >= {"model.safetensors", "meta.json",
                                                 "training_state.pt", "training_state_rank1.pt"}
    model = EchoMoEForConditionalGeneration.from_pretrained(out / "model")
    assert model.language_model.model.layers[1].mlp.moe.experts.down_proj.shape[0] == 4
