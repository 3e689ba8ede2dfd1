"""Train one experiment: ``python experiments/train.py CONFIG.yaml [key=value ...]``.

Example (a smoke run)::

    python experiments/train.py configs/experiments/multitask.yaml train.steps=3 data.n=16 \\
        eval.num_samples=4 eval.max_new_tokens=4 logging.mode=disabled output_dir=/tmp/run

Loads and validates the config (:func:`echomoe.config.load_config`), then runs
:func:`echomoe.train.experiment.run_experiment` (data -> model -> train -> evaluate -> save) and
prints the summary and where the logs / W&B offline run are.

Several processes (see the README, "Scaling out")::

    torchrun --nproc_per_node 2 experiments/train.py CONFIG.yaml [key=value ...]
    python experiments/train.py CONFIG.yaml deepspeed=configs/deepspeed/zero2.json
"""

from __future__ import annotations

import json
import sys


def main(argv=None) -> int:
    """Command-line entry point; returns the exit status."""
    from echomoe.config import ConfigError, load_config
    from echomoe.train.experiment import run_experiment
    from echomoe.train.loop import EXIT_INTERRUPTED

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    try:
        cfg = load_config(argv[0], argv[1:])
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    summary = run_experiment(cfg)
    from echomoe.distributed import world_info

    if not world_info().is_main:  # the other ranks of a torchrun job stay quiet
        return 0
    print(json.dumps(summary["metrics"], indent=2))
    print(f"summary: {summary['output_dir']}/summary.json; model: {summary['model_dir']}")
    print(summary["where"])
    if summary.get("status") == "interrupted":
        print("interrupted: a checkpoint is saved; run the same command to resume",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
