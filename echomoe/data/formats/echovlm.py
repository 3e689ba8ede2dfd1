"""EchoVLM / LLaVA conversation JSON -> :class:`~echomoe.data.schema.UltrasoundSample`.

The file is a JSON list of records::

    {"id": "case1", "image": ["a.png", "b.png"],            # or a single string
     "region": "thyroid",                                   # optional ("anatomy" also read)
     "conversations": [{"from": "human", "value": "<image>\\n<image>\\nDescribe."},
                       {"from": "gpt", "value": "Findings: ... Impression: ..."}]}

* one ``<image>`` tag per image, counted over the human turns (else
  :class:`ImageTagMismatchError`);
* every human turn followed by a gpt turn becomes a QA pair (``type="open"``, tags stripped);
  ``system`` turns are ignored;
* the first gpt answer that looks like a report (``Findings:`` / ``Impression:`` or
  ``超声所见`` / ``超声提示``) is split into ``findings`` and ``impression``;
* images stay paths (relative to ``image_root``, default: the JSON's folder) but each one is
  checked to exist and decode; an optional ``diagnosis`` field is copied.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from echomoe.data.formats.errors import (
    DuplicateIdError,
    ImageTagMismatchError,
    InvalidValueError,
    LoadResult,
    MalformedRecordError,
    MissingFieldError,
    check_region,
    verify_image,
)
from echomoe.data.schema import UltrasoundSample

IMAGE_TAG = "<image>"

_FINDINGS = re.compile(r"(?:\bfindings\s*[:：]|超声所见\s*[:：]?)", re.IGNORECASE)
_IMPRESSION = re.compile(
    r"(?:\bimpression\s*[:：]|超声提示\s*[:：]?|超声诊断\s*[:：]?)", re.IGNORECASE
)


def split_report(text: str) -> tuple[str, str] | None:
    """``(findings, impression)`` of a report-like text, or ``None`` if it has no heading.

    Text before an ``Impression:`` heading counts as findings when there is no ``Findings:``
    heading.
    """
    f = _FINDINGS.search(text)
    i = _IMPRESSION.search(text)
    if f is None and i is None:
        return None
    if i is None:
        return text[f.end():].strip(), ""
    if f is None:
        return text[: i.start()].strip(), text[i.end():].strip()
    if f.start() < i.start():
        return text[f.end(): i.start()].strip(), text[i.end():].strip()
    return text[f.end():].strip(), text[i.end(): f.start()].strip()  # impression first


def _strip_tags(text: str) -> str:
    return re.sub(r"\s+", " ", text.replace(IMAGE_TAG, " ")).strip()


def _record_name(record: Any, index: int) -> str:
    if isinstance(record, dict) and isinstance(record.get("id"), (str, int)):
        return str(record["id"])
    return f"#{index}"


def _parse_record(record: Any, root: Path) -> UltrasoundSample:
    if not isinstance(record, dict):
        raise MalformedRecordError(f"record must be a JSON object, got {type(record).__name__}")
    rid = record.get("id")
    if rid is None or rid == "":
        raise MissingFieldError("missing field 'id'")
    conversations = record.get("conversations")
    if conversations is None:
        raise MissingFieldError("missing field 'conversations'")
    if not isinstance(conversations, list):
        raise InvalidValueError("'conversations' must be a list of {'from', 'value'} turns")

    images = record.get("image", record.get("images", []))
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise InvalidValueError(f"'image' must be a path or a list of paths, got {images!r}")

    turns = []
    for k, turn in enumerate(conversations):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise MissingFieldError(f"conversation turn {k} needs 'from' and 'value'")
        role, value = turn["from"], turn["value"]
        if role not in ("human", "gpt", "system") or not isinstance(value, str):
            raise InvalidValueError(
                f"conversation turn {k}: 'from' must be human|gpt|system and 'value' a string"
            )
        turns.append((role, value))

    n_tags = sum(value.count(IMAGE_TAG) for role, value in turns if role == "human")
    if n_tags != len(images):
        raise ImageTagMismatchError(
            f"{n_tags} {IMAGE_TAG} tag(s) in the human turns but {len(images)} image(s)"
        )

    region_value = record.get("region", record.get("anatomy"))
    region = check_region(region_value)

    paths = []
    for p in images:
        path = (root / p).resolve() if not Path(p).is_absolute() else Path(p)
        verify_image(path)
        paths.append(str(path))

    qa, question = [], None
    findings = impression = ""
    for role, value in turns:
        if role == "human":
            question = _strip_tags(value)
        elif role == "gpt":
            if question is not None:
                qa.append({"question": question, "answer": value.strip(), "type": "open"})
                question = None
            if not findings and not impression:
                report = split_report(value)
                if report is not None:
                    findings, impression = report

    diagnosis = record.get("diagnosis")
    return UltrasoundSample(
        id=str(rid),
        images=paths,
        region=region,
        findings=findings,
        impression=impression,
        qa=qa,
        diagnosis=None if diagnosis is None else str(diagnosis),
        source="echovlm",
    )


def load_echovlm_json(
    path: str | Path, image_root: str | Path | None = None, strict: bool = True
) -> LoadResult:
    """Load an EchoVLM/LLaVA conversation JSON file (see the module docstring).

    Args:
        path: the JSON file (a list of records).
        image_root: folder the image paths are relative to (default: the JSON's folder).
        strict: raise on the first bad record; else skip it and list it in ``skipped``.

    Returns:
        A :class:`LoadResult` of samples with image *paths* (checked to be readable).

    Raises:
        FormatError: a subclass naming the file and the record id (``strict``), or, whatever
            ``strict`` is, when the file itself is not a JSON list.
    """
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise MalformedRecordError(f"cannot read file ({err})", file=path) from err
    except json.JSONDecodeError as err:
        raise MalformedRecordError(
            f"invalid JSON ({err.msg} at column {err.colno})", file=path, line=err.lineno
        ) from err
    if isinstance(data, dict):  # a single record
        data = [data]
    if not isinstance(data, list):
        raise MalformedRecordError("expected a JSON list of records", file=path)

    result, seen = LoadResult(), set()
    for index, record in enumerate(data):
        name = _record_name(record, index)
        with result.guard(strict, path, name):
            sample = _parse_record(record, root)
            if sample.id in seen:
                raise DuplicateIdError(f"id {sample.id!r} occurs more than once")
            seen.add(sample.id)
            result.samples.append(sample)
    return result
