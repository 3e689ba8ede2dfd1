"""Any supported source -> the canonical ``datasets.DatasetDict``, with a report of what was
loaded and what was skipped (``echomoe data``).

::

    from echomoe.data.formats.convert import convert

    report = convert("busi", "Dataset_BUSI_with_GT", "data/busi")
    report = convert("dicom", "exports/", "data/liver", region="liver")
    report = convert("echovlm", "echovlm.json", "data/echo", image_root="images/")
    print(format_report(report))

The samples are split region-stratified (80 / 10 / 10, as the synthetic benchmark:
:func:`~echomoe.data.synthetic.generate.split_indices`) into ``train`` / ``validation`` /
``test`` (UltraBench's own patient-disjoint splits are kept as they are) and saved with
``save_to_disk`` (images embedded, lossless), so an experiment reads them with
``data.source: disk``.  Bad records are skipped by default and *listed* in the report (file,
record, error, reason); ``strict=True`` stops at the first one instead.
"""

from __future__ import annotations

import inspect
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from echomoe.data.formats.busi import load_busi
from echomoe.data.formats.dicom import load_dicom
from echomoe.data.formats.echovlm import load_echovlm_json
from echomoe.data.formats.errors import LoadResult
from echomoe.data.formats.fmuia import load_fmuia_csv
from echomoe.data.formats.hc18 import load_hc18
from echomoe.data.formats.jsonl import load_jsonl
from echomoe.data.formats.ultrabench import SPLITS, load_ultrabench, load_ultrabench_splits

__all__ = ["LOADERS", "convert", "format_report", "load_source"]

LOADERS: dict[str, Callable[..., LoadResult]] = {
    "busi": load_busi,
    "dicom": load_dicom,
    "echovlm": load_echovlm_json,
    "fmuia": load_fmuia_csv,
    "hc18": load_hc18,
    "jsonl": load_jsonl,
    "ultrabench": load_ultrabench,
}
"""Format name -> loader (each takes the source path first and ``strict``)."""


def _options(fmt: str, source: str | Path, options: dict[str, Any]) -> dict[str, Any]:
    """The ``options`` that are set, checked against the loader of ``fmt``."""
    if fmt not in LOADERS:
        raise ValueError(f"unknown format {fmt!r}; valid: {', '.join(LOADERS)}")
    if not Path(source).exists():
        raise FileNotFoundError(f"{fmt} source {str(source)!r} does not exist")
    accepted = list(inspect.signature(LOADERS[fmt]).parameters)
    given = {k: v for k, v in options.items() if v is not None}
    unknown = sorted(set(given) - set(accepted))
    if unknown:
        takes = [k for k in accepted[1:] if k != "strict"]
        raise ValueError(f"the {fmt} loader does not take {', '.join(unknown)}; it takes "
                         f"{', '.join(takes) or 'no options'}")
    return given


def load_source(fmt: str, source: str | Path, *, strict: bool = False,
                **options: Any) -> LoadResult:
    """Load ``source`` with the loader of ``fmt``; ``options`` go to the loader (``region``,
    ``image_root``, ``crop_region``, ...; ``None`` values are left out) and must be ones it
    takes.

    Raises:
        ValueError: an unknown format, or an option the format's loader does not take.
        FileNotFoundError: ``source`` does not exist.
    """
    given = _options(fmt, source, options)
    return LOADERS[fmt](source, strict=strict, **given)


def _splits(fmt: str, source, strict: bool, options: dict[str, Any]):
    """``(all samples as one LoadResult, {split: samples})``: UltraBench's own splits, else a
    region-stratified 80 / 10 / 10 split."""
    from echomoe.data.synthetic.generate import split_indices

    if fmt == "ultrabench":
        _options(fmt, source, options)
        by_split = load_ultrabench_splits(source, strict)
        result = LoadResult()
        for part in by_split.values():
            result.samples += part.samples
            result.skipped += part.skipped
        return result, {name: by_split[name].samples for name in SPLITS}
    result = load_source(fmt, source, strict=strict, **options)
    parts = split_indices(result.samples) if result.samples else {}
    return result, {name: [result.samples[i] for i in idx] for name, idx in parts.items()}


def convert(fmt: str, source: str | Path, out: str | Path, *, strict: bool = False,
            **options: Any) -> dict[str, Any]:
    """Load ``source`` (:func:`load_source`), split it and save the ``DatasetDict`` to ``out``.

    Returns:
        The report: ``{"format", "source", "out", "loaded", "skipped": [{"file", "record",
        "line", "error", "reason"}], "regions": {region: n}, "tasks": {task: n samples that
        support it}, "splits": {split: n}}``.

    Raises:
        ValueError: nothing was loaded (the report of what was skipped is in the message).
    """
    from datasets import DatasetDict

    from echomoe.data.schema import to_hf_dataset
    from echomoe.data.tasks import TASKS, supported_tasks

    result, splits = _splits(fmt, source, strict, options)
    report: dict[str, Any] = {
        "format": fmt, "source": str(source), "out": str(out), "loaded": len(result),
        "skipped": [{"file": s.file, "record": s.record, "line": s.line, "error": s.error,
                     "reason": s.reason} for s in result.skipped],
        "regions": dict(sorted(Counter(s.region for s in result).items())),
        "tasks": {t: sum(t in supported_tasks(s) for s in result) for t in TASKS},
    }
    if not result.samples:
        raise ValueError(f"nothing to convert: {fmt} source {str(source)!r} gave no sample\n"
                         + format_report(report))
    dataset = DatasetDict({name: to_hf_dataset(samples) for name, samples in splits.items()})
    dataset.save_to_disk(str(out))
    report["splits"] = {name: len(split) for name, split in dataset.items()}
    return report


def format_report(report: dict[str, Any]) -> str:
    """The report of :func:`convert` as a few readable lines."""
    lines = [f"{report['format']} {report['source']}: loaded {report['loaded']}, skipped "
             f"{len(report['skipped'])}"]
    for s in report["skipped"]:
        where = s["file"] + (f":{s['line']}" if s["line"] is not None else "")
        if s["record"] is not None:
            where += f": record {s['record']!r}"
        lines.append(f"  skipped {where}: {s['error']}: {s['reason']}")
    lines.append("regions: " + (", ".join(f"{r} {n}" for r, n in report["regions"].items())
                                or "none"))
    lines.append("tasks:   " + ", ".join(f"{t} {n}" for t, n in report["tasks"].items()))
    if "splits" in report:
        lines.append("splits:  " + ", ".join(f"{s} {n}" for s, n in report["splits"].items())
                     + f" -> {report['out']}")
    return "\n".join(lines)
