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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="echomoe",
        description="Mixture-of-experts ultrasound vision-language models, routed by anatomy.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="print versions, routers and MoE backends available here")
    info.set_defaults(func=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
