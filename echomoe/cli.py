"""The ``echomoe`` command line: ``echomoe {info,synth,data,config,train,compare} ...``.

Each subcommand is a thin wrapper around a library function, so everything it does can also be
done from Python:

* ``info`` -- versions, routers (:data:`echomoe.moe.ROUTERS`) and MoE backends available here;
* ``synth`` -- :func:`echomoe.data.synthetic.generate.build_dataset_dict` + ``save_preview``;
* ``data`` -- :func:`echomoe.data.formats.convert.convert` (a real source -> ``DatasetDict``);
* ``config`` -- :func:`echomoe.config.main` (validate and print an experiment or a sweep);
* ``train`` -- :func:`echomoe.config.load_config` + :func:`echomoe.train.experiment.run_experiment`;
* ``compare`` -- :func:`echomoe.train.sweep.collect_results` +
  :func:`echomoe.train.comparison.comparison_markdown` (finished runs of any sweeps, one table).

Sweeps, evaluation and benchmarks have their own scripts (``experiments/sweep.py``,
``experiments/evaluate.py``, ``experiments/benchmarks/``).  Heavy modules (datasets, wandb,
matplotlib) are imported by the subcommand that needs them, so ``echomoe --help`` is fast.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap

EPILOG = """\
examples:
  echomoe info
  echomoe synth --out data/synth --n 2000 --seed 0
  echomoe synth --out data/thyroid --n 200 --regions thyroid breast --image-size 64
  echomoe data busi Dataset_BUSI_with_GT --out data/busi
  echomoe data dicom exports/ --out data/liver --region liver --crop-region
  echomoe config configs/experiments/report.yaml model.variant=moe_region_soft
  echomoe config configs/sweeps/demo.yaml
  echomoe train configs/experiments/multitask.yaml model.variant=moe_region_hard train.steps=200
  echomoe compare results/demo results/demo_modality --reference moe_topk

more:
  python experiments/sweep.py configs/sweeps/demo.yaml --out results/demo   (what `make demo` runs)
  python experiments/evaluate.py --checkpoint runs/<run>/model --data data/synth --out eval/
  echomoe <command> --help
"""


def _info(args: argparse.Namespace) -> int:
    import torch

    if args.plan:
        from echomoe.models.builders import build_config
        from echomoe.models.plan import plan

        try:
            overrides = {}
            if args.text_config:
                try:
                    overrides["text_config"] = json.loads(args.text_config)
                except json.JSONDecodeError as err:
                    raise ValueError(f"--text-config is not valid JSON: {err}") from None
            result = plan(build_config(args.preset, args.variant, **overrides),
                          gpus=args.gpus, zero=args.zero, ep=args.ep, dtype=args.dtype,
                          micro_batch=args.micro_batch, seq_len=args.seq_len,
                          checkpointing=not args.no_checkpointing)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        print(json.dumps(result, indent=2))
        return 0

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


def _data(args: argparse.Namespace) -> int:
    from echomoe.data.formats import FormatError
    from echomoe.data.formats.convert import convert, format_report

    options = {"region": args.region, "diagnosis": args.diagnosis,
               "image_root": args.image_root, "crop_region": args.crop_region or None}
    try:
        report = convert(args.format, args.source, args.out, strict=args.strict, **options)
    except (FormatError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2, ensure_ascii=False) if args.json
          else format_report(report))
    return 0


def _config(args: argparse.Namespace) -> int:
    from echomoe.config import main as config_main

    return config_main([args.file, *args.overrides])


def _compare(args: argparse.Namespace) -> int:
    from pathlib import Path

    from echomoe.train.comparison import comparison_markdown, run_label
    from echomoe.train.sweep import collect_results

    runs, seen = [], set()
    for source in args.runs:
        found = collect_results(source)
        if not found:
            print(f"error: {source}: no finished run (no summary.json in it or its "
                  "sub-directories)", file=sys.stderr)
            return 1
        for run in found:  # a run named twice (itself and its folder) counts once
            key = Path(run["run_dir"]).resolve()
            if key not in seen:
                seen.add(key)
                runs.append(run)
    labels = sorted({run_label(r) for r in runs})
    if args.variants:
        missing = sorted(set(args.variants) - set(labels))
        if missing:
            print(f"error: no runs of {', '.join(missing)}; found: {', '.join(labels)}",
                  file=sys.stderr)
            return 1
        runs = [r for r in runs if run_label(r) in args.variants]
    if args.reference not in {run_label(r) for r in runs}:
        print(f"error: reference {args.reference!r} has no runs; found: {', '.join(labels)}",
              file=sys.stderr)
        return 1
    text = "# Comparison\n\n" + comparison_markdown(runs, reference=args.reference,
                                                     num_resamples=args.resamples)
    if args.out:
        Path(args.out).write_text(text + "\n")
        print(f"wrote {args.out} ({len(runs)} runs)")
    else:
        print(text)
    return 0


def _train(args: argparse.Namespace) -> int:
    from echomoe.config import ConfigError, load_config
    from echomoe.train.experiment import run_experiment

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    summary = run_experiment(cfg, progress=not args.no_progress)
    print(json.dumps(summary["metrics"], indent=2))
    print(f"summary: {summary['output_dir']}/summary.json; model: {summary['model_dir']}")
    if summary.get("where"):
        print(summary["where"])
    if summary.get("status") == "interrupted":
        from echomoe.train.loop import EXIT_INTERRUPTED

        print("interrupted: a checkpoint is saved; run the same command to resume",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0 if summary.get("status") == "finished" else 1


def _wrap(text: str) -> str:
    return textwrap.fill(" ".join(text.split()), width=79)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ``echomoe`` argument parser: one sub-parser per subcommand, each with its handler
    stored as the ``func`` default (``args.func(args)`` returns the exit status)."""
    from echomoe import __version__
    from echomoe.data.schema import REGIONS

    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="echomoe",
        description="Mixture-of-experts ultrasound vision-language models, routed by anatomy.",
        epilog=EPILOG,
        formatter_class=formatter,
    )
    parser.add_argument("--version", action="version", version=f"echomoe {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = sub.add_parser(
        "info", help="print versions, routers and MoE backends available here (JSON)",
        description=_wrap(
            "Print the echomoe and torch versions, whether CUDA is available, and the "
            "registered routers and MoE dispatch backends, as JSON. With --plan: the "
            "parameters (total / active / router / expert) of a preset x variant and its "
            "per-GPU training memory under DeepSpeed ZeRO x expert parallelism "
            "(echomoe.models.plan), as JSON."))
    info.add_argument("--plan", action="store_true", help="plan a training run instead")
    info.add_argument("--preset", default="small", help="model preset (default: small)")
    info.add_argument("--variant", default="dense", help="model variant (default: dense)")
    info.add_argument("--text-config", metavar="JSON",
                      help='LM config overrides, e.g. \'{"hidden_size": 1536, ...}\'')
    info.add_argument("--gpus", type=int, default=1, help="GPUs (default: 1)")
    info.add_argument("--zero", type=int, default=0, help="ZeRO stage 0-3 (default: 0)")
    info.add_argument("--ep", type=int, default=1, help="expert-parallel size (default: 1)")
    info.add_argument("--dtype", default="bf16", help="bf16, fp16 or fp32 (default: bf16)")
    info.add_argument("--micro-batch", type=int, default=1,
                      help="sequences per GPU per step (default: 1)")
    info.add_argument("--seq-len", type=int, default=2048,
                      help="tokens per sequence (default: 2048)")
    info.add_argument("--no-checkpointing", action="store_true",
                      help="estimate activations without activation checkpointing")
    info.set_defaults(func=_info)

    def region(name: str) -> str:
        if name not in REGIONS:
            raise argparse.ArgumentTypeError(
                f"unknown region {name!r}; valid: {', '.join(REGIONS)}")
        return name

    synth = sub.add_parser(
        "synth", help="write the synthetic ultrasound benchmark (DatasetDict + preview.png)",
        description=_wrap(
            "Generate N synthetic ultrasound cases with exact labels (masks, boxes, calipers, "
            "reports, VQA, diagnosis) and save a region-stratified train / validation / test "
            "datasets.DatasetDict (80/10/10) plus a preview.png into DIR.  Cases are "
            "deterministic per (seed, index), whatever --num-proc is."),
        epilog="example:\n  echomoe synth --out data/synth --n 2000 --seed 0 --num-proc 2",
        formatter_class=formatter)
    synth.add_argument("--out", required=True, metavar="DIR",
                       help="output folder (datasets' save_to_disk layout); required")
    synth.add_argument("--n", type=_positive_int, required=True, metavar="N",
                       help="number of cases; required")
    synth.add_argument("--seed", type=int, default=0, help="benchmark seed (default: %(default)s)")
    synth.add_argument("--image-size", type=int, default=128, metavar="PIXELS",
                       help="image side in pixels, >= 32 (default: %(default)s)")
    synth.add_argument("--regions", nargs="+", type=region, default=list(REGIONS),
                       metavar="REGION", help=f"regions to draw (default: all of "
                       f"{', '.join(REGIONS)})")
    synth.add_argument("--num-proc", type=_positive_int, default=1, metavar="N",
                       help="worker processes (default: %(default)s)")
    synth.set_defaults(func=_synth)

    from echomoe.data.formats.convert import LOADERS

    data = sub.add_parser(
        "data", help="convert a real dataset (DICOM, EchoVLM JSON, BUSI, ...) to a DatasetDict",
        description=_wrap(
            "Load SOURCE with the loader of FORMAT, split it region-stratified into train / "
            "validation / test (80/10/10) and save the datasets.DatasetDict into DIR (read it "
            "with data.source: disk).  Prints what was loaded, every skipped record with its "
            "reason, the regions and the tasks the samples support.  Bad records are skipped "
            "and listed unless --strict.  Exit status 1 when nothing could be loaded."),
        epilog="examples:\n"
               "  echomoe data busi Dataset_BUSI_with_GT --out data/busi\n"
               "  echomoe data echovlm echovlm.json --out data/echo --image-root images/\n"
               "  echomoe data dicom exports/ --out data/liver --region liver --crop-region",
        formatter_class=formatter)
    data.add_argument("format", choices=list(LOADERS), metavar="FORMAT",
                      help=f"source format: {', '.join(LOADERS)}")
    data.add_argument("source", metavar="SOURCE", help="the file or folder to load")
    data.add_argument("--out", required=True, metavar="DIR", help="output folder; required")
    data.add_argument("--region", default=None, help="region of records that name none "
                      "(dicom, echovlm; default: inferred or unknown)")
    data.add_argument("--diagnosis", default=None, help="diagnosis of every file (dicom)")
    data.add_argument("--image-root", default=None, metavar="DIR",
                      help="folder image paths are relative to (echovlm; default: the JSON's)")
    data.add_argument("--crop-region", action="store_true",
                      help="crop DICOM frames to the B-mode region (dicom)")
    data.add_argument("--strict", action="store_true",
                      help="stop at the first bad record (default: skip and list it)")
    data.add_argument("--json", action="store_true", help="print the report as JSON")
    data.set_defaults(func=_data)

    config = sub.add_parser(
        "config", help="validate an experiment or sweep YAML and print it resolved",
        description=_wrap(
            "Load an experiment YAML (base files merged, key=value overrides applied), "
            "validate every field and print the resolved config as YAML; for a file under a "
            "'sweeps' folder, print each run's name and overrides instead.  Exit status 1 with "
            "the error (file, key, valid keys) when invalid."),
        epilog="examples:\n"
               "  echomoe config configs/experiments/report.yaml train.lr=5e-4\n"
               "  echomoe config configs/sweeps/dense_vs_moe.yaml",
        formatter_class=formatter)
    config.add_argument("file", metavar="FILE", help="experiment YAML or sweep YAML")
    config.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted overrides, e.g. train.steps=10 (experiment files only; "
                             "default: none)")
    config.set_defaults(func=_config)

    train = sub.add_parser(
        "train", help="train and evaluate one experiment (data -> model -> train -> eval)",
        description=_wrap(
            "Run one experiment end to end: build the data and the model, train, evaluate on "
            "the test split and save into the config's output_dir (config.yaml, checkpoints/, "
            "metrics.jsonl, W&B run, eval/, model/, summary.json).  Prints the overall test "
            "metrics.  Exit status 1 when the config is invalid or the run failed, 3 when it was "
            "interrupted (SIGTERM / SIGINT: a checkpoint is saved; rerun to resume)."),
        epilog="examples:\n"
               "  echomoe train configs/experiments/multitask.yaml\n"
               "  echomoe train configs/experiments/report.yaml model.variant=moe_region_soft \\\n"
               "      train.steps=200 train.seed=1 output_dir=runs/report-soft-1",
        formatter_class=formatter)
    train.add_argument("config", metavar="CONFIG", help="experiment YAML "
                       "(configs/experiments/*.yaml)")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                       help="dotted overrides applied after the file, e.g. train.steps=50 "
                            "(default: none)")
    train.add_argument("--no-progress", action="store_true",
                       help="hide the progress bars (default: shown)")
    train.set_defaults(func=_train)

    compare = sub.add_parser(
        "compare", help="one comparison table (priors, significance, per region) of finished runs",
        description=_wrap(
            "Tabulate the finished runs found in RUN (run directories, or folders of them such "
            "as a sweep's --out) as make demo's comparison.md does: priors, blind, variant and "
            "oracle rows with parameter counts, paired bootstrap CIs of each variant against "
            "the reference and against the per-region prior, and per-region tables.  Runs of "
            "several sweeps with the same data compare side by side.  Exit status 1 when a "
            "folder holds no finished run or the reference has none."),
        epilog="example:\n"
               "  echomoe compare results/demo results/demo_modality --reference moe_topk \\\n"
               "      --variants dense moe_topk moe_modality --out comparison.md",
        formatter_class=formatter)
    compare.add_argument("runs", nargs="+", metavar="RUN",
                         help="run directories or folders of runs (summary.json inside)")
    compare.add_argument("--reference", default="dense",
                         help="the run label differences are taken against (default: dense)")
    compare.add_argument("--variants", nargs="+", metavar="LABEL", default=None,
                         help="only these run labels, e.g. dense 'dense (blind)' (default: all)")
    compare.add_argument("--resamples", type=_positive_int, default=2000, metavar="N",
                         help="bootstrap resamples (default: %(default)s)")
    compare.add_argument("--out", default=None, metavar="FILE",
                         help="write the markdown here (default: print it)")
    compare.set_defaults(func=_compare)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``echomoe`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
