"""The ``echomoe`` command line."""

from __future__ import annotations

import argparse
import json


def _info(_: argparse.Namespace) -> int:
    import torch

    from echomoe import __version__
    from echomoe.moe import BACKENDS, ROUTERS

    print(json.dumps({
        "echomoe": __version__,
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
        "routers": list(ROUTERS),
        "backends": list(BACKENDS),
    }, indent=2))
    return 0


def _synth(args: argparse.Namespace) -> int:
    from pathlib import Path

    from echomoe.data.synthetic.generate import (
        SyntheticConfig,
        build_dataset_dict,
        generate,
        save_preview,
    )

    config = SyntheticConfig(image_size=args.image_size, regions=tuple(args.regions))
    samples = generate(args.n, args.seed, config, num_proc=args.num_proc)
    dataset = build_dataset_dict(args.n, args.seed, config, samples=samples)
    out = Path(args.out)
    dataset.save_to_disk(str(out))
    preview = save_preview(samples, out / "preview.png")
    sizes = {name: len(split) for name, split in dataset.items()}
    print(json.dumps({"out": str(out), "splits": sizes, "preview": str(preview)}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="echomoe",
        description="Mixture-of-experts ultrasound vision-language models, routed by anatomy.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="print versions, routers and MoE backends available here")
    info.set_defaults(func=_info)

    from echomoe.data.schema import REGIONS

    def region(name: str) -> str:
        if name not in REGIONS:
            raise argparse.ArgumentTypeError(
                f"unknown region {name!r}; valid: {', '.join(REGIONS)}")
        return name

    synth = sub.add_parser(
        "synth", help="write the synthetic ultrasound benchmark (DatasetDict + preview.png)")
    synth.add_argument("--out", required=True, help="output folder (save_to_disk)")
    synth.add_argument("--n", type=int, required=True, help="number of cases")
    synth.add_argument("--seed", type=int, default=0, help="benchmark seed")
    synth.add_argument("--image-size", type=int, default=128, help="image side in pixels")
    synth.add_argument("--regions", nargs="+", type=region, default=list(REGIONS),
                       metavar="REGION", help=f"regions to draw (default: all of "
                       f"{', '.join(REGIONS)})")
    synth.add_argument("--num-proc", type=int, default=1, help="worker processes")
    synth.set_defaults(func=_synth)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
