"""Generic JSONL manifest -> :class:`UltrasoundSample`.

One JSON object per line, keys named like the fields of
:class:`~echomoe.data.schema.UltrasoundSample`::

    {"id": "c1", "images": ["img/c1.png"], "region": "thyroid", "pixel_spacing": 0.1,
     "masks": {"lesion": "masks/c1.png"}, "boxes": [{"label": "lesion", "bbox": [1, 2, 9, 8]}],
     "keypoints": {"long_axis_1": [1, 5]}, "attributes": {"margin": "circumscribed"},
     "findings": "...", "impression": "...", "diagnosis": "benign",
     "qa": [{"question": "...", "answer": "...", "type": "open"}], "source": "my-clinic"}

``id`` and ``images`` are required (``images`` may be one path); paths are relative to the
manifest's folder.  Images stay paths (checked to exist and decode); masks are loaded as
boolean arrays (non-zero = foreground) and must match the first image's size.  Blank lines are
ignored.  An unknown key raises :class:`UnknownFieldError` listing the valid ones; a line that
is not a JSON object raises :class:`MalformedRecordError` naming ``file:line``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from echomoe.data.formats.errors import (
    DuplicateIdError,
    FormatError,
    InvalidValueError,
    LoadResult,
    MalformedRecordError,
    MissingFieldError,
    UnknownFieldError,
    check_box,
    check_point,
    check_region,
    parse_point,
    read_mask,
    to_float,
    verify_image,
)
from echomoe.data.schema import UltrasoundSample

FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(UltrasoundSample))
"""The keys a manifest line may have (the :class:`UltrasoundSample` fields)."""

_SCALAR = (str, int, float, bool)


def _check_text(record: dict[str, Any], key: str) -> str:
    value = record.get(key, "")
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidValueError(f"{key!r} must be a string, got {type(value).__name__}")
    return value


def _boxes(value: Any, size: tuple[int, int]) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise InvalidValueError("'boxes' must be a list of {'label', 'bbox'}")
    out = []
    for k, box in enumerate(value):
        if not isinstance(box, dict) or "bbox" not in box:
            raise InvalidValueError(f"boxes[{k}] must be an object with 'bbox' (and 'label')")
        bbox = box["bbox"]
        if not isinstance(bbox, list) or len(bbox) != 4:
            raise InvalidValueError(f"boxes[{k}].bbox must be [x_min, y_min, x_max, y_max]")
        coords = [to_float(v, f"boxes[{k}].bbox") for v in bbox]
        if coords[2] < coords[0] or coords[3] < coords[1]:
            raise InvalidValueError(f"boxes[{k}].bbox has x_max < x_min or y_max < y_min")
        check_box([int(c) if c.is_integer() else c for c in coords], size, f"boxes[{k}].bbox")
        coords = [int(c) if c.is_integer() else c for c in coords]
        out.append({**box, "label": str(box.get("label", "lesion")), "bbox": coords})
    return out


def _qa(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list):
        raise InvalidValueError("'qa' must be a list of {'question', 'answer', 'type'}")
    out = []
    for k, pair in enumerate(value):
        if not isinstance(pair, dict) or "question" not in pair or "answer" not in pair:
            raise InvalidValueError(f"qa[{k}] must be an object with 'question' and 'answer'")
        out.append({
            "question": str(pair["question"]),
            "answer": str(pair["answer"]),
            "type": str(pair.get("type", "open")),
        })
    return out


def _parse_record(record: Any, base: Path) -> UltrasoundSample:
    if not isinstance(record, dict):
        raise MalformedRecordError(f"line must be a JSON object, got {type(record).__name__}")
    unknown = sorted(set(record) - set(FIELDS))
    if unknown:
        raise UnknownFieldError(
            f"unknown key(s) {', '.join(map(repr, unknown))}; valid: {', '.join(FIELDS)}"
        )
    for key in ("id", "images"):
        if record.get(key) in (None, "", []):
            raise MissingFieldError(f"missing field {key!r}")
    if not isinstance(record["id"], (str, int)):
        raise InvalidValueError("'id' must be a string")
    images = record["images"]
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise InvalidValueError("'images' must be a path or a list of paths")
    region = check_region(record.get("region"))

    paths, size = [], None
    for p in images:
        path = (base / p).resolve()
        wh = verify_image(path)
        size = size or wh
        paths.append(str(path))

    masks = record.get("masks") or {}
    if not isinstance(masks, dict) or not all(isinstance(v, str) for v in masks.values()):
        raise InvalidValueError("'masks' must map names to mask file paths")
    masks = {name: read_mask((base / p).resolve(), (size[1], size[0])) for name, p in masks.items()}

    keypoints = record.get("keypoints") or {}
    if not isinstance(keypoints, dict):
        raise InvalidValueError("'keypoints' must map names to [x, y]")
    keypoints = {k: parse_point(v, f"keypoints.{k}") for k, v in keypoints.items()}
    for name, point in keypoints.items():
        check_point(point, size, f"keypoints.{name}")

    attributes = record.get("attributes") or {}
    if not isinstance(attributes, dict) or not all(
        isinstance(v, _SCALAR) or v is None for v in attributes.values()
    ):
        raise InvalidValueError("'attributes' must map names to str/int/float/bool values")

    spacing = record.get("pixel_spacing")
    diagnosis = record.get("diagnosis")
    return UltrasoundSample(
        id=str(record["id"]),
        images=paths,
        region=region,
        pixel_spacing=None if spacing is None else to_float(spacing, "pixel_spacing",
                                                            positive=True),
        masks=masks,
        boxes=_boxes(record.get("boxes") or [], size),
        keypoints=keypoints,
        attributes=dict(attributes),
        findings=_check_text(record, "findings"),
        impression=_check_text(record, "impression"),
        qa=_qa(record.get("qa") or []),
        diagnosis=None if diagnosis is None else str(diagnosis),
        source=_check_text(record, "source") or "jsonl",
    )


def load_jsonl(path: str | Path, strict: bool = True) -> LoadResult:
    """Load a JSONL manifest of :class:`UltrasoundSample`-like records (see the module docstring).

    Args:
        path: the ``.jsonl`` file; image and mask paths are relative to its folder.
        strict: raise on the first bad line; else skip it and list it in ``skipped``.

    Returns:
        A :class:`LoadResult` in line order.

    Raises:
        FormatError: a subclass naming ``file:line`` and the record id when known (``strict``);
            whatever ``strict`` is, when the file cannot be read.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise FormatError(f"cannot read manifest ({err})", file=path) from err
    result, seen = LoadResult(), set()
    for lineno, raw in enumerate(data.splitlines(), start=1):
        if not raw.strip():
            continue
        name = None
        with result.guard(strict, path, None, lineno):
            try:  # per line: one bad line is one skipped record, not a lost file
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as err:
                raise MalformedRecordError(f"not UTF-8 ({err.reason} at byte {err.start})"
                                           ) from err
            except json.JSONDecodeError as err:
                raise MalformedRecordError(
                    f"invalid JSON ({err.msg} at column {err.colno})"
                ) from err
            except RecursionError as err:
                raise MalformedRecordError("JSON nested too deeply to parse") from err
            if isinstance(record, dict) and isinstance(record.get("id"), (str, int)):
                name = str(record["id"])
            try:
                sample = _parse_record(record, path.parent)
                if sample.id in seen:
                    raise DuplicateIdError(f"id {sample.id!r} occurs more than once")
            except FormatError as err:
                err.locate(path, name, lineno)
                raise
            seen.add(sample.id)
            result.samples.append(sample)
    return result.warn_if_empty(path, "records")
