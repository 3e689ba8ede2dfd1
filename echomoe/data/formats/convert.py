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
``test`` and saved with ``save_to_disk`` (images embedded, lossless), so an experiment reads them
with ``data.source: disk``.  Bad records are skipped by default and *listed* in the report
(file, record, error, reason); ``strict=True`` stops at the first one instead.
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

__all__ = ["LOADERS", "convert", "format_report", "load_source"]

LOADERS: dict[str, Callable[..., LoadResult]] = {
    "busi": load_busi,
    "dicom": load_dicom,
    "echovlm": load_echovlm_json,
    "fmuia": load_fmuia_csv,
    "hc18": load_hc18,
    "jsonl": load_jsonl,
}
"""Format name -> loader (each takes the source path first and ``strict``)."""


def load_source(fmt: str, source: str | Path, *, strict: bool = False,
                **options: Any) -> LoadResult:
    """Load ``source`` with the loader of ``fmt``; ``options`` go to the loader (``region``,
    ``image_root``, ``crop_region``, ...) and must be ones it takes.

    Raises:
        ValueError: an unknown format, or an option the format's loader does not take.
        FileNotFoundError: ``source`` does not exist.
    """
    if fmt not in LOADERS:
        raise ValueError(f"unknown format {fmt!r}; valid: {', '.join(LOADERS)}")
    if not Path(source).exists():
        raise FileNotFoundError(f"{fmt} source {str(source)!r} does not exist")
    loader = LOADERS[fmt]
    accepted = inspect.signature(loader).parameters
    given = {k: v for k, v in options.items() if v is not None}
    unknown = sorted(set(given) - set(accepted))
    if unknown:
        takes = sorted(set(accepted) - {"strict"} - {next(iter(accepted))})
        raise ValueError(f"the {fmt} loader does not take {', '.join(unknown)}; it takes "
                         f"{', '.join(takes) or 'no options'}")
    return loader(source, strict=strict, **given)


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
    from echomoe.data.synthetic.generate import split_indices
    from echomoe.data.tasks import TASKS, supported_tasks

    result = load_source(fmt, source, strict=strict, **options)
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
    parts = split_indices(result.samples)
    dataset = DatasetDict({name: to_hf_dataset([result.samples[i] for i in idx])
                           for name, idx in parts.items()})
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
