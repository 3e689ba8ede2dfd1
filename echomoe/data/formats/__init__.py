"""Real ultrasound dataset formats -> :class:`~echomoe.data.schema.UltrasoundSample`.

Every loader returns a :class:`LoadResult` (iterable over its samples) and takes ``strict``:
``True`` raises the first bad record as a :class:`FormatError` subclass naming the file and the
record; ``False`` skips bad records and lists them in :attr:`LoadResult.skipped`.

* :func:`load_echovlm_json` -- EchoVLM / LLaVA conversation JSON
* :func:`load_dicom` -- DICOM files or folders (:func:`read_dicom`: frames, spacing, regions)
* :func:`load_busi` -- BUSI ``{benign,malignant,normal}/`` folders with ``_mask`` files
* :func:`load_fmuia_csv` -- FM_UIA 2026 challenge CSVs
* :func:`load_hc18` -- HC18 fetal head ellipse annotations + pixel size / HC CSV
* :func:`load_jsonl` -- a generic JSONL manifest with :class:`UltrasoundSample` keys
* :func:`load_ultrabench` -- UltraBench's processed datasets (its own splits:
  :func:`load_ultrabench_splits`)
"""

from echomoe.data.formats.busi import load_busi
from echomoe.data.formats.dicom import DicomImage, load_dicom, read_dicom
from echomoe.data.formats.echovlm import load_echovlm_json, split_report
from echomoe.data.formats.errors import (
    CorruptImageError,
    DuplicateIdError,
    FormatError,
    ImageTagMismatchError,
    InvalidValueError,
    LoadResult,
    MalformedRecordError,
    MaskLabelError,
    MaskSizeMismatchError,
    MissingFieldError,
    MissingImageError,
    MissingMaskError,
    RegionError,
    SkippedRecord,
    UnknownFieldError,
)
from echomoe.data.formats.fmuia import load_fmuia_csv
from echomoe.data.formats.hc18 import load_hc18
from echomoe.data.formats.jsonl import load_jsonl
from echomoe.data.formats.ultrabench import load_ultrabench, load_ultrabench_splits
from echomoe.data.schema import UnknownRegionError

__all__ = [
    "CorruptImageError",
    "DicomImage",
    "DuplicateIdError",
    "FormatError",
    "ImageTagMismatchError",
    "InvalidValueError",
    "LoadResult",
    "MalformedRecordError",
    "MaskLabelError",
    "MaskSizeMismatchError",
    "MissingFieldError",
    "MissingImageError",
    "MissingMaskError",
    "RegionError",
    "SkippedRecord",
    "UnknownFieldError",
    "UnknownRegionError",
    "load_busi",
    "load_dicom",
    "load_echovlm_json",
    "load_fmuia_csv",
    "load_hc18",
    "load_jsonl",
    "load_ultrabench",
    "load_ultrabench_splits",
    "read_dicom",
    "split_report",
]
