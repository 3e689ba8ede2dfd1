"""Radiology-style reports of synthetic cases, and their exact inverse.

:func:`write_report` turns a case's ``attributes`` (see :mod:`echomoe.data.synthetic.vocab`)
into a ``(findings, impression)`` pair drawn from the phrase banks in
:mod:`echomoe.data.synthetic.phrases`; :func:`parse_findings` reads the attributes back.

Round trip: for every attributes dict that follows ``vocab.py`` (floats with at most three
decimals; sizes are conventionally rounded to 0.1 mm),
``parse_findings(region, findings) == attributes`` and the same holds for
``findings + " " + impression``.  Every key is carried by the text, ``organ`` included.  Numbers
are written with the fewest decimals (1 to 3) that reproduce the value exactly, so sizes appear
as ``"12.3 x 8.0 mm"``.

On free text (e.g. a model's output) the parser is lenient: case-insensitive, it returns only
the keys it can find and never raises on any string.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from echomoe.data.synthetic import phrases as P
from echomoe.data.synthetic.vocab import (
    DIAGNOSES,
    LV_DILATED_MM,
    ORGANS,
    diagnose,
    tirads_level,
    tirads_points,
)

__all__ = ["write_report", "parse_findings", "parse_diagnosis", "format_number"]

# ---------------------------------------------------------------------------------------------
# impression banks
# ---------------------------------------------------------------------------------------------

BIRADS_DESC = {2: "benign", 3: "probably benign", 4: "suspicious", 5: "highly suspicious"}
BIRADS_ACTION = {
    2: "Routine screening is advised.",
    3: "Short-interval follow-up is suggested.",
    4: "Tissue sampling is recommended.",
    5: "Biopsy is recommended.",
}
TIRADS_DESC = {1: "benign", 2: "not suspicious", 3: "mildly suspicious",
               4: "moderately suspicious", 5: "highly suspicious"}
#: ACR TI-RADS size thresholds in mm: (fine-needle aspiration, follow-up).
TIRADS_THRESHOLDS = {3: (25.0, 15.0), 4: (15.0, 10.0), 5: (10.0, 5.0)}

IMPRESSIONS: dict[str, dict[str, tuple[str, ...]]] = {
    "breast": {
        "normal": ("Normal breast ultrasound (BI-RADS 1).",
                   "Negative breast ultrasound, BI-RADS category 1.",
                   "No sonographic evidence of malignancy; BI-RADS 1."),
        "birads": ("BI-RADS category {n}: {desc} breast mass.",
                   "{Desc} breast mass, BI-RADS {n}.",
                   "Assessment: BI-RADS {n} ({desc})."),
    },
    "thyroid": {
        "normal": ("Normal thyroid lobe without nodules.", "No thyroid nodule.",
                   "Unremarkable thyroid ultrasound."),
        "tr": ("ACR TI-RADS TR{n} nodule ({desc}).",
               "Thyroid nodule, TI-RADS level {n} ({pts} points): {desc}.",
               "TR{n} nodule: {desc}, {pts} TI-RADS points."),
    },
    "liver": {
        "normal": ("Normal liver without focal lesion.", "Unremarkable hepatic ultrasound.",
                   "No focal liver lesion."),
        "simple_cyst": ("Simple hepatic cyst.", "Findings consistent with a simple liver cyst.",
                        "Benign simple cyst of the liver."),
        "haemangioma": ("Hepatic haemangioma.", "Findings typical of a haemangioma.",
                        "Lesion most consistent with a hemangioma of the liver."),
        "metastasis": ("Hepatic lesion suspicious for metastasis.",
                       "Findings concerning for a liver metastasis.",
                       "Probable metastatic deposit in the liver."),
    },
    "kidney": {
        "normal": ("Normal kidney.", "Unremarkable renal ultrasound.",
                   "No renal abnormality; no hydronephrosis."),
        "renal_cyst": ("Simple renal cyst", "Benign-appearing renal cyst",
                       "Findings consistent with a renal cyst"),
        "renal_stone": ("Renal calculus", "Nephrolithiasis", "Renal stone"),
        "hydronephrosis": ("{G} hydronephrosis.", "{G} dilatation of the collecting system.",
                           "Findings consistent with {g} hydronephrosis."),
    },
    "heart": {
        "normal": ("Normal left ventricular size.", "Left ventricle within normal limits.",
                   "No left ventricular abnormality."),
        "dilated_lv": ("Dilated left ventricle.", "Left ventricular dilatation.",
                       "The left ventricle is dilated."),
        "lv_thrombus": ("Left ventricular thrombus.", "Findings consistent with an LV thrombus.",
                        "Intracavitary thrombus in the left ventricle."),
    },
    "vessel": {
        "normal": ("Normal carotid artery.", "No carotid plaque or stenosis.",
                   "Unremarkable carotid ultrasound."),
        "stenosis_lt50": ("Carotid plaque with less than 50% stenosis.",
                          "Plaque causing {p}% stenosis, below the 50% threshold.",
                          "Non-significant ({p}%) carotid stenosis due to plaque."),
        "stenosis_ge50": ("Carotid plaque with haemodynamically significant stenosis ({p}%).",
                          "Significant carotid stenosis of 50% or more, due to plaque.",
                          "Plaque causing {p}% stenosis, above the 50% threshold."),
    },
    "gynaecology": {
        "normal": ("Normal pelvic ultrasound with no focal lesion.", "Unremarkable uterus.",
                   "No uterine abnormality."),
        "follicle": ("Ovarian follicle, a physiological finding.", "Physiological follicle.",
                     "Findings consistent with a simple follicle."),
        "fibroid": ("Uterine fibroid.", "Leiomyoma of the uterus.",
                    "Findings consistent with a fibroid."),
    },
}

# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _pick(rng: np.random.Generator, seq):
    """One element of ``seq``, chosen by ``rng``."""
    return seq[int(rng.integers(len(seq)))]


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _article(word: str) -> str:
    w = word.lower()
    return "an" if w[:1] in "aeiou" and not w.startswith(("uter", "uni", "use")) else "a"


def format_number(value: float) -> str:
    """The shortest 1-3 decimal rendering that reproduces ``value`` exactly (``5.0 -> "5.0"``)."""
    value = float(value)
    for digits in (1, 2, 3):
        text = f"{value:.{digits}f}"
        if float(text) == value:
            return text
    return repr(value)


def _check_region(region: str) -> None:
    if region not in ORGANS:
        raise ValueError(f"unknown region {region!r}; expected one of {sorted(ORGANS)}")


# ---------------------------------------------------------------------------------------------
# writer
# ---------------------------------------------------------------------------------------------


def _location_phrase(location: str, rng: np.random.Generator) -> str:
    depth, side = location.split()
    template, depths, sides = _pick(rng, P.LOCATION_TEMPLATES)
    d = depths[("upper", "middle", "lower").index(depth)]
    s = sides[("left", "central", "right").index(side)]
    return template.format(d=d, s=s)


def _lesion_sentences(region: str, a: dict[str, Any], rng: np.random.Generator) -> list[str]:
    """The main lesion sentence followed by the attribute sentences in random order."""
    nouns = P.LESION_NOUNS[region][a["lesion_type"]]
    noun = _pick(rng, nouns)
    adjectives, rest = [], []
    shape_i = int(rng.integers(3))
    if shape_i < P.SHAPE_ADJECTIVES and rng.random() < 0.5:
        adjectives.append(P.SHAPE_PHRASES[a["shape"]][shape_i])
    else:
        rest.append(("shape", shape_i))
    echo_i = int(rng.integers(3))
    if echo_i < P.ECHO_ADJECTIVES.get(a["echogenicity"], 1) and rng.random() < 0.5:
        adjectives.append(P.ECHO_PHRASES[a["echogenicity"]][echo_i])
    else:
        rest.append(("echo", echo_i))
    np_ = " ".join([*adjectives, noun])
    np_ = f"{_article(np_)} {np_}"
    size = f"{format_number(a['size_long_mm'])} x {format_number(a['size_short_mm'])} mm"
    loc = _location_phrase(a["location"], rng)
    template = _pick(rng, P.MAIN_TEMPLATES)
    main = template.format(np=np_, loc=loc, size=size,
                           size_clause=_pick(rng, P.SIZE_CLAUSES).format(size=size))
    main = _cap(main)

    rest += [("margin", None), ("posterior", None), ("orientation", None)]
    if region == "thyroid":
        rest += [("composition", None), ("foci", None), ("ttw", None)]
    order = rng.permutation(len(rest))
    short = nouns[0]
    out = [main]
    for k in order:
        key, idx = rest[int(k)]
        subj = _pick(rng, P.SUBJECTS).format(noun=short)
        fields = {"subj": subj, "subj_l": _lower(subj)}
        if key == "shape":
            text = _pick(rng, P.SHAPE_TEMPLATES).format(x=P.SHAPE_PHRASES[a["shape"]][idx],
                                                        **fields)
        elif key == "echo":
            text = _pick(rng, P.ECHO_TEMPLATES).format(
                x=P.ECHO_PHRASES[a["echogenicity"]][idx], **fields)
        elif key == "margin":
            text = _pick(rng, P.MARGIN_TEMPLATES).format(
                x=_pick(rng, P.MARGIN_PHRASES[a["margin"]]), **fields)
        elif key == "posterior":
            text = _pick(rng, P.POSTERIOR_SENTENCES[a["posterior"]]).format(**fields)
        elif key == "orientation":
            text = _pick(rng, P.ORIENTATION_SENTENCES[a["orientation"]]).format(**fields)
        elif key == "composition":
            text = _pick(rng, P.COMPOSITION_TEMPLATES).format(
                x=_pick(rng, P.COMPOSITION_PHRASES[a["composition"]]), **fields)
        elif key == "foci":
            text = _pick(rng, P.FOCI_SENTENCES[a["echogenic_foci"]]).format(**fields)
        else:
            text = _pick(rng, P.TTW_SENTENCES[bool(a["taller_than_wide"])]).format(**fields)
        out.append(_cap(text))
    return out


def _lower(subject: str) -> str:
    return subject[:1].lower() + subject[1:]


def _study_sentences(region: str, a: dict[str, Any], rng: np.random.Generator) -> list[str]:
    """Sentences of the region's study-level keys (every study of that region has them)."""
    out: list[str] = []
    if region == "kidney":
        grade = a["hydronephrosis"]
        if grade == "none":
            out.append(_pick(rng, P.HYDRO_SENTENCES["none"]))
        else:
            out.append(_pick(rng, P.HYDRO_SENTENCES["graded"]).format(g=grade, G=_cap(grade)))
    elif region == "heart":
        value = float(a["lv_diameter_mm"])
        qual = _pick(rng, P.LV_QUALIFIERS[value > LV_DILATED_MM])
        out.append(_pick(rng, P.LV_SENTENCES).format(v=format_number(value), qual=qual))
    elif region == "vessel":
        p = int(a["stenosis_percent"])
        if p == 0:
            out.append(_pick(rng, P.STENOSIS_ZERO))
        else:
            out.append(_pick(rng, P.STENOSIS_SENTENCES).format(p=p))
        out.append(_pick(rng, P.IMT_SENTENCES).format(v=format_number(a["imt_mm"])))
        if rng.random() < 0.5:
            out.reverse()
    return out


def _thyroid_action(level: int, size: float) -> str:
    if level not in TIRADS_THRESHOLDS:
        return "No fine-needle aspiration is required."
    fna, follow = TIRADS_THRESHOLDS[level]
    if size >= fna:
        return "Fine-needle aspiration is recommended."
    if size >= follow:
        return "Follow-up ultrasound is recommended."
    return "No fine-needle aspiration is required."


def _impression(region: str, a: dict[str, Any], rng: np.random.Generator) -> str:
    label = diagnose(region, a)
    bank = IMPRESSIONS[region]
    if label == "normal":
        return _pick(rng, bank["normal"])
    if region == "breast":
        n = int(label.rsplit("_", 1)[1])
        text = _pick(rng, bank["birads"]).format(n=n, desc=BIRADS_DESC[n],
                                                 Desc=_cap(BIRADS_DESC[n]))
        return f"{text} {BIRADS_ACTION[n]}"
    if region == "thyroid":
        points = tirads_points(a)
        n = tirads_level(points)
        text = _pick(rng, bank["tr"]).format(n=n, desc=TIRADS_DESC[n], pts=points)
        return f"{text} {_thyroid_action(n, float(a['size_long_mm']))}"
    if region == "kidney":
        grade = a["hydronephrosis"]
        if label == "hydronephrosis":
            return _pick(rng, bank[label]).format(g=grade, G=_cap(grade))
        text = _pick(rng, bank[label])
        tail = " without hydronephrosis." if grade == "none" else f" with {grade} hydronephrosis."
        return text + tail
    if region == "vessel":
        return _pick(rng, bank[label]).format(p=int(a["stenosis_percent"]))
    return _pick(rng, bank[label])


def write_report(region: str, attributes: dict[str, Any],
                 rng: np.random.Generator) -> tuple[str, str]:
    """A ``(findings, impression)`` report of one synthetic case.

    Args:
        region: one of ``vocab.ORGANS``.
        attributes: the case's attributes dict (keys and values as in ``vocab.py``).
        rng: the only source of randomness (phrasings, sentence order); same state, same text.

    The findings name the organ, describe the lesion (type, shape, echogenicity, margin,
    posterior features, orientation, ``"AA x BB mm"`` size, location, and for the thyroid
    composition, echogenic foci and taller-than-wide) or state a normal study, and give the
    region's study measurements (kidney hydronephrosis grade, heart LV end-diastolic diameter,
    vessel stenosis % and IMT).  The impression states ``vocab.diagnose`` in words (BI-RADS
    category, TI-RADS level with points and a management line, ...).
    """
    _check_region(region)
    a = attributes
    organ = _pick(rng, P.ORGAN_NAMES[region])
    sentences = [_pick(rng, P.BACKGROUND[region]).format(organ=organ)]
    if a.get("lesion_present", False):
        block = _lesion_sentences(region, a, rng)
    else:
        block = [_pick(rng, P.NORMAL_SENTENCES[region])]
    study = _study_sentences(region, a, rng)
    if rng.random() < 0.5:
        sentences += block + study
    else:
        sentences += study + block
    return " ".join(sentences), _impression(region, a, rng)


# ---------------------------------------------------------------------------------------------
# parser
# ---------------------------------------------------------------------------------------------

_FLAGS = re.IGNORECASE


def _compile_table(table):
    return tuple((value, re.compile(pattern, _FLAGS)) for value, pattern in table)


_TABLES = {
    "shape": _compile_table(P.SHAPE_PATTERNS),
    "echogenicity": _compile_table(P.ECHO_PATTERNS),
    "margin": _compile_table(P.MARGIN_PATTERNS),
    "posterior": _compile_table(P.POSTERIOR_PATTERNS),
    "orientation": _compile_table(P.ORIENTATION_PATTERNS),
    "composition": _compile_table(P.COMPOSITION_PATTERNS),
    "echogenic_foci": _compile_table(P.FOCI_PATTERNS),
    "taller_than_wide": _compile_table(P.TTW_PATTERNS),
}
_ORGAN_RE = {r: re.compile(p, _FLAGS) for r, p in P.ORGAN_PATTERNS.items()}
_LESION_RE = {r: {k: re.compile(p, _FLAGS) for k, p in d.items()}
              for r, d in P.LESION_PATTERNS.items()}
_GENERIC_RE = re.compile(P.GENERIC_LESION, _FLAGS)
_NEG_RE = re.compile(P.NEGATION_CUES, _FLAGS)
_UNREMARKABLE_RE = re.compile(r"\bunremarkable\b", _FLAGS)
_NUM = r"(\d+(?:\.\d+)?)"
_SIZE_RE = re.compile(_NUM + r"\s*(?:mm)?\s*[x×*]\s*" + _NUM + r"\s*mm", _FLAGS)
_DEPTH_ALT = "|".join(f"(?P<d_{k}>{v})" for k, v in P.DEPTH_PATTERNS.items())
_SIDE_ALT = "|".join(f"(?P<s_{k}>{v})" for k, v in P.SIDE_PATTERNS.items())
_LOCATION_RE = re.compile(rf"\b(?:{_DEPTH_ALT})\b[^.\d]{{0,25}}?\b(?:{_SIDE_ALT})\b", _FLAGS)
_HYDRO_GRADED_RE = re.compile(P.HYDRO_GRADED, _FLAGS)
_HYDRO_NONE_RE = re.compile(P.HYDRO_NONE, _FLAGS)
_LV_RE = re.compile(P.LV_PATTERN, _FLAGS)
_STENOSIS_RE = re.compile(P.STENOSIS_PATTERN, _FLAGS)
_STENOSIS_ZERO_RE = re.compile(P.STENOSIS_ZERO_PATTERN, _FLAGS)
_THRESHOLD_BEFORE_RE = re.compile(P.THRESHOLD_BEFORE, _FLAGS)
_THRESHOLD_AFTER_RE = re.compile(P.THRESHOLD_AFTER, _FLAGS)
_IMT_RE = re.compile(P.IMT_PATTERN, _FLAGS)
_CLAUSE_SPLIT_RE = re.compile(r"\.(?!\d)|[;\n!?]")
_BIRADS_RE = re.compile(r"\bbi-?rads\s*(?:category\s*)?([0-6])\b", _FLAGS)
_TIRADS_RE = re.compile(r"\btr\s?-?([1-5])\b|\bti-?rads\s+(?:level|category)\s+([1-5])\b", _FLAGS)


def _normalise(text: Any) -> str:
    if not isinstance(text, str):
        text = "" if text is None else str(text)
    text = text.replace("\u2013", "-").replace("\u2010", "-").replace("\u2011", "-")
    return re.sub(r"\s+", " ", text)


def _first(table, text: str):
    """The first value (in table order) whose pattern occurs in ``text``, else ``None``."""
    for value, pattern in table:
        if pattern.search(text):
            return value
    return None


def _negated(clause: str, start: int) -> bool:
    return _NEG_RE.search(clause[:start]) is not None


def _lesion(region: str, text: str) -> tuple[bool | None, str | None]:
    """(lesion_present, lesion_type) from non-negated lesion nouns / negated mentions."""
    found: tuple[int, str] | None = None
    normal = _UNREMARKABLE_RE.search(text) is not None
    offset = 0
    for clause in _CLAUSE_SPLIT_RE.split(text):
        for kind, pattern in _LESION_RE[region].items():
            for m in pattern.finditer(clause):
                if _negated(clause, m.start()):
                    normal = True
                elif found is None or offset + m.start() < found[0]:
                    found = (offset + m.start(), kind)
        if not normal:
            normal = any(_negated(clause, m.start()) for m in _GENERIC_RE.finditer(clause))
        offset += len(clause) + 1
    if found is not None:
        return True, found[1]
    if normal:
        return False, "none"
    return None, None


def _stenosis(text: str) -> int | None:
    for m in _STENOSIS_RE.finditer(text):
        if _THRESHOLD_BEFORE_RE.search(text[max(0, m.start() - 20):m.start()]):
            continue
        if _THRESHOLD_AFTER_RE.search(text[m.end():m.end() + 20]):
            continue
        return int(m.group(1))
    if _STENOSIS_ZERO_RE.search(text):
        return 0
    return None


def _location(text: str) -> str | None:
    m = _LOCATION_RE.search(text)
    if m is None:
        return None
    names = [k for k, v in m.groupdict().items() if v is not None]
    depth = next(k[2:] for k in names if k.startswith("d_"))
    side = next(k[2:] for k in names if k.startswith("s_"))
    return f"{depth} {side}"


def parse_findings(region: str, text: str) -> dict[str, Any]:
    """Read a report (findings, or findings + impression) back into an attributes dict.

    Exact inverse of :func:`write_report` on its own output.  On other text it returns the
    keys it finds (case-insensitive; absent keys are simply missing) and never raises; lesion
    keys are dropped when the text states a normal study.  Raises ``ValueError`` only for an
    unknown ``region``.
    """
    _check_region(region)
    t = _normalise(text)
    out: dict[str, Any] = {}
    if _ORGAN_RE[region].search(t):
        out["organ"] = ORGANS[region]
    present, kind = _lesion(region, t)
    if present is not None:
        out["lesion_present"] = present
        out["lesion_type"] = kind
    if present is not False:
        for key in ("shape", "margin", "echogenicity", "posterior", "orientation"):
            value = _first(_TABLES[key], t)
            if value is not None:
                out[key] = value
        m = _SIZE_RE.search(t)
        if m is not None:
            out["size_long_mm"] = float(m.group(1))
            out["size_short_mm"] = float(m.group(2))
        location = _location(t)
        if location is not None:
            out["location"] = location
        if region == "thyroid":
            for key in ("composition", "echogenic_foci", "taller_than_wide"):
                value = _first(_TABLES[key], t)
                if value is not None:
                    out[key] = value
    if region == "kidney":
        m = _HYDRO_GRADED_RE.search(t)
        if m is not None:
            out["hydronephrosis"] = m.group(1).lower()
        elif _HYDRO_NONE_RE.search(t):
            out["hydronephrosis"] = "none"
    elif region == "heart":
        m = _LV_RE.search(t)
        if m is not None:
            out["lv_diameter_mm"] = float(m.group(1))
    elif region == "vessel":
        stenosis = _stenosis(t)
        if stenosis is not None:
            out["stenosis_percent"] = stenosis
        m = _IMT_RE.search(t)
        if m is not None:
            out["imt_mm"] = float(m.group(1))
    return out


def parse_diagnosis(region: str, text: str) -> str | None:
    """The diagnosis label a report states (``vocab.DIAGNOSES[region]``), or ``None``.

    Breast and thyroid read the stated BI-RADS category / TI-RADS level; every region falls
    back to ``vocab.diagnose`` on the parsed attributes when they suffice.  Exact on
    :func:`write_report` output (findings + impression, or the impression alone for breast
    and thyroid); never raises on any text.
    """
    _check_region(region)
    t = _normalise(text)
    if region == "breast":
        m = _BIRADS_RE.search(t)
        if m is not None:
            n = int(m.group(1))
            if n == 1:
                return "normal"
            if f"birads_{n}" in DIAGNOSES[region]:
                return f"birads_{n}"
    if region == "thyroid":
        m = _TIRADS_RE.search(t)
        if m is not None:
            return f"tr{m.group(1) or m.group(2)}"
    attrs = parse_findings(region, t)
    if "lesion_present" not in attrs:
        return None
    try:
        return diagnose(region, attrs)
    except (KeyError, ValueError, TypeError):
        return None
