"""Encoder benchmark: which image encoder reads the synthetic diagnoses, at what step time.

Trains each encoder (the demo's sizes: a 2-block ViT with the patch or the convolutional stem,
and the ConvNet) with a mean-pool + linear head on the diagnosis of the synthetic cases at
64 px, all side by side on the same batches (:func:`echomoe.vision.probe.train_side_by_side`),
and reports held-out diagnosis accuracy (ranked among the labels of the case's region, as the
evaluation harness ranks them) against the per-region majority prior, over several seeds,
with the step time relative to the first encoder (median of per-step ratios).

    python experiments/benchmarks/encoders.py --out results/encoders.json
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
import torch

from echomoe.data.synthetic.generate import SyntheticConfig, generate
from echomoe.models.backbone import native_vision_class
from echomoe.utils.benchmark import environment, markdown_table, publish, torch_threads
from echomoe.vision.probe import grouped_accuracy, majority_accuracy, train_side_by_side

ENCODERS = {  # name -> vision_config (the demo's encoder sizes)
    "vit, patch stem": {"kind": "native", "patch_size": 8, "hidden_size": 48, "depth": 2,
                        "num_heads": 4},
    "vit, conv stem 32-32-64": {"kind": "native", "patch_size": 8, "hidden_size": 48,
                                "depth": 2, "num_heads": 4, "stem": "conv",
                                "stem_channels": [32, 32, 64]},
    "convnet 16-32-48": {"kind": "convnet", "widths": [16, 32, 48], "depths": [1, 1, 2]},
}


def _encoder(spec: dict, image_size: int):
    spec = dict(spec)
    return native_vision_class(spec.pop("kind"))(image_size=image_size, in_channels=1, **spec)


def _data(n_train: int, n_test: int, image_size: int, seed: int):
    """Images ``(N, 1, S, S)`` in [0, 1], joint (region, diagnosis) label ids, regions."""
    samples = generate(n_train + n_test, seed, SyntheticConfig(image_size=image_size))
    names = sorted({(s.region, s.diagnosis) for s in samples})
    images = torch.tensor(np.stack([s.images[0] for s in samples]), dtype=torch.float32)
    labels = torch.tensor([names.index((s.region, s.diagnosis)) for s in samples])
    regions = [s.region for s in samples]
    allowed = torch.tensor([[name[0] == r for name in names] for r in regions])
    return images[:, None] / 255.0, labels, regions, allowed, len(names)


def run(encoders: list[str], seeds: list[int], steps: int, n_train: int, n_test: int,
        image_size: int, batch_size: int, lr: float) -> dict:
    images, labels, regions, allowed, num_classes = _data(n_train, n_test, image_size, 0)
    train, test = slice(0, n_train), slice(n_train, n_train + n_test)
    prior = majority_accuracy(labels[train].tolist(), regions[train], labels[test].tolist(),
                              regions[test])
    per_seed: dict[str, list[dict]] = {name: [] for name in encoders}
    for seed in seeds:
        torch.manual_seed(seed)
        models = {name: _encoder(ENCODERS[name], image_size) for name in encoders}
        runs = train_side_by_side(models, images[train], labels[train],
                                  num_classes=num_classes, steps=steps, batch_size=batch_size,
                                  lr=lr, seed=seed)
        first = runs[encoders[0]].step_ms
        for name, probe in runs.items():
            per_seed[name].append({
                "seed": seed, "parameters": probe.parameters,
                "accuracy": grouped_accuracy(probe.model, images[test], labels[test],
                                             allowed[test]),
                "median_step_ms": statistics.median(probe.step_ms),
                "step_time_vs_first": statistics.median(
                    a / b for a, b in zip(probe.step_ms, first, strict=True)),
            })
    results = {}
    for name, rows in per_seed.items():
        accs = [r["accuracy"] for r in rows]
        results[name] = {
            "vision_config": ENCODERS[name], "parameters": rows[0]["parameters"],
            "accuracy_mean": statistics.fmean(accs),
            "accuracy_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "above_prior_seeds": sum(a > prior for a in accs),
            "step_time_vs_first": statistics.median(r["step_time_vs_first"] for r in rows),
            "per_seed": rows,
        }
    return {"benchmark": "encoders", "task": "synthetic diagnosis (ranked within the region)",
            "image_size": image_size, "n_train": n_train, "n_test": n_test, "steps": steps,
            "batch_size": batch_size, "lr": lr, "seeds": seeds, "num_classes": num_classes,
            "prior_region_accuracy": prior, "first": encoders[0], "results": results,
            "environment": environment()}


def table(payload: dict) -> str:
    """The benchmark's Markdown table."""
    n = len(payload["seeds"])
    rows = [[name, r["parameters"], f"{r['accuracy_mean']:.3f} ± {r['accuracy_std']:.3f}",
             f"{r['above_prior_seeds']}/{n}", r["step_time_vs_first"]]
            for name, r in payload["results"].items()]
    rows.append(["per-region majority prior", "-", f"{payload['prior_region_accuracy']:.3f}",
                 "-", "-"])
    text = markdown_table(["encoder", "parameters", f"diagnosis accuracy (mean ± std, {n} "
                           "seeds)", "seeds above prior", f"step time ÷ {payload['first']}"],
                          rows)
    return (f"{text}\n\nMean-pool + linear head trained from scratch, {payload['steps']} steps "
            f"of {payload['batch_size']} at {payload['image_size']} px on "
            f"{payload['n_train']} synthetic cases, scored on {payload['n_test']} others.")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="results/encoders.json", help="JSON output path")
    parser.add_argument("--encoders", nargs="+", default=list(ENCODERS), choices=list(ENCODERS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=1150)
    parser.add_argument("--n-train", type=int, default=1600)
    parser.add_argument("--n-test", type=int, default=200)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1: ratios are stable on a shared machine)")
    args = parser.parse_args(argv)
    with torch_threads(args.threads):
        payload = run(args.encoders, args.seeds, args.steps, args.n_train, args.n_test,
                      args.image_size, args.batch_size, args.lr)
    publish(payload, table(payload), args.out)
    return payload


if __name__ == "__main__":
    main()
