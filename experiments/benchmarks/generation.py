"""Conditional image generation: a VLM-conditioned flow-matching head, scored by a segmenter.

For each variant, :func:`echomoe.generation.recipe.run_generation` trains an
:class:`~echomoe.generation.model.ImageGenerator` on the synthetic benchmark's training cases
(request: region + report, plus the lesion mask unless ``--no-mask``), generates the test
cases' images and scores them with a segmenter trained on the real images: Dice against the
requested lesion mask, lesion-presence agreement and the Fréchet feature distance, beside the
``real`` (the cases' own images) and ``shuffled`` (other cases' images) reference rows.

    python experiments/benchmarks/generation.py --out results/generation.json
    # larger: --image-size 64 --n 1000 --steps 3000 --width 32 --variants dense moe_region_hard
"""

from __future__ import annotations

import argparse

from echomoe.generation.recipe import run_generation
from echomoe.models.builders import PRESETS, VARIANTS
from echomoe.utils.benchmark import environment, markdown_table, publish


def table(payload: dict) -> str:
    rows = []
    for result in payload["results"]:
        for row in ("generated", "real", "shuffled"):
            s = result["report"][row]
            rows.append([result["variant"], row, f"{s['dice']:.3f}", f"{s['presence']:.3f}",
                         f"{s['feature_distance']:.2f}"])
    return markdown_table(["variant", "images", "Dice (requested lesion)", "presence agreement",
                           "feature distance"], rows)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", choices=list(PRESETS))
    parser.add_argument("--variants", nargs="+", default=["dense", "moe_region_hard"],
                        choices=list(VARIANTS))
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--segmenter-steps", type=int, default=400)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--no-mask", action="store_true", help="condition on the request only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/generation.json")
    args = parser.parse_args(argv)
    results = [run_generation(preset=args.preset, variant=v, n=args.n,
                              image_size=args.image_size, steps=args.steps, width=args.width,
                              mask=not args.no_mask, sample_steps=args.sample_steps,
                              segmenter_steps=args.segmenter_steps, seed=args.seed)
               for v in args.variants]
    payload = {"benchmark": "generation", "environment": environment(), "results": results}
    publish(payload, table(payload), args.out)
    return payload


if __name__ == "__main__":
    main()
