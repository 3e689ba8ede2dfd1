"""How visible the synthetic benchmark's lesions are: contrast-to-noise ratio and area, per
region and per diagnosis.

For each case with a non-empty ``lesion`` mask, :func:`echomoe.data.pixels.contrast_to_noise`
of the first image against the organ tissue within 3 pixels of the lesion; the table gives the
median and lower quartile per group and the median lesion area in pixels.  A region whose
lesions are both faint and small is one where segmentation and calipers are expected to fail.

    python experiments/benchmarks/lesion_contrast.py --n 2000 --image-size 64
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import numpy as np

from echomoe.data.pixels import contrast_to_noise
from echomoe.data.synthetic.generate import SyntheticConfig, generate
from echomoe.utils.benchmark import environment, markdown_table, publish


def _lesion_stats(sample, margin: int) -> tuple[float, int] | None:
    lesion = sample.masks.get("lesion")
    if lesion is None or not (mask := np.asarray(lesion) > 0).any():
        return None
    organ = sample.masks.get("organ")
    within = None if organ is None else np.asarray(organ) > 0
    image = np.asarray(sample.image_array(0), dtype=np.float64)
    if image.ndim == 3:
        image = image.mean(axis=2)
    return contrast_to_noise(image, mask, within, margin), int(mask.sum())


def run(n: int, seed: int, image_size: int, margin: int = 3, num_proc: int = 1) -> dict:
    samples = generate(n, seed, SyntheticConfig(image_size=image_size), num_proc=num_proc)
    groups: dict[str, list[tuple[float, int]]] = defaultdict(list)
    for sample in samples:
        stats = _lesion_stats(sample, margin)
        if stats is not None and np.isfinite(stats[0]):
            groups[sample.region].append(stats)
            groups[f"{sample.region} / {sample.diagnosis}"].append(stats)
    rows = {}
    for group in sorted(groups):
        cnr = np.array([c for c, _ in groups[group]])
        area = np.array([a for _, a in groups[group]])
        rows[group] = {"n": len(cnr), "cnr_median": float(np.median(cnr)),
                       "cnr_q25": float(np.quantile(cnr, 0.25)),
                       "area_median_px": float(np.median(area))}
    return {"n": n, "seed": seed, "image_size": image_size, "margin": margin, "groups": rows,
            "environment": environment()}


def table(payload: dict) -> str:
    rows = [[group, r["n"], r["cnr_median"], r["cnr_q25"], r["area_median_px"]]
            for group, r in payload["groups"].items()]
    return markdown_table(["group", "lesions", "CNR median", "CNR q25", "area median (px)"],
                          rows)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="results/lesion_contrast.json", help="JSON output path")
    parser.add_argument("--n", type=int, default=2000, help="synthetic cases")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--margin", type=int, default=3, help="background ring width (px)")
    parser.add_argument("--num-proc", type=int, default=1)
    args = parser.parse_args(argv)
    payload = run(args.n, args.seed, args.image_size, args.margin, args.num_proc)
    publish(payload, table(payload), args.out)
    return payload


if __name__ == "__main__":
    main()
