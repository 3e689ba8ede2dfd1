"""Evaluate a model on every task: metrics JSON + markdown tables + routing heatmap.

A trained checkpoint on a saved benchmark split::

    echomoe synth --out data/synth --n 2000
    python experiments/evaluate.py --checkpoint runs/tiny --data data/synth --split test \\
        --out runs/tiny/eval

A random-init smoke run (no files needed)::

    python experiments/evaluate.py --preset tiny --variant moe_region_hard --synthetic 8 \\
        --max-new-tokens 8 --out /tmp/eval

Writes into ``--out``: ``metrics.json`` (overall / per task / per region metrics, routing report,
settings), ``records.jsonl`` (one row per example), ``metrics.md`` and, for MoE models,
``routing.png`` (region x expert heatmap per layer).  See :mod:`echomoe.metrics.harness`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from echomoe.data.tasks import TASKS


def build_parser() -> argparse.ArgumentParser:
    """The command-line arguments (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", help="local directory with a saved model + processor")
    model.add_argument("--preset", help="random-init model of this preset (smoke runs)")
    parser.add_argument("--variant", default="moe_region_hard",
                        help="model variant with --preset (default: moe_region_hard)")
    parser.add_argument("--corpus-samples", type=int, default=200,
                        help="synthetic cases for the tokenizer trained with --preset")
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--data", help="DatasetDict (or Dataset) saved by `echomoe synth`")
    data.add_argument("--synthetic", type=int, metavar="N", help="generate N synthetic cases")
    parser.add_argument("--split", default="test", help="split of --data (default: test)")
    parser.add_argument("--image-size", type=int, default=128,
                        help="image side of --synthetic cases (default: 128)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N samples")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS,
                        metavar="TASK", help=f"tasks to run (default: all of {', '.join(TASKS)})")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0, help="prompt / synthetic-data seed")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--regions", choices=("predicted", "given"), default="predicted",
                        help="route with the region the model predicts (default, fair) or with "
                             "each sample's true region (the oracle)")
    parser.add_argument("--language", choices=("auto", "en", "zh"), default="auto",
                        help="text-metric tokenisation: zh = CJK character level; auto = zh "
                        "when a reference has CJK ideographs (default)")
    parser.add_argument("--closed", choices=("rank", "generate"), default="rank",
                        help="answer closed questions and diagnoses with the most likely option "
                             "(default) or with the free generation")
    parser.add_argument("--report-samples", type=int, default=1,
                        help="1: greedy reports (default); N > 1: minimum-Bayes-risk decoding, "
                             "the consensus of N sampled reports")
    parser.add_argument("--report-temperature", type=float, default=1.0,
                        help="sampling temperature of those reports (default: 1)")
    parser.add_argument("--report-pool", metavar="SPLIT", default=None,
                        help="with --report-samples > 1: also consider the reports of this "
                             "split of --data (e.g. train) as minimum-Bayes-risk hypotheses")
    parser.add_argument("--measure", choices=("keypoints", "mask"), default="keypoints",
                        help="lesion calipers from the [KPT] head (default) or from the "
                             "outline of the lesion the model segments")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--out", required=True, help="output directory")
    return parser


def load_model_and_processor(args: argparse.Namespace):
    """``(model, processor)`` from ``--checkpoint`` (local only) or ``--preset/--variant``."""
    from echomoe.models import EchoMoEProcessor, build_model, build_processor

    if args.checkpoint:
        from echomoe.models.modeling import EchoMoEForConditionalGeneration

        path = Path(args.checkpoint)
        if not path.is_dir():
            raise SystemExit(f"--checkpoint {path}: not a local directory (echomoe never "
                             "downloads; save one with model.save_pretrained + "
                             "processor.save_pretrained)")
        model = EchoMoEForConditionalGeneration.from_pretrained(path, local_files_only=True)
        return model, EchoMoEProcessor.from_pretrained(path)
    model = build_model(args.preset, args.variant)
    return model, build_processor(args.preset, num_samples=args.corpus_samples,
                                  config=model.config)


def load_samples(args: argparse.Namespace):
    """The samples to evaluate: a split of ``--data`` or ``--synthetic N`` fresh cases."""
    if args.synthetic is not None:
        from echomoe.data.synthetic.generate import SyntheticConfig, generate

        samples = generate(args.synthetic, args.seed, SyntheticConfig(image_size=args.image_size))
    else:
        samples = load_split(args.data, args.split, args.limit)
    return samples[: args.limit] if args.limit is not None else samples


def load_split(path: str, split: str, limit: int | None = None):
    """The first ``limit`` samples (all: ``None``) of ``split`` of the dataset saved at ``path``
    (a ``DatasetDict``; a single ``Dataset`` is taken as it is)."""
    from datasets import DatasetDict, load_from_disk

    from echomoe.data.schema import from_hf_dataset

    data = load_from_disk(str(path))
    if isinstance(data, DatasetDict):
        if split not in data:
            raise SystemExit(f"--data {path} has no split {split!r}; splits: {', '.join(data)}")
        data = data[split]
    if limit is not None:
        data = data.select(range(min(limit, len(data))))
    return from_hf_dataset(data)


def main(argv: list[str] | None = None) -> int:
    """Run the evaluation; prints a JSON summary (output paths + overall metrics)."""
    args = build_parser().parse_args(argv)
    from echomoe.metrics.harness import evaluate_model, report_texts, write_results
    from echomoe.metrics.routing import routing_heatmap

    model, processor = load_model_and_processor(args)
    model.to(args.device)
    samples = load_samples(args)
    pool = None
    if args.report_pool is not None:
        if args.data is None:
            raise SystemExit("--report-pool needs --data (the pool is a split of it)")
        pool = report_texts(load_split(args.data, args.report_pool))
    result = evaluate_model(
        model, processor, samples, tasks=args.tasks, batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens, progress=not args.no_progress, seed=args.seed,
        regions=args.regions, closed=args.closed, language=args.language,
        report_samples=args.report_samples, report_temperature=args.report_temperature,
        measure=args.measure, report_pool=pool,
    )
    result.settings["model"] = args.checkpoint or f"{args.preset}/{args.variant}"
    result.settings["data"] = args.data or f"synthetic:{args.synthetic}"
    paths = write_results(result, args.out)
    if result.routing:
        paths["heatmap"] = Path(args.out) / "routing.png"
        routing_heatmap(result.routing, processor.regions, paths["heatmap"],
                        title=result.settings["model"])
    summary = {"paths": {k: str(v) for k, v in paths.items()},
               "overall": {k: (v if v == v else None)
                           for k, v in result.metrics["overall"].items()}}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
