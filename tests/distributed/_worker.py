"""Multi-process scenarios for tests/distributed (run under torchrun; rank 0 writes JSON).

    python -m torch.distributed.run --nproc_per_node 2 _worker.py ddp  SETUP_DIR OUT_DIR
    python -m torch.distributed.run --nproc_per_node 2 _worker.py deepspeed SETUP_DIR OUT_DIR
    python _worker.py deepspeed1 SETUP_DIR OUT_DIR          # DeepSpeed in one process
    python -m torch.distributed.run --nproc_per_node 4 _worker.py ep_replicas SETUP_DIR OUT_DIR

One process run checks several things (DeepSpeed imports and engine set-up are slow).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from _launch import REPO, STEPS, TRAIN_KW, ListBatches

from echomoe.distributed import init_distributed, save_pretrained_consolidated, world_info
from echomoe.models.modeling import EchoMoEForConditionalGeneration
from echomoe.train import train


def load(path: Path) -> EchoMoEForConditionalGeneration:
    return EchoMoEForConditionalGeneration.from_pretrained(path)


def losses(history) -> list[float]:
    return [r["loss"] for r in history]


def ddp(setup: Path, out: Path, batches: ListBatches) -> dict:
    from echomoe.distributed import shard_experts
    from echomoe.models import build_model

    info = world_info()
    result: dict = {}
    # 1. a world size that does not divide the number of experts
    torch.manual_seed(0)
    three = build_model("tiny", "moe_topk", moe_config={"num_experts": 3,
                                                        "backend": "expert_parallel"})
    try:
        shard_experts(three)
        result["split_error"] = None
    except ValueError as err:
        result["split_error"] = str(err)
    # 2. expert parallelism from a full checkpoint: each rank keeps its own experts
    model = load(setup / "init_ep")
    full = {k: v.clone() for k, v in model.state_dict().items() if ".experts." in k}
    sharded = shard_experts(model)
    own = model.state_dict()
    local = model.language_model.model.layers[0].mlp.moe.experts
    r = local.expert_range
    result["ep_layers"] = sharded
    result["own_experts"] = all(torch.equal(own[k], full[k][r.start:r.stop]) for k in full)
    result["local_shape"] = list(own[next(iter(full))].shape)
    history = train(model, batches, grad_accum=1, **TRAIN_KW)
    result["ep_losses"] = losses(history)
    result["ep_grad_norms"] = [r["grad_norm"] for r in history]
    save_pretrained_consolidated(model, out / "ep_model")
    # 2b. resume an expert-parallel run: 3 steps + checkpoint, then a fresh process state
    result["ep_resumed_losses"] = resumed(setup / "init_ep", out / "ep_ckpt", batches)
    # 3. plain DDP (experts replicated)
    model = load(setup / "init")
    history = train(model, batches, grad_accum=1, **TRAIN_KW)
    result["ddp_losses"] = losses(history)
    result["ddp_grad_norms"] = [r["grad_norm"] for r in history]
    result["ddp_is_ddp"] = True
    save_pretrained_consolidated(model, out / "ddp_model")
    result["world_size"] = info.world_size
    result.update(bias_balancing(info))
    return result


def bias_balancing(info) -> dict:
    """Routers with ``bias_update_rate`` update their expert bias from the global batch's load:
    every rank routes its own 12 tokens of the same 24 (sorted by expert, so that the ranks'
    loads differ), and all must end with the update that the 24 tokens' load gives, not the
    one of their own tokens."""
    from echomoe.moe import TopKRouter

    def sign_update(ids: torch.Tensor) -> torch.Tensor:
        load = torch.bincount(ids.flatten(), minlength=4).float()
        return 0.1 * torch.sign(load.mean() - load)

    torch.manual_seed(0)
    router = TopKRouter(16, 4, 1, bias_update_rate=0.1)
    tokens = torch.randn(24, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ids = router.eval()(tokens).expert_ids
        expected = sign_update(ids)
        tokens = tokens[ids[:, 0].argsort(stable=True)]  # rank 0 gets the low experts' tokens
        mine = tokens[12 * info.rank:12 * (info.rank + 1)]
        local = sign_update(router(mine).expert_ids)
        router.train()(mine)
    gathered = [torch.zeros(4) for _ in range(info.world_size)]
    torch.distributed.all_gather(gathered, router.expert_bias)
    return {"bias_equal_across_ranks": all(torch.equal(b, gathered[0]) for b in gathered),
            "bias_is_global_update": torch.equal(router.expert_bias, expected),
            "bias_local_update_differs": not torch.equal(local, expected)}


def ep_replicas(setup: Path, out: Path, batches: ListBatches) -> dict:
    """4 ranks, experts split over 2 of them (ep_size=2: two replicas of every shard).

    Ranks 2 and 3 read copies of the batches of ranks 0 and 1, so the global batch (and its mean
    loss) is the 2-batch global batch of the reference run: expert gradients must be averaged
    over the replicas, dense ones over all 4 ranks, and the clipping norm count each shard once.
    """
    from echomoe.distributed.expert_parallel import expert_parallel_layers

    pairs = [batches.batches[i:i + 2] for i in range(0, len(batches.batches) - 1, 2)]
    doubled = ListBatches([b for pair in pairs for b in pair * 2])
    model = load(setup / "init_ep")
    history = train(model, doubled, grad_accum=1, ep_size=2, **TRAIN_KW)
    layers = expert_parallel_layers(model)
    local = next(iter(layers.values()))
    result = {
        "world_size": world_info().world_size,
        "ep_layers": sorted(layers),
        "ep_size": local.groups.ep_size,
        "expert_range": [local.expert_range.start, local.expert_range.stop],
        "losses": losses(history),
        "grad_norms": [r["grad_norm"] for r in history],
    }
    save_pretrained_consolidated(model, out / "model")
    return result


def resumed(init: Path, ckpt: Path, batches: ListBatches, **kwargs) -> list[float]:
    """Train 3 of 5 steps with a checkpoint, then resume a freshly loaded model to step 5;
    returns the losses of steps 4 and 5."""
    first = train(load(init), batches, checkpoint_dir=ckpt, stop_at=3, **TRAIN_KW, **kwargs)
    assert len(first) == 3
    torch.manual_seed(1234)  # the checkpoint's RNG state must win
    second = train(load(init), batches, checkpoint_dir=ckpt, **TRAIN_KW, **kwargs)
    assert second.resumed_from is not None and [r["step"] for r in second] == [4, 5]
    return losses(second)


def _ds_moe_groups(result: dict) -> None:
    """A model with DeepSpeed's own MoE layer: echomoe builds the MoE parameter groups."""
    import deepspeed
    from deepspeed.moe.layer import MoE

    from echomoe.train.optim import build_optimizer

    torch.manual_seed(0)
    expert = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.GELU(),
                                 torch.nn.Linear(24, 16))
    net = torch.nn.ModuleDict({"inp": torch.nn.Linear(8, 16),
                               "moe": MoE(16, expert, num_experts=2, ep_size=world_info().
                                          world_size, k=1)})
    opt = build_optimizer(net, lr=1e-3, moe_groups=True)
    result["ds_moe_group_names"] = [g["name"] for g in opt.param_groups if g.get("moe")]
    engine, *_ = deepspeed.initialize(model=net, optimizer=opt, config={
        "train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 2},
        "zero_allow_untested_optimizer": True, "steps_per_print": 10**9})
    x = torch.randn(4, 3, 8)
    y, aux, _ = engine.module["moe"](engine.module["inp"](x))
    loss = y.pow(2).mean() + aux
    engine.backward(loss)
    engine.step()
    result["ds_moe_step"] = bool(torch.isfinite(loss).item())


def deepspeed_runs(setup: Path, out: Path, batches: ListBatches, *, grad_accum: int) -> dict:
    result: dict = {}
    zero = REPO / "configs" / "deepspeed"
    t0 = time.perf_counter()
    # ZeRO-2: parity, then consolidated save -> logits
    model = load(setup / "init")
    history = train(model, batches, grad_accum=grad_accum, deepspeed=zero / "zero2.json",
                    **TRAIN_KW)
    result["z2_losses"] = losses(history)
    result["z2_grad_norms"] = [r["grad_norm"] for r in history]
    save_pretrained_consolidated(model, out / "z2_model")
    model.eval()
    with torch.no_grad():
        logits = model(**batches.batch(0, 0)).logits
    if world_info().is_main:
        torch.save(logits, out / "z2_logits.pt")
    result["z2_seconds"] = time.perf_counter() - t0
    if grad_accum > 1:  # the one-process run stops here
        return result
    result["z2_resumed_losses"] = resumed(setup / "init", out / "z2_ckpt", batches,
                                          deepspeed=zero / "zero2.json")
    # ZeRO-3 with an MoE variant
    model = load(setup / "init")
    history = train(model, batches, grad_accum=grad_accum, deepspeed=zero / "zero3.json",
                    **TRAIN_KW)
    result["z3_losses"] = losses(history)
    result["z3_partitioned"] = any(p.numel() == 0 for p in model.parameters())
    save_pretrained_consolidated(model, out / "z3_model")
    lora_moe_zero2(setup, zero / "zero2.json", batches, result)
    # an explicit precision that contradicts the DeepSpeed config fails before the engine
    try:
        train(load(setup / "init"), batches, deepspeed=zero / "zero2.json", precision="bf16",
              **{**TRAIN_KW, "steps": 1})
        result["precision_error"] = None
    except ValueError as err:
        result["precision_error"] = str(err)
    # a 0-d parameter would break DeepSpeed's start-up broadcast: refused with its name
    scalar = torch.nn.Module()
    scalar.gain = torch.nn.Parameter(torch.tensor(1.0))
    try:
        train(scalar, batches, deepspeed=zero / "zero2.json", **{**TRAIN_KW, "steps": 1})
        result["scalar_error"] = None
    except ValueError as err:
        result["scalar_error"] = str(err)
    _ds_moe_groups(result)
    return result


def lora_moe_zero2(setup: Path, config: Path, batches: ListBatches, result: dict) -> None:
    """LoRA on the attention of the moe_topk model, MoE layers and the box head trained fully
    (``modules_to_save``, as in configs/experiments/lora.yaml), 4 ZeRO-2 steps on one batch."""
    from echomoe.train import apply_lora

    model = load(setup / "init")
    apply_lora(model, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], r=4, alpha=8,
               trainable=["mlp", "box_head"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    same = ListBatches([batches.batches[0]] * (4 * world_info().world_size))
    history = train(model, same, deepspeed=config, **{**TRAIN_KW, "steps": 4, "warmup": 0})
    after = model.state_dict()
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    result["lora_losses"] = losses(history)
    result["lora_trainable"] = sorted(trainable)
    result["lora_changed"] = changed


def main(argv: list[str]) -> None:
    scenario, setup, out = argv[0], Path(argv[1]), Path(argv[2])
    init_distributed(force=scenario.startswith("deepspeed"))
    batches = ListBatches(torch.load(setup / "batches.pt", weights_only=False))
    if scenario == "ddp":
        result = ddp(setup, out, batches)
    elif scenario == "deepspeed":
        result = deepspeed_runs(setup, out, batches, grad_accum=1)
    elif scenario == "deepspeed1":
        result = deepspeed_runs(setup, out, batches, grad_accum=2)
    elif scenario == "ep_replicas":
        result = ep_replicas(setup, out, batches)
    else:
        raise SystemExit(f"unknown scenario {scenario!r}")
    assert len(result.get("z2_losses", result.get("ep_losses", result.get("losses")))) == STEPS
    if world_info().is_main:
        (out / f"{scenario}.json").write_text(json.dumps(result, indent=1))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
