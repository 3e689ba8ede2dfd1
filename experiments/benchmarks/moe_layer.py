"""MoE layer benchmark: forward + backward time of echomoe's backends vs transformers and dense.

For each (T, D, F, E, k) it times, side by side in interleaved rounds, fp32 on CPU:

* ``dense``: a SwiGLU FFN with ``d_ff = k * F`` (the same active parameters and FLOPs per token);
* ``echomoe_grouped_mm`` and ``echomoe_loop``: echomoe's MoE layer with each backend;
* ``hf_eager`` and ``hf_grouped_mm``: transformers' ``MixtralSparseMoeBlock`` with its eager
  experts and with its default experts implementation (``grouped_mm``),

all MoE variants sharing the same router and expert weights, and reports ``R = time / dense``,
the speed-up of echomoe's default backend over the fastest transformers option (both medians of
per-round ratios, :func:`~echomoe.utils.benchmark.paired_ratio`), and (each in a fresh process)
the peak memory of one forward + backward.

    python experiments/benchmarks/moe_layer.py --out results/moe_layer.json
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

from echomoe.moe import GatedMLP, build_moe_layer
from echomoe.utils.benchmark import (
    current_rss_mb,
    environment,
    markdown_table,
    measure_in_subprocess,
    paired_ratio,
    peak_rss_mb,
    publish,
    reset_peak_rss,
    time_interleaved,
    torch_threads,
)

CONFIGS = [(4096, 512, 1024, 8, 2), (4096, 512, 128, 64, 8), (512, 256, 512, 8, 2)]
TARGETS = {(8, 2, 4096): 1.05, (64, 8, 4096): 2.0, (8, 2, 512): 1.3}
IMPLS = ["dense", "echomoe_grouped_mm", "echomoe_loop", "hf_eager", "hf_grouped_mm"]


def build(impl: str, T: int, D: int, F: int, E: int, k: int, seed: int = 0):
    """``(module, call)``: ``call(x)`` returns the ``(1, T, D)`` output of ``module``."""
    torch.manual_seed(seed)
    ours = build_moe_layer(D, F, E, k)
    for p in ours.parameters():
        torch.nn.init.normal_(p, std=0.02)
    if impl == "dense":
        module = GatedMLP(D, k * F)
        return module, module
    if impl.startswith("echomoe_"):
        backend = impl.removeprefix("echomoe_")
        module = build_moe_layer(D, F, E, k, backend=backend)
        module.load_state_dict(ours.state_dict())
        return module, lambda x: module(x).hidden_states
    cfg = MixtralConfig(
        hidden_size=D, intermediate_size=F, num_local_experts=E, num_experts_per_tok=k,
        hidden_act="silu",
    )
    cfg._experts_implementation = None if impl == "hf_eager" else "grouped_mm"
    module = MixtralSparseMoeBlock(cfg)
    with torch.no_grad():
        module.gate.weight.copy_(ours.router.weight)
        module.experts.gate_up_proj.copy_(ours.experts.gate_up_proj)
        module.experts.down_proj.copy_(ours.experts.down_proj)
    return module, module


def step_fn(call, module, x: torch.Tensor, grad: torch.Tensor):
    def step():
        module.zero_grad(set_to_none=True)
        call(x).backward(grad)

    return step


def inputs(T: int, D: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, T, D, generator=gen).requires_grad_(True)
    grad = torch.randn(1, T, D, generator=gen)
    return x, grad


def memory_probe(impl: str, cfg: tuple[int, ...]) -> dict:
    """Peak RSS growth (MiB) over a cold forward + backward, in this fresh process."""
    T, D, F, E, k = cfg
    module, call = build(impl, *cfg)
    x, grad = inputs(T, D)
    step = step_fn(call, module, x, grad)
    base = current_rss_mb()  # cold: nothing cached by an earlier step
    if not reset_peak_rss():
        return {"peak_mb": float("nan")}
    step()
    return {"peak_mb": max(0.0, peak_rss_mb() - base)}


def run(configs, repeats: int, skip_loop_above: int, with_memory: bool,
        min_seconds: float = 20.0) -> dict:
    rows = []
    for cfg in configs:
        T, D, F, E, k = cfg
        impls = [i for i in IMPLS if not (i == "echomoe_loop" and E > skip_loop_above)]
        x, grad = inputs(T, D)
        steps = {}
        for impl in impls:
            module, call = build(impl, *cfg)
            steps[impl] = step_fn(call, module, x, grad)
        times = time_interleaved(steps, repeats=repeats, min_seconds=min_seconds)
        results = {}
        for impl in impls:
            results[impl] = {**times[impl], "R": paired_ratio(times, impl, "dense")}
            if with_memory:
                argv = [__file__, "--memory-probe", impl, json.dumps(list(cfg))]
                results[impl].update(measure_in_subprocess(argv))
        speedup = min(paired_ratio(times, hf, "echomoe_grouped_mm")
                      for hf in ("hf_eager", "hf_grouped_mm"))
        rows.append({
            "T": T, "D": D, "F": F, "E": E, "k": k,
            "results": results,
            "speedup_vs_best_hf": speedup,
            "target_R": TARGETS.get((E, k, T)),
        })
        print(f"done T={T} D={D} F={F} E={E} k={k}", file=sys.stderr)
    return {"benchmark": "moe_layer", "dtype": "float32", "repeats": repeats,
            "environment": environment(), "configs": rows}


def table(payload: dict) -> str:
    headers = ["T", "D", "F", "E", "k"] + [f"R {i}" for i in IMPLS[1:]] + [
        "dense ms", "speed-up vs best HF", "target R"]
    out = []
    for row in payload["configs"]:
        res = row["results"]
        out.append(
            [row[c] for c in ("T", "D", "F", "E", "k")]
            + [res[i]["R"] if i in res else "-" for i in IMPLS[1:]]
            + [res["dense"]["median_ms"], row["speedup_vs_best_hf"], row["target_R"] or "-"]
        )
    text = markdown_table(headers, out)
    if "peak_mb" in payload["configs"][0]["results"]["dense"]:
        mem_rows = [
            [row[c] for c in ("T", "D", "F", "E", "k")]
            + [row["results"][i]["peak_mb"] if i in row["results"] else "-" for i in IMPLS]
            for row in payload["configs"]
        ]
        text += "\n\nPeak memory of a cold forward + backward "
        text += "(MiB of RSS growth, fresh process):\n\n"
        text += markdown_table(["T", "D", "F", "E", "k"] + IMPLS, mem_rows)
    return text


def parse_configs(text: str) -> list[tuple[int, ...]]:
    """``'T,D,F,E,k;T,D,F,E,k'`` or a JSON list of ``[T, D, F, E, k]`` -> list of 5-tuples."""
    try:
        rows = json.loads(text) if text.lstrip().startswith("[") else \
            [[int(v) for v in row.split(",")] for row in text.split(";") if row.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"cannot parse {text!r}: {err}") from None
    bad = [r for r in rows if not isinstance(r, list) or len(r) != 5
           or not all(isinstance(v, int) and v > 0 for v in r)]
    if not rows or bad:
        raise argparse.ArgumentTypeError(
            f"each config must be 5 positive integers T,D,F,E,k; got {bad[0] if bad else rows}"
        )
    return [tuple(r) for r in rows]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="results/moe_layer.json", help="JSON output path")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved timing rounds")
    parser.add_argument("--configs", default=None, type=parse_configs,
                        help="configs to time, as 'T,D,F,E,k;T,D,F,E,k' or a JSON list of "
                             "[T, D, F, E, k] (default: the three reference ones)")
    parser.add_argument("--skip-loop-above", type=int, default=16,
                        help="skip the loop backend for more experts than this (it is slow)")
    parser.add_argument("--no-memory", action="store_true", help="skip peak-memory probes")
    parser.add_argument("--min-seconds", type=float, default=20.0,
                        help="extend the rounds of fast configs to at least this long")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's, i.e. every core); a "
                             "non-default count writes its own README block, "
                             "moe_layer_threads<N>")
    parser.add_argument("--memory-probe", nargs=2, metavar=("IMPL", "CONFIG"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_probe:
        impl, cfg = args.memory_probe
        print(json.dumps(memory_probe(impl, tuple(json.loads(cfg)))))
        return {}
    configs = args.configs or CONFIGS
    threads = args.threads or torch.get_num_threads()
    with torch_threads(threads):
        payload = run(configs, args.repeats, args.skip_loop_above, not args.no_memory,
                      args.min_seconds)
    if args.threads is not None:
        payload["readme_block"] = f"moe_layer_threads{args.threads}"
    publish(payload, table(payload), args.out)
    return payload


if __name__ == "__main__":
    main()
