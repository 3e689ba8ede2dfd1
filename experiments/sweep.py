"""Run a sweep: expand the grid, train every run not finished yet, write the results tables.

::

    python experiments/sweep.py configs/sweeps/demo.yaml                 # run + tables
    python experiments/sweep.py configs/sweeps/dense_vs_moe.yaml --dry-run
    python experiments/sweep.py configs/sweeps/dense_vs_moe.yaml --only 'report-*-seed0'
    python experiments/sweep.py configs/sweeps/demo.yaml --tables-only   # tables from summaries
    python experiments/sweep.py configs/sweeps/demo.yaml --emit-wandb runs/demo/wandb_sweep.yaml

Finished runs (``<out>/<run>/summary.json`` with ``"status": "finished"``) are skipped, so the
command resumes an interrupted sweep.  Into ``--out`` (default: the sweep's ``output_dir``) it
writes ``results.csv``, ``results.md`` and ``plots/<metric>.png``.  ``--emit-wandb`` writes the
equivalent W&B grid sweep YAML (one per named-axis label combination) and runs nothing.
Exit status: 0, 1 when a run failed or the sweep file is invalid, 3 when a run was interrupted
(SIGTERM / SIGINT; its checkpoint is saved and the same command resumes it).  See
:mod:`echomoe.train.sweep`.
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    """The command-line arguments (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("sweep", help="sweep YAML (configs/sweeps/*.yaml)")
    p.add_argument("--out", default=None, help="parent directory of the runs and the tables "
                   "(default: the sweep's output_dir)")
    p.add_argument("--only", nargs="+", default=None, metavar="NAME",
                   help="run only these runs (names or shell patterns)")
    p.add_argument("--dry-run", action="store_true", help="list the runs and their status")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="train N runs at a time, one process each with cpu_count // N torch "
                   "threads (default: 1, in this process)")
    p.add_argument("--emit-wandb", default=None, metavar="PATH",
                   help="write the equivalent W&B sweep YAML to PATH and exit")
    p.add_argument("--tables-only", action="store_true",
                   help="run nothing; write the tables from the existing summaries")
    return p


def main(argv: list[str] | None = None, run_fn=None) -> int:
    """Entry point; ``run_fn`` is passed to :func:`~echomoe.train.sweep.run_sweep` (tests)."""
    args = build_parser().parse_args(argv)
    from echomoe.config import ConfigError, read_sweep
    from echomoe.train.sweep import (
        results_markdown,
        run_sweep,
        sweep_group_by,
        sweep_results,
        write_results,
        write_wandb_sweep,
    )

    try:
        if args.emit_wandb:
            for path in write_wandb_sweep(args.sweep, args.emit_wandb):
                print(f"wrote {path}  (wandb sweep {path}; wandb agent <sweep id>)")
            return 0
        failed, interrupted = [], []
        if not args.tables_only:
            runs = run_sweep(args.sweep, out_dir=args.out, run_fn=run_fn, only=args.only,
                             dry_run=args.dry_run, jobs=args.jobs)
            if args.dry_run:
                done = sum(r["status"] == "finished" for r in runs)
                print(f"{len(runs)} runs, {done} finished, {len(runs) - done} to run")
                return 0
            failed = [r["run"] for r in runs if r.get("status") not in ("finished",
                                                                         "interrupted")]
            interrupted = [r["run"] for r in runs if r.get("status") == "interrupted"]
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    out = args.out if args.out is not None else read_sweep(args.sweep).output_dir
    summaries = sweep_results(args.sweep, out)
    group_by = sweep_group_by(args.sweep)
    written = write_results(summaries, out, group_by=group_by)
    print(results_markdown(summaries, group_by=group_by))
    print(f"wrote {written['csv']}, {written['markdown']} and {len(written['plots'])} plots")
    offline = [s["wandb_dir"] for s in summaries if s.get("wandb_dir")]
    if offline:
        print("W&B runs (offline ones upload with `wandb sync <dir>`):")
        print("\n".join(f"  {d}" for d in offline))
    if failed:
        print(f"{len(failed)} runs failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    if interrupted:
        from echomoe.train.loop import EXIT_INTERRUPTED

        print(f"{len(interrupted)} runs interrupted (checkpoints saved; rerun to resume): "
              f"{', '.join(interrupted)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
