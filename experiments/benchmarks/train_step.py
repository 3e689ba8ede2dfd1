"""Training-step benchmark: MoE ÷ dense time per optimizer step at equal active parameters.

For each echomoe preset (``tiny``, ``small``) it times, side by side in interleaved rounds, fp32
on the CPU, one full training step (forward with labels and aux losses, backward, AdamW step)
of every variant of the preset (``dense``, ``moe_topk``, ``moe_shared``, ``moe_dual_path``,
``moe_region_hard``, ``moe_region_soft``: all with the same active FFN parameters per token) on
one synthetic batch (an image's tokens + random text, one region per sample), and reports each
variant's time ÷ the dense model's (the median of per-round ratios).  In the same run, as the
reference, it times ``transformers``' own pair: ``Qwen2ForCausalLM`` vs ``Qwen2MoeForCausalLM``
with 8 experts, top-2, at the same active width (hidden 256, 4 layers, text only).

    python experiments/benchmarks/train_step.py --out results/train_step.json
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch

from echomoe.models import VARIANTS, build_model
from echomoe.utils.benchmark import (
    environment,
    markdown_table,
    paired_ratio,
    publish,
    qwen2_reference_pair,
    synthetic_token_ids,
    time_interleaved,
    torch_threads,
    vlm_training_batch,
)

TARGET = 1.10  # echomoe MoE step time / dense step time
PRESETS = ("tiny", "small")


def _step_fn(model: torch.nn.Module, batch: dict) -> Callable[[], None]:
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        optimizer.step()

    return step


def _group(name: str, steps: dict[str, Callable], dense: str, repeats: int, min_seconds: float,
           target: float | None) -> dict:
    times = time_interleaved(steps, repeats=repeats, warmup=2, min_seconds=min_seconds)
    results = {}
    for variant, t in times.items():
        ratio = paired_ratio(times, variant, dense)
        results[variant] = {**t, "ratio_vs_dense": ratio,
                            "meets_target": None if target is None or variant == dense
                            else ratio <= target}
    print(f"done {name}", file=sys.stderr)
    return {"model": name, "dense": dense, "target": target, "results": results}


def run(presets, variants, batch_size: int, seq_len: int, repeats: int, min_seconds: float,
        hf_hidden: int, hf_layers: int) -> dict:
    groups = []
    for preset in presets:
        steps = {}
        for variant in variants:
            torch.manual_seed(0)
            model = build_model(preset, variant)
            steps[variant] = _step_fn(model, vlm_training_batch(model.config, batch_size,
                                                                seq_len))
        groups.append(_group(f"echomoe {preset}", steps, "dense", repeats, min_seconds, TARGET))
    dense, moe = qwen2_reference_pair(hf_hidden, hf_layers, intermediate_size=2 * hf_hidden)
    ids = synthetic_token_ids(batch_size, seq_len, dense.config.vocab_size)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    steps = {"qwen2": _step_fn(dense, batch), "qwen2_moe": _step_fn(moe, batch)}
    groups.append(_group("transformers qwen2 / qwen2_moe (8 experts, top-2)", steps, "qwen2",
                         repeats, min_seconds, None))
    return {"benchmark": "train_step", "dtype": "float32", "batch_size": batch_size,
            "seq_len": seq_len, "repeats": repeats, "target": TARGET,
            "environment": environment(), "groups": groups}


def table(payload: dict) -> str:
    """The benchmark's Markdown table."""
    rows = []
    for group in payload["groups"]:
        for variant, r in group["results"].items():
            verdict = {None: "-", True: "yes", False: "no"}[r["meets_target"]]
            rows.append([group["model"], variant, r["median_ms"], r["ratio_vs_dense"], verdict])
    text = markdown_table(
        ["model", "variant", "median ms / step", "÷ dense", f"≤ {payload['target']:.2f}"], rows)
    return (f"{text}\n\nBatch {payload['batch_size']} × {payload['seq_len']} tokens, forward + "
            "backward + AdamW step, fp32.")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="results/train_step.json", help="JSON output path")
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=PRESETS)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sample")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved timing rounds")
    parser.add_argument("--min-seconds", type=float, default=20.0,
                        help="extend the rounds of fast groups to at least this long")
    parser.add_argument("--hf-hidden", type=int, default=256, help="reference pair hidden size")
    parser.add_argument("--hf-layers", type=int, default=4, help="reference pair depth")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1: ratios are stable on a shared machine)")
    args = parser.parse_args(argv)
    variants = ["dense"] + [v for v in args.variants if v != "dense"]
    with torch_threads(args.threads):
        payload = run(args.presets, variants, args.batch_size, args.seq_len, args.repeats,
                      args.min_seconds, args.hf_hidden, args.hf_layers)
    publish(payload, table(payload), args.out)
    return payload


if __name__ == "__main__":
    main()
