"""EchoVLM / LLaVA conversation JSON -> :class:`~echomoe.data.schema.UltrasoundSample`.

The file is a JSON list of records, in either of the two layouts EchoVLM's data uses::

    {"id": "case1", "image": ["a.png", "b.png"],            # or a single string; or "images"
     "region": "thyroid",                                   # optional ("anatomy" also read)
     "conversations": [{"from": "human", "value": "<image>\\n<image>\\nDescribe."},
                       {"from": "gpt", "value": "Findings: ... Impression: ..."}]}

    {"id": "case1", "images": [...], "messages": [{"role": "user", "content": "..."},
                                                  {"role": "assistant", "content": "..."}]}

* one ``<image>`` tag per image, counted over the human / user turns (else
  :class:`ImageTagMismatchError`);
* every human turn followed by a gpt turn becomes a QA pair (``type="open"``, tags stripped);
  ``system`` turns are ignored;
* **report**: the first answer that has report headings (``Findings:`` / ``Impression:``,
  ``超声所见`` / ``超声提示`` / ``超声诊断``) is split into ``findings`` and ``impression``;
  without one, the answer to the first caption / description / findings / report prompt
  (:data:`REPORT_PROMPT`, English and Chinese) becomes the findings, the answer to an
  impression prompt (:data:`IMPRESSION_PROMPT`) the impression; else a ``description`` (or
  ``caption`` / ``report``) field is the findings;
* **region**, first found: the record's ``region`` / ``anatomy`` field, the ``region``
  argument, the ``region_rule(record, json_path)`` callable, then the dataset names of
  :data:`DATASET_REGIONS` (``BUSI`` -> breast, ``TN5000`` -> thyroid, ``CAMUS`` -> heart, ...,
  organ words in English and Chinese) in the record's ``dataset`` / ``source`` field, its image
  paths as written, or the JSON's file name; else ``"unknown"``;
* **diagnosis**: the record's ``diagnosis`` / ``label`` / ``class`` field, else a class word of
  ``diagnosis_classes`` (default benign / malignant / normal) in an image's file or folder name
  (BUSI's ``benign/benign (3).png``);
* images stay paths (relative to ``image_root``, default: the JSON's folder) but each one is
  checked to exist and decode (PNG, JPEG, ..., or DICOM).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
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

DATASET_REGIONS: dict[str, str] = {
    # public datasets
    "busi": "breast", "bus-bra": "breast", "busbra": "breast", "udiat": "breast",
    "tn3k": "thyroid", "tn5000": "thyroid", "ddti": "thyroid", "tg3k": "thyroid",
    "camus": "heart", "echonet": "heart", "echonet-dynamic": "heart",
    "hc18": "gynaecology", "fetal": "gynaecology", "fm_uia": "gynaecology",
    "kidneyus": "kidney", "ccaus": "vessel",
    # organ words (EchoVLM's own folders: breast, gynaecology, heart, kidney, liver, thyriod,
    # vessel)
    "breast": "breast", "thyroid": "thyroid", "thyriod": "thyroid", "heart": "heart",
    "cardiac": "heart", "echocardiography": "heart", "kidney": "kidney", "renal": "kidney",
    "liver": "liver", "hepatic": "liver", "vessel": "vessel", "carotid": "vessel",
    "vascular": "vessel", "gynaecology": "gynaecology", "gynecology": "gynaecology",
    "obstetric": "gynaecology", "uterus": "gynaecology", "ovary": "gynaecology",
    # Chinese organ words (matched as substrings)
    "乳腺": "breast", "甲状腺": "thyroid", "心脏": "heart", "超声心动": "heart", "肾": "kidney",
    "肝": "liver", "血管": "vessel", "颈动脉": "vessel", "妇科": "gynaecology",
    "产科": "gynaecology", "子宫": "gynaecology", "卵巢": "gynaecology",
}
"""Dataset names and organ words -> region (lower-case; Latin keys match whole path tokens,
Chinese keys substrings).  Pass your own ``region_map`` to extend or replace it."""

REPORT_PROMPT = re.compile(
    r"\b(?:report|describe|description|caption|findings?)\b|报告|描述|所见|说明|表现|记录",
    re.IGNORECASE)
"""A human turn asking for a report, a description or a caption (its answer is the findings)."""

IMPRESSION_PROMPT = re.compile(r"\bimpression\b|超声提示|诊断意见|结论", re.IGNORECASE)
"""A human turn asking for the impression only (checked after :data:`REPORT_PROMPT`)."""

DIAGNOSIS_CLASSES = ("benign", "malignant", "normal")
_TOKEN = re.compile(r"[a-z0-9]+(?:[-_][a-z0-9]+)*")

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


_ROLES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt",
          "system": "system"}


def _turns(record: dict) -> list[tuple[str, str]]:
    """``[(human|gpt|system, text)]`` of the record's ``conversations`` or ``messages``."""
    if "conversations" in record:
        field, keys = "conversations", ("from", "value")
    elif "messages" in record:
        field, keys = "messages", ("role", "content")
    else:
        raise MissingFieldError("missing field 'conversations' (or 'messages')")
    conversations = record[field]
    if not isinstance(conversations, list):
        raise InvalidValueError(f"{field!r} must be a list of {{{keys[0]!r}, {keys[1]!r}}} "
                                "turns")
    turns = []
    for k, turn in enumerate(conversations):
        if not isinstance(turn, dict) or keys[0] not in turn or keys[1] not in turn:
            raise MissingFieldError(f"conversation turn {k} needs {keys[0]!r} and {keys[1]!r}")
        role, value = _ROLES.get(turn[keys[0]]), turn[keys[1]]
        if role is None or not isinstance(value, str):
            raise InvalidValueError(
                f"conversation turn {k}: {keys[0]!r} must be one of {', '.join(_ROLES)} and "
                f"{keys[1]!r} a string")
        turns.append((role, value))
    return turns


def _path_tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def infer_region(texts: Sequence[str], region_map: Mapping[str, str] = DATASET_REGIONS
                 ) -> str | None:
    """The region of the first of ``region_map``'s names found in ``texts`` (dataset names,
    paths, file names): Latin names as whole tokens (``busi`` in ``BUSI/benign (3).png``, not
    in ``business``), CJK names as substrings; ``None`` when none is found."""
    latin = {k.lower(): v for k, v in region_map.items() if k.isascii()}
    cjk = [(k, v) for k, v in region_map.items() if not k.isascii()]
    for text in texts:
        for token in _path_tokens(text):
            for part in (token, *re.split(r"[-_]", token)):
                if part in latin:
                    return latin[part]
        for key, value in cjk:
            if key in text:
                return value
    return None


def _diagnosis(record: dict, images: Sequence[str], classes: Sequence[str]) -> str | None:
    for key in ("diagnosis", "label", "class"):
        if record.get(key) is not None:
            return str(record[key])
    for p in images:
        for part in reversed(Path(p).parts):
            tokens = set(_path_tokens(Path(part).stem))
            found = [c for c in classes if c.lower() in tokens]
            if len(found) == 1:
                return found[0]
    return None


def _report(turns: list[tuple[str, str]], record: dict) -> tuple[str, str]:
    """``(findings, impression)`` (see the module docstring)."""
    question = None
    findings = impression = None
    for role, value in turns:
        if role == "human":
            question = _strip_tags(value)
            continue
        if role != "gpt":
            continue
        split = split_report(value)
        if split is not None:
            return split
        if question is not None and findings is None and REPORT_PROMPT.search(question):
            findings = value.strip()
        elif question is not None and impression is None and IMPRESSION_PROMPT.search(question):
            impression = value.strip()
        question = None
    if findings is None:
        field = next((record[k] for k in ("description", "caption", "report")
                      if isinstance(record.get(k), str) and record[k].strip()), None)
        if field is not None:
            split = split_report(field)
            return split if split is not None else (field.strip(), impression or "")
    return findings or "", impression or ""


def _parse_record(record: Any, root: Path, json_path: Path, *, region: str | None,
                  region_rule: Callable[[dict, Path], str | None] | None,
                  region_map: Mapping[str, str], diagnosis_classes: Sequence[str]
                  ) -> UltrasoundSample:
    if not isinstance(record, dict):
        raise MalformedRecordError(f"record must be a JSON object, got {type(record).__name__}")
    rid = record.get("id")
    if rid is None or rid == "":
        raise MissingFieldError("missing field 'id'")
    turns = _turns(record)

    images = record.get("image", record.get("images", []))
    if isinstance(images, str):
        images = [images]
    if images is None:
        images = []
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise InvalidValueError(f"'image' must be a path or a list of paths, got {images!r}")

    n_tags = sum(value.count(IMAGE_TAG) for role, value in turns if role == "human")
    if n_tags != len(images):
        raise ImageTagMismatchError(
            f"{n_tags} {IMAGE_TAG} tag(s) in the human turns but {len(images)} image(s)"
        )

    name = record.get("region", record.get("anatomy"))
    if name is None:
        name = region
    if name is None and region_rule is not None:
        name = region_rule(record, json_path)
    if name is None:
        hints = [str(record[k]) for k in ("dataset", "source") if record.get(k)]
        name = infer_region([*hints, *images, json_path.stem], region_map)

    paths = []
    for p in images:
        path = (root / p).resolve() if not Path(p).is_absolute() else Path(p)
        verify_image(path)
        paths.append(str(path))

    qa, question = [], None
    for role, value in turns:
        if role == "human":
            question = _strip_tags(value)
        elif role == "gpt" and question is not None:
            qa.append({"question": question, "answer": value.strip(), "type": "open"})
            question = None
    findings, impression = _report(turns, record)
    return UltrasoundSample(
        id=str(rid),
        images=paths,
        region=check_region(name),
        findings=findings,
        impression=impression,
        qa=qa,
        diagnosis=_diagnosis(record, images, diagnosis_classes),
        source="echovlm",
    )


def load_echovlm_json(
    path: str | Path, image_root: str | Path | None = None, strict: bool = True, *,
    region: str | None = None, region_rule: Callable[[dict, Path], str | None] | None = None,
    region_map: Mapping[str, str] = DATASET_REGIONS,
    diagnosis_classes: Sequence[str] = DIAGNOSIS_CLASSES,
) -> LoadResult:
    """Load an EchoVLM/LLaVA conversation JSON file (see the module docstring).

    Args:
        path: the JSON file (a list of records, or one record).
        image_root: folder the image paths are relative to (default: the JSON's folder).
        strict: raise on the first bad record; else skip it and list it in ``skipped``.
        region: the region of records that name none (before ``region_rule`` and the map).
        region_rule: ``(record, json_path) -> region or None``, e.g. from a path layout.
        region_map: dataset names / organ words -> region (:data:`DATASET_REGIONS`).
        diagnosis_classes: class words read from image file and folder names.

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
    except RecursionError as err:
        raise MalformedRecordError("JSON nested too deeply to parse", file=path) from err
    if isinstance(data, dict):  # a single record
        data = [data]
    if not isinstance(data, list):
        raise MalformedRecordError("expected a JSON list of records", file=path)

    result, seen = LoadResult(), set()
    for index, record in enumerate(data):
        name = _record_name(record, index)
        with result.guard(strict, path, name):
            sample = _parse_record(record, root, path, region=region, region_rule=region_rule,
                                   region_map=region_map, diagnosis_classes=diagnosis_classes)
            if sample.id in seen:
                raise DuplicateIdError(f"id {sample.id!r} occurs more than once")
            seen.add(sample.id)
            result.samples.append(sample)
    return result.warn_if_empty(path, "records")
