"""Fair side-by-side timing on shared, noisy machines.

Candidates are timed in interleaved rounds (A, B, C, A, B, C, ...), so that a burst of load from
another process hits all of them alike, and reported as medians.  Ratios of medians measured in
one run are the figures worth quoting; absolute times are not stable across runs.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch


def time_interleaved(
    candidates: dict[str, Callable[[], object]],
    repeats: int = 7,
    warmup: int = 2,
    min_seconds: float = 0.0,
) -> dict[str, dict[str, float]]:
    """Run each candidate ``warmup`` times, then interleaved rounds.

    At least ``repeats`` rounds, and more for fast candidates, so that each round set lasts at
    least ``min_seconds`` (estimated from the warm-up).  Returns
    ``{name: {"median_ms", "min_ms", "max_ms", "rounds"}}``.
    """
    round_s = 0.0
    for fn in candidates.values():
        start = time.perf_counter()
        for _ in range(warmup):
            fn()
        round_s += (time.perf_counter() - start) / max(warmup, 1)
    if round_s > 0:
        repeats = max(repeats, int(min_seconds / round_s) + 1)
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - start) * 1e3)
    return {
        name: {
            "median_ms": statistics.median(ts),
            "min_ms": min(ts),
            "max_ms": max(ts),
            "rounds": len(ts),
        }
        for name, ts in samples.items()
    }


def current_rss_mb() -> float:
    """Resident set size of this process now, in MiB (Linux)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (Linux ``clear_refs``); ``False`` where not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak resident set size (``VmHWM``) of this process since start or last reset, in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_in_subprocess(argv: list[str], timeout: float = 600) -> dict:
    """Run ``python argv...`` and parse the JSON object it prints on its last line.

    Used for peak-memory figures, which need a fresh process per candidate.
    """
    proc = subprocess.run(
        [sys.executable, *argv], capture_output=True, text=True, timeout=timeout, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def environment() -> dict[str, object]:
    """Facts that make a benchmark figure interpretable."""
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "cuda": torch.cuda.is_available(),
    }


def write_json(path: str | Path, payload: dict) -> Path:
    """Write ``payload`` as indented JSON, creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def markdown_table(headers: list[str], rows: list[list[object]]) -> str:
    """A GitHub-flavoured Markdown table."""
    def fmt(v: object) -> str:
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
