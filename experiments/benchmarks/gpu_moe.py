"""GPU MoE kernels: MegaBlocks' dropless ``dMoE`` vs echomoe's ``grouped_mm`` vs transformers.

On a CUDA machine, for each (T, D, F, E, k), in bf16:

* **parity**: the output of MegaBlocks' ``dMoE`` (weights converted by
  :mod:`echomoe.moe.megablocks`) against echomoe's ``grouped_mm`` layer with the same weights
  (max absolute and relative error);
* **time** of one forward + backward (median of interleaved rounds, CUDA-synchronised) of
  ``megablocks`` (``dMoE``, ``mlp_impl="grouped"``), ``echomoe_grouped_mm`` and
  ``hf_grouped_mm`` (transformers' ``MixtralSparseMoeBlock``),

printed as a table and written as JSON.  Without a GPU it says so and exits with status 0
(``"skipped"`` in the JSON).  Without megablocks it times the other two and records why.

    python experiments/benchmarks/gpu_moe.py --out results/gpu_moe.json
"""

from __future__ import annotations

import argparse
import sys

import torch

from echomoe.moe import build_moe_layer
from echomoe.utils.benchmark import (
    environment,
    markdown_table,
    publish,
    time_interleaved,
    write_json,
)

CONFIGS = [(8192, 1024, 2048, 8, 2), (8192, 1024, 512, 64, 8), (2048, 512, 1024, 8, 2)]
PARITY_TOL = 3e-2  # bf16


def _output(y):
    return y[0] if isinstance(y, tuple) else y


def build(T: int, D: int, F: int, E: int, k: int, seed: int = 0) -> dict[str, tuple]:
    """``{name: (module, call)}`` sharing one set of router / expert weights (bf16, CUDA)."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    torch.manual_seed(seed)
    ours = build_moe_layer(D, F, E, k).cuda()
    for p in ours.parameters():
        torch.nn.init.normal_(p, std=0.02)
    out: dict[str, tuple] = {}
    try:
        from echomoe.moe.megablocks import build_dmoe

        dmoe = build_dmoe(ours, bf16=True)
        out["megablocks"] = (dmoe, lambda x: _output(dmoe(x)))
    except Exception as err:  # noqa: BLE001 -- reported, the other kernels still run
        out["megablocks_error"] = (None, repr(err))
    ours = ours.to(torch.bfloat16)
    out["echomoe_grouped_mm"] = (ours, lambda x: ours(x).hidden_states)
    cfg = MixtralConfig(hidden_size=D, intermediate_size=F, num_local_experts=E,
                        num_experts_per_tok=k, hidden_act="silu")
    cfg._experts_implementation = "grouped_mm"
    hf = MixtralSparseMoeBlock(cfg).cuda().to(torch.bfloat16)
    with torch.no_grad():
        hf.gate.weight.copy_(ours.router.weight)
        hf.experts.gate_up_proj.copy_(ours.experts.gate_up_proj)
        hf.experts.down_proj.copy_(ours.experts.down_proj)
    out["hf_grouped_mm"] = (hf, lambda x: _output(hf(x)))
    return out


def step_fn(module, call, x, grad):
    def step():
        module.zero_grad(set_to_none=True)
        call(x).backward(grad)
        torch.cuda.synchronize()

    return step


def run(configs, repeats: int) -> dict:
    rows = []
    for T, D, F, E, k in configs:
        impls = build(T, D, F, E, k)
        error = impls.pop("megablocks_error", (None, None))[1]
        gen = torch.Generator(device="cuda").manual_seed(1)
        x = torch.randn(1, T, D, device="cuda", dtype=torch.bfloat16, generator=gen)
        grad = torch.randn_like(x)
        with torch.no_grad():
            ref = impls["echomoe_grouped_mm"][1](x).float()
            parity = {}
            for name, (_, call) in impls.items():
                y = call(x).float().reshape(ref.shape)
                diff = float((y - ref).abs().max())
                parity[name] = {"max_abs": diff, "max_rel": diff / float(ref.abs().max())}
        timing = time_interleaved({n: step_fn(m, c, x, grad) for n, (m, c) in impls.items()},
                                  repeats=repeats, warmup=3)
        rows.append({"T": T, "D": D, "F": F, "E": E, "k": k, "parity": parity,
                     "time": timing, "megablocks_error": error,
                     "megablocks_parity_ok": ("megablocks" in parity
                                              and parity["megablocks"]["max_rel"] < PARITY_TOL)})
    return {"environment": environment(), "dtype": "bfloat16", "rows": rows,
            "device": torch.cuda.get_device_name()}


def table(result: dict) -> str:
    names = ["megablocks", "echomoe_grouped_mm", "hf_grouped_mm"]
    body = []
    for r in result["rows"]:
        times = [r["time"][n]["median_ms"] if n in r["time"] else "n/a" for n in names]
        mb = r["parity"].get("megablocks", {}).get("max_rel", "n/a")
        body.append([f"T{r['T']} D{r['D']} F{r['F']} E{r['E']} k{r['k']}", *times, mb])
    return markdown_table(["config", *(f"{n} ms" for n in names), "megablocks rel. err"], body)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="results/gpu_moe.json")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="one small configuration")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_moe: no CUDA GPU on this machine; MegaBlocks needs one. Nothing to "
              "benchmark (on CPU use experiments/benchmarks/moe_layer.py).")
        write_json(args.out, {"skipped": "no CUDA GPU", "environment": environment()})
        return 0
    configs = CONFIGS[-1:] if args.quick else CONFIGS
    result = run(configs, args.repeats)
    for r in result["rows"]:
        if r["megablocks_error"]:
            print(f"megablocks unavailable: {r['megablocks_error']}")
    publish(result, table(result), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
