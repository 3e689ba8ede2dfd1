"""Upcycling fidelity: how closely a dense LM upcycled into MoE layers reproduces it.

For a randomly initialised Qwen2 LM of a preset's size, every equal-active MoE variant of
:data:`echomoe.models.builders.VARIANTS` (experts ``F/k`` wide: *F/k slices*), plus ``moe_topk``
with full-width copies and with a partition into ``E`` slices (*MoEfication*), is upcycled with
``noise_std=0`` by :func:`~echomoe.moe.upcycle.moefy` and run on the same random tokens as the
dense LM (:func:`~echomoe.utils.benchmark.upcycle_fidelity`): the per-layer FFN relative error,
the logits relative error, the arg-max agreement and the loss change.  Each row is measured with
the router moefy sets (``zero`` for slices) and with a random ``N(0, 0.02^2)`` router.

    python experiments/benchmarks/upcycle_fidelity.py --out results/upcycle_fidelity.json
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from echomoe.models.builders import EQUAL_ACTIVE_VARIANTS, PRESETS, build_config
from echomoe.utils.benchmark import environment, markdown_table, publish, upcycle_fidelity


def cases(preset: str) -> list[tuple[str, dict]]:
    """``(label, moefy kwargs)`` of every measured conversion."""
    rows = []
    for variant in EQUAL_ACTIVE_VARIANTS:
        moe = dict(build_config(preset, variant).moe_config)
        moe.pop("upcycle")
        rows.append((f"{variant} (F/k slices)", moe))
        if variant == "moe_topk":
            width = PRESETS[preset]["text_config"]["intermediate_size"]
            rows.append(("moe_topk (copies)", {**moe, "intermediate_size": width}))
            rows.append(("moe_topk (MoEfication)",
                         {**moe, "intermediate_size": width // moe["num_experts"]}))
    return rows


def run(preset: str, batch: int, seq_len: int, seed: int) -> dict:
    text = dict(PRESETS[preset]["text_config"])
    torch.manual_seed(seed)
    lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(text.pop("model_type"), **text))
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, lm.config.vocab_size, (batch, seq_len), generator=gen)
    regions = torch.arange(batch) % 7
    types = torch.zeros_like(ids)
    types[:, : seq_len // 4] = 1  # a VLM prompt opens with its image tokens
    results = []
    for label, kwargs in cases(preset):
        for random_router in (False, True):
            figures = upcycle_fidelity(lm, ids, regions, random_router=random_router,
                                       token_types=types, **kwargs)
            results.append({"case": label, "router_init": "random" if random_router else "moefy",
                            **figures})
    return {"benchmark": "upcycle_fidelity", "preset": preset, "batch": batch,
            "seq_len": seq_len, "seed": seed, "environment": environment(), "results": results}


def table(payload: dict) -> str:
    rows = [[r["case"], r["router_init"], f"{r['ffn_rel_err_mean']:.2e}",
             f"{r['logits_rel_err']:.2e}", f"{r['top1_agreement']:.3f}", f"{r['loss_delta']:+.4f}"]
            for r in payload["results"]]
    return markdown_table(["conversion", "router", "FFN rel. err", "logits rel. err",
                           "top-1 agreement", "loss change"], rows)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small", choices=list(PRESETS))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/upcycle_fidelity.json")
    args = parser.parse_args(argv)
    payload = run(args.preset, args.batch, args.seq_len, args.seed)
    publish(payload, table(payload), args.out)
    return payload


if __name__ == "__main__":
    main()
