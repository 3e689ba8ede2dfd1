"""Synthetic-data benchmark: cases per second per core, with every label, in one process.

Times :func:`echomoe.data.synthetic.generate.generate` with ``num_proc=1`` (image, masks, boxes,
calipers, attributes, diagnosis, report, VQA) in interleaved rounds, plus its parts (the image
alone; the texts alone) and the HF ``datasets`` conversion, and reports the median rate against
the target of 300 samples/s per core at 128 x 128.

    python experiments/benchmarks/data.py --out results/data.json
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from echomoe.data.schema import to_hf_dataset
from echomoe.data.synthetic import anatomy, phantom
from echomoe.data.synthetic.generate import SyntheticConfig, generate, make_sample
from echomoe.data.synthetic.reports import write_report
from echomoe.data.synthetic.vqa import make_qa
from echomoe.utils.benchmark import environment, markdown_table, publish, time_interleaved

TARGET = 300.0  # samples / s / core at 128 x 128 with all labels


def _images_only(n: int, seed: int, config: SyntheticConfig) -> None:
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        region = config.regions[i % len(config.regions)]
        scene = anatomy.build_scene(region, config.image_size, rng, None)
        phantom.render(scene.echo, phantom.beam_geometry(scene.probe, config.image_size), rng,
                       scene.interfaces, scene.posterior, spacing=scene.spacing)


def run(n: int, seed: int, image_size: int, repeats: int) -> dict:
    config = SyntheticConfig(image_size=image_size)
    samples = generate(n, seed, config)
    pairs = [(s.region, s.attributes) for s in samples]

    def texts() -> None:
        for k, (region, attrs) in enumerate(pairs):
            rng = np.random.default_rng([seed, k, 1])
            write_report(region, attrs, rng)
            make_qa(region, attrs, rng)

    candidates = {
        "generate (all labels)": lambda: generate(n, seed, config, num_proc=1),
        "normal-study images only": lambda: _images_only(n, seed, config),
        "report + VQA only": texts,
        "to_hf_dataset": lambda: to_hf_dataset(samples),
    }
    times = time_interleaved(candidates, repeats=repeats, warmup=1)
    rows = {name: {**t, "samples_per_s": n / (t["median_ms"] / 1e3)} for name, t in times.items()}
    per_region = {}
    for region in config.regions:
        cfg = SyntheticConfig(image_size=image_size, regions=(region,))
        start = time.perf_counter()
        for i in range(n // 4):
            make_sample(i, seed, cfg)
        per_region[region] = (n // 4) / (time.perf_counter() - start)
    rate = rows["generate (all labels)"]["samples_per_s"]
    return {"benchmark": "synthetic_data", "n": n, "seed": seed, "image_size": image_size,
            "num_proc": 1, "samples_per_s_per_core": rate, "target": TARGET,
            "meets_target": rate >= TARGET, "parts": rows,
            "per_region_samples_per_s": per_region, "environment": environment()}


def table(payload: dict) -> str:
    """The benchmark's Markdown tables and verdict."""
    parts = markdown_table(
        ["part", "median ms", "samples/s"],
        [[k, v["median_ms"], v["samples_per_s"]] for k, v in payload["parts"].items()],
    )
    regions = markdown_table(
        ["region", "samples/s"], [[k, v] for k, v in payload["per_region_samples_per_s"].items()]
    )
    verdict = "meets" if payload["meets_target"] else "MISSES"
    size = payload["image_size"]
    return (
        f"{parts}\n\n{regions}\n\n{payload['samples_per_s_per_core']:.0f} samples/s per core at "
        f"{size}x{size} with all labels ({verdict} the target of {payload['target']:.0f})"
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="results/data.json", help="JSON output path")
    parser.add_argument("--n", type=int, default=500, help="cases per timed round")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds")
    args = parser.parse_args(argv)
    payload = run(args.n, args.seed, args.image_size, args.repeats)
    publish(payload, table(payload), args.out)
    return payload


if __name__ == "__main__":
    main()
