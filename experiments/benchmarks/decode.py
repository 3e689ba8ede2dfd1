"""Greedy decoding benchmark: tokens/s of MoE vs dense models, and the KV cache's speed-up.

For an echomoe preset (``small`` by default) it times, side by side in interleaved rounds, fp32
on the CPU, ``generate(do_sample=False)`` of ``max_new_tokens`` tokens for a batch of text
prompts (one region per sample, carried through the routing context at every step) with the
``dense`` variant and MoE variants of equal active parameters, each with and without the KV
cache.  It reports tokens/s (generated tokens ÷ wall time of the whole ``generate`` call,
prefill included), MoE ÷ dense tokens/s, and the KV cache's speed-up (time without ÷ time with,
for a shorter generation: without the cache every step re-reads the whole prompt); both ratios
are medians of per-round ratios.
In the same run, as the reference, it times ``transformers``' own pair: ``Qwen2ForCausalLM`` vs
``Qwen2MoeForCausalLM`` with 8 experts, top-2, at the same active width (hidden 256, 4 layers).

    python experiments/benchmarks/decode.py --out results/decode.json
"""

from __future__ import annotations

import argparse
import sys

import torch

from echomoe.models import PRESETS, VARIANTS, build_model
from echomoe.utils.benchmark import (
    environment,
    markdown_table,
    paired_ratio,
    publish,
    qwen2_reference_pair,
    synthetic_token_ids,
    time_interleaved,
    torch_threads,
)

TARGETS = {"ratio_vs_dense": 0.8, "kv_cache_speedup": 3.0}  # minimums, for echomoe
DEFAULT_VARIANTS = ("dense", "moe_topk", "moe_region_soft")


def _generate_fn(model: torch.nn.Module, inputs: dict, new_tokens: int, use_cache: bool):
    model.eval()

    def generate() -> torch.Tensor:
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 do_sample=False, use_cache=use_cache, pad_token_id=0)
        if out.shape[1] != inputs["input_ids"].shape[1] + new_tokens:
            raise RuntimeError(f"generate returned {out.shape[1]} positions")
        return out

    return generate


def _group(name: str, models: dict, inputs: dict, dense: str, new_tokens: int, kv_new_tokens: int,
           repeats: int, kv_repeats: int, min_seconds: float, targets: dict | None) -> dict:
    cached = time_interleaved(
        {label: _generate_fn(m, inputs, new_tokens, True) for label, m in models.items()},
        repeats=repeats, warmup=1, min_seconds=min_seconds)
    kv_calls = {}
    for label, model in models.items():
        kv_calls[f"{label}|cache"] = _generate_fn(model, inputs, kv_new_tokens, True)
        kv_calls[f"{label}|no_cache"] = _generate_fn(model, inputs, kv_new_tokens, False)
    kv = time_interleaved(kv_calls, repeats=kv_repeats, warmup=1)
    batch = inputs["input_ids"].shape[0]
    results = {}
    for label in models:
        with_cache, without = kv[f"{label}|cache"], kv[f"{label}|no_cache"]
        results[label] = {
            **cached[label],
            "tokens_per_s": batch * new_tokens / (cached[label]["median_ms"] / 1e3),
            "kv_median_ms": with_cache["median_ms"],
            "kv_median_ms_no_cache": without["median_ms"],
            "kv_cache_speedup": paired_ratio(kv, f"{label}|no_cache", f"{label}|cache"),
        }
    for label, r in results.items():
        # tokens/s ratio = dense time / this model's time, per round
        r["ratio_vs_dense"] = paired_ratio(cached, dense, label)
        r["meets_target"] = None if targets is None else (
            r["kv_cache_speedup"] >= targets["kv_cache_speedup"]
            and (label == dense or r["ratio_vs_dense"] >= targets["ratio_vs_dense"]))
    print(f"done {name}", file=sys.stderr)
    return {"model": name, "dense": dense, "results": results}


def run(preset: str, variants, batch_size: int, prompt_len: int, new_tokens: int,
        kv_new_tokens: int, repeats: int, kv_repeats: int, min_seconds: float, hf_hidden: int,
        hf_layers: int) -> dict:
    models = {}
    for variant in variants:
        torch.manual_seed(0)
        models[variant] = build_model(preset, variant)
    config = models["dense"].config
    special = (config.image_token_id, config.seg_token_id, config.det_token_id,
               config.kpt_token_id)
    ids = synthetic_token_ids(batch_size, prompt_len, config.text_config.vocab_size, special)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
              "region_ids": torch.arange(batch_size) % config.num_regions}
    timing = (new_tokens, kv_new_tokens, repeats, kv_repeats, min_seconds)
    groups = [_group(f"echomoe {preset}", models, inputs, "dense", *timing, TARGETS)]
    dense, moe = qwen2_reference_pair(hf_hidden, hf_layers, intermediate_size=2 * hf_hidden)
    ids = synthetic_token_ids(batch_size, prompt_len, dense.config.vocab_size)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    groups.append(_group("transformers qwen2 / qwen2_moe (8 experts, top-2)",
                         {"qwen2": dense, "qwen2_moe": moe}, inputs, "qwen2", *timing, None))
    return {"benchmark": "decode", "dtype": "float32", "batch_size": batch_size,
            "prompt_len": prompt_len, "new_tokens": new_tokens, "kv_new_tokens": kv_new_tokens,
            "repeats": repeats, "kv_repeats": kv_repeats,
            "targets": TARGETS, "environment": environment(), "groups": groups}


def table(payload: dict) -> str:
    """The benchmark's Markdown table."""
    rows = []
    for group in payload["groups"]:
        for label, r in group["results"].items():
            verdict = {None: "-", True: "yes", False: "no"}[r["meets_target"]]
            rows.append([group["model"], label, r["median_ms"], r["tokens_per_s"],
                         r["ratio_vs_dense"], r["kv_cache_speedup"], verdict])
    t = payload["targets"]
    text = markdown_table(
        ["model", "variant", "median ms", "tokens/s", "÷ dense", "KV cache speed-up",
         f"meets ≥ {t['ratio_vs_dense']:.1f} and ≥ {t['kv_cache_speedup']:.0f}×"], rows)
    return (f"{text}\n\nGreedy, batch {payload['batch_size']}, {payload['prompt_len']}-token "
            f"prompts, {payload['new_tokens']} new tokens, prefill included, fp32. KV cache "
            f"speed-up: time without ÷ time with the cache, generating "
            f"{payload['kv_new_tokens']} tokens.")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="results/decode.json", help="JSON output path")
    parser.add_argument("--preset", default="small", choices=list(PRESETS))
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS),
                        choices=list(VARIANTS))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--kv-new-tokens", type=int, default=8,
                        help="tokens generated with and without the KV cache for its speed-up")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved timing rounds")
    parser.add_argument("--kv-repeats", type=int, default=3,
                        help="interleaved rounds of the KV cache comparison")
    parser.add_argument("--min-seconds", type=float, default=10.0,
                        help="extend the rounds of fast groups to at least this long")
    parser.add_argument("--hf-hidden", type=int, default=256, help="reference pair hidden size")
    parser.add_argument("--hf-layers", type=int, default=4, help="reference pair depth")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1: ratios are stable on a shared machine)")
    args = parser.parse_args(argv)
    variants = ["dense"] + [v for v in args.variants if v != "dense"]
    with torch_threads(args.threads):
        payload = run(args.preset, variants, args.batch_size, args.prompt_len, args.new_tokens,
                      args.kv_new_tokens, args.repeats, args.kv_repeats, args.min_seconds,
                      args.hf_hidden, args.hf_layers)
    publish(payload, table(payload), args.out)
    return payload


if __name__ == "__main__":
    main()
