"""Visual question answering pairs of synthetic cases; every answer comes from the attributes.

:func:`make_qa` returns ``num_questions`` dicts ``{"question", "answer", "type"}`` with
``type`` one of :data:`QA_TYPES`:

* ``"yes_no"``: the answer is ``"yes"`` or ``"no"`` (the asked value is the true one or a
  random other value with probability 1/2);
* ``"choice"``: the question lists its options (also under ``"options"``), the answer is one
  of them, verbatim;
* ``"open"``: the answer is the attribute value itself.

Topics: organ, lesion presence/type, echogenicity, margin, shape, size (``"AA.A mm"``, long or
short axis), location, diagnosis (the ``vocab.diagnose`` label, e.g. ``"birads_4"``), and the
region's study measurement (kidney hydronephrosis grade, heart LV diameter ``"AA.A mm"``,
vessel stenosis ``"NN%"``).  Lesion topics are only asked when a lesion is present.  Each
(topic, type) has three question phrasings.  The same ``rng`` state gives the same questions.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from echomoe.data.synthetic.phrases import LESION_NOUNS
from echomoe.data.synthetic.vocab import (
    DEPTHS,
    DIAGNOSES,
    ECHOGENICITIES,
    HYDRONEPHROSIS,
    LESION_TYPES,
    LV_DILATED_MM,
    MARGINS,
    ORGANS,
    SHAPES,
    SIDES,
    diagnose,
)

__all__ = ["make_qa", "QA_TYPES", "DIAGNOSIS_NAMES"]

QA_TYPES = ("yes_no", "choice", "open")

#: Readable names of the diagnosis labels (used inside yes/no questions).
DIAGNOSIS_NAMES = {
    "normal": "a normal study", "birads_2": "BI-RADS 2", "birads_3": "BI-RADS 3",
    "birads_4": "BI-RADS 4", "birads_5": "BI-RADS 5", "tr1": "TI-RADS TR1",
    "tr2": "TI-RADS TR2", "tr3": "TI-RADS TR3", "tr4": "TI-RADS TR4", "tr5": "TI-RADS TR5",
    "simple_cyst": "a simple cyst", "haemangioma": "a haemangioma",
    "metastasis": "a metastasis", "renal_cyst": "a renal cyst", "renal_stone": "a renal stone",
    "hydronephrosis": "hydronephrosis", "dilated_lv": "a dilated left ventricle",
    "lv_thrombus": "a left ventricular thrombus", "stenosis_lt50": "a stenosis below 50%",
    "stenosis_ge50": "a stenosis of 50% or more", "follicle": "a follicle",
    "fibroid": "a fibroid",
}

LOCATIONS = tuple(f"{d} {s}" for d in DEPTHS for s in SIDES)

#: Question templates per topic and type.  Fields: ``{c}`` (asked value), ``{opts}`` /
#: ``{opts_or}`` (options), ``{noun}`` (lesion noun), ``{axis}``, ``{t}`` (threshold).
TEMPLATES: dict[str, dict[str, tuple[str, ...]]] = {
    "organ": {
        "yes_no": ("Is this an ultrasound image of the {c}?", "Does this scan show the {c}?",
                   "Is the {c} the organ imaged here?"),
        "choice": ("Which organ is shown? Options: {opts}.", "Which organ is imaged: {opts_or}?",
                   "Select the organ in this image from: {opts}."),
        "open": ("Which organ is shown in this image?", "What organ is being scanned?",
                 "Name the organ visible in this ultrasound."),
    },
    "presence": {
        "yes_no": ("Is there a {c} in this image?", "Does this scan show a {c}?",
                   "Can a {c} be seen?"),
        "choice": ("What type of lesion is present? Options: {opts}.",
                   "Which finding is shown: {opts_or}?",
                   "Select the lesion type (or none) from: {opts}."),
        "open": ("What lesion is visible, if any?", "What kind of focal lesion is shown?",
                 "Name the lesion type seen in this image (none if normal)."),
    },
    "echogenicity": {
        "yes_no": ("Is the lesion {c}?", "Does the {noun} appear {c}?",
                   "Is the echogenicity of the lesion {c}?"),
        "choice": ("What is the echogenicity of the lesion? Options: {opts}.",
                   "Is the {noun} {opts_or}?", "Choose the echo pattern of the lesion: {opts}."),
        "open": ("What is the echogenicity of the lesion?", "Describe the echo pattern of the "
                 "{noun}.", "How echogenic is the lesion compared with the surrounding tissue?"),
    },
    "margin": {
        "yes_no": ("Is the margin of the lesion {c}?", "Does the {noun} have a {c} margin?",
                   "Are the lesion margins {c}?"),
        "choice": ("What is the margin of the lesion? Options: {opts}.",
                   "Is the margin of the {noun} {opts_or}?",
                   "Choose the margin description: {opts}."),
        "open": ("What is the margin of the lesion?", "Describe the margins of the {noun}.",
                 "How would you characterise the lesion margin?"),
    },
    "shape": {
        "yes_no": ("Is the lesion {c} in shape?", "Does the {noun} have a {c} shape?",
                   "Is the shape of the lesion {c}?"),
        "choice": ("What is the shape of the lesion? Options: {opts}.",
                   "Is the {noun} {opts_or}?", "Choose the shape of the lesion: {opts}."),
        "open": ("What is the shape of the lesion?", "Describe the shape of the {noun}.",
                 "Which shape does the lesion have?"),
    },
    "size": {
        "yes_no": ("Is the {axis} of the lesion greater than {t} mm?",
                   "Does the {noun} exceed {t} mm in {axis}?",
                   "Is the lesion's {axis} more than {t} mm?"),
        "choice": ("What is the {axis} of the lesion? Options: {opts}.",
                   "Which value matches the {axis} of the {noun}: {opts_or}?",
                   "Select the {axis} of the lesion: {opts}."),
        "open": ("What is the {axis} of the lesion?", "Measure the {axis} of the {noun}.",
                 "Report the {axis} of the {noun} in millimetres."),
    },
    "location": {
        "yes_no": ("Is the lesion located in the {c} part of the image?",
                   "Is the {noun} in the {c} of the field of view?",
                   "Does the lesion lie in the {c} region?"),
        "choice": ("Where is the lesion? Options: {opts}.",
                   "In which part of the image is the {noun}: {opts_or}?",
                   "Select the location of the lesion: {opts}."),
        "open": ("Where is the lesion located in the image?", "Where is the {noun}?",
                 "In which part of the image does the lesion lie (depth and side)?"),
    },
    "diagnosis": {
        "yes_no": ("Is the most likely diagnosis {c}?", "Is this study consistent with {c}?",
                   "Do the findings indicate {c}?"),
        "choice": ("What is the most likely diagnosis? Options: {opts}.",
                   "Which diagnosis fits best: {opts_or}?",
                   "Select the diagnosis from: {opts}."),
        "open": ("What is the most likely diagnosis?", "What is the diagnosis?",
                 "Which diagnostic category does this study fall into?"),
    },
    "hydronephrosis": {
        "yes_no": ("Is the hydronephrosis grade {c}?", "Is there {c} hydronephrosis?",
                   "Is the collecting system dilation graded as {c}?"),
        "choice": ("What grade of hydronephrosis is present? Options: {opts}.",
                   "Is the hydronephrosis {opts_or}?", "Grade the hydronephrosis: {opts}."),
        "open": ("What grade of hydronephrosis is present?", "How dilated is the collecting "
                 "system?", "Grade the hydronephrosis (none, mild, moderate or severe)."),
    },
    "lv_diameter": {
        "yes_no": ("Is the LV end-diastolic diameter greater than {t} mm?",
                   "Does the left ventricular diameter exceed {t} mm?",
                   "Is the left ventricle larger than {t} mm in diastolic diameter?"),
        "choice": ("What is the LV end-diastolic diameter? Options: {opts}.",
                   "Which value matches the left ventricular diameter: {opts_or}?",
                   "Select the LV diameter: {opts}."),
        "open": ("What is the LV end-diastolic diameter?",
                 "Measure the left ventricular internal diameter in diastole.",
                 "How large is the left ventricle (end-diastolic diameter)?"),
    },
    "stenosis": {
        "yes_no": ("Is the stenosis greater than {t}%?", "Is the lumen narrowed by more than "
                   "{t}%?", "Does the carotid stenosis exceed {t}%?"),
        "choice": ("What is the degree of stenosis? Options: {opts}.",
                   "How narrowed is the lumen: {opts_or}?", "Select the stenosis: {opts}."),
        "open": ("What is the degree of stenosis?", "Estimate the percentage of luminal "
                 "narrowing.", "How severe is the carotid stenosis, in percent?"),
    },
}

_LESION_TOPICS = ("echogenicity", "margin", "shape", "size", "location")
_STUDY_TOPIC = {"kidney": "hydronephrosis", "heart": "lv_diameter", "vessel": "stenosis"}
_AXES = {"size_long_mm": ("maximum diameter", "long-axis length", "largest dimension"),
         "size_short_mm": ("short-axis diameter", "short-axis length", "smallest dimension")}


def _pick(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


def _join_or(opts: list[str]) -> str:
    return ", ".join(opts[:-1]) + " or " + opts[-1]


def _categorical(kind: str, template: str, value: str, options, rng, display=None,
                 **fields) -> tuple[str, str, list[str] | None]:
    """One question about a categorical ``value`` among ``options``: ``(question, answer,
    the options a choice question lists)``."""
    display = display or {}
    others = [o for o in options if o != value]
    if kind == "yes_no":
        asked = value if rng.random() < 0.5 or not others else _pick(rng, others)
        question = template.format(c=display.get(asked, asked), **fields)
        return question, "yes" if asked == value else "no", None
    if kind == "choice":
        k = min(3, len(others))
        chosen = [others[int(i)] for i in rng.permutation(len(others))[:k]]
        opts = [value, *chosen]
        opts = [opts[int(i)] for i in rng.permutation(len(opts))]
        return (template.format(opts=", ".join(opts), opts_or=_join_or(opts), **fields), value,
                opts)
    return template.format(**fields), value, None


def _numeric(kind: str, template: str, value: float, rng, fmt, integer=False,
             **fields) -> tuple[str, str, list[str] | None]:
    """One question about a measurement; ``fmt`` renders a value as its answer string."""
    if kind == "open":
        return template.format(**fields), fmt(value), None
    factors = rng.permutation(np.array([0.5, 0.7, 0.8, 1.25, 1.4, 1.8]))
    if kind == "yes_no":
        t = max(1, int(round(value * float(factors[0]))))
        if t == value:
            t += 1
        return template.format(t=t, **fields), "yes" if value > t else "no", None
    answer = fmt(value)
    opts = [answer]
    for f in factors:
        cand = round(value * float(f)) if integer else round(value * float(f), 1)
        text = fmt(cand)
        if cand > 0 and text not in opts and (not integer or cand < 100):
            opts.append(text)
        if len(opts) == 4:
            break
    opts = [opts[int(i)] for i in rng.permutation(len(opts))]
    return template.format(opts=", ".join(opts), opts_or=_join_or(opts), **fields), answer, opts


def _mm(value: float) -> str:
    return f"{float(value):.1f} mm"


def _question(region: str, a: dict[str, Any], topic: str, kind: str,
              rng: np.random.Generator) -> tuple[str, str, list[str] | None]:
    template = _pick(rng, TEMPLATES[topic][kind])
    present = bool(a.get("lesion_present", False))
    kind_of = a.get("lesion_type", "none")
    noun = LESION_NOUNS[region][kind_of][0] if present else "lesion"
    if topic == "organ":
        return _categorical(kind, template, a.get("organ", ORGANS[region]),
                            sorted(set(ORGANS.values())), rng)
    if topic == "presence":
        if kind == "yes_no":
            asked = _pick(rng, ("focal lesion", *LESION_TYPES[region]))
            answer = present and asked in ("focal lesion", kind_of)
            return template.format(c=asked), "yes" if answer else "no", None
        return _categorical(kind, template, kind_of, ("none", *LESION_TYPES[region]), rng)
    if topic == "echogenicity":
        return _categorical(kind, template, a["echogenicity"], ECHOGENICITIES, rng, noun=noun)
    if topic == "margin":
        return _categorical(kind, template, a["margin"], MARGINS, rng, noun=noun)
    if topic == "shape":
        return _categorical(kind, template, a["shape"], SHAPES, rng, noun=noun)
    if topic == "location":
        return _categorical(kind, template, a["location"], LOCATIONS, rng, noun=noun)
    if topic == "size":
        key = "size_long_mm" if rng.random() < 0.7 else "size_short_mm"
        return _numeric(kind, template, float(a[key]), rng, _mm, noun=noun,
                        axis=_pick(rng, _AXES[key]))
    if topic == "diagnosis":
        return _categorical(kind, template, diagnose(region, a), DIAGNOSES[region], rng,
                            display=DIAGNOSIS_NAMES)
    if topic == "hydronephrosis":
        return _categorical(kind, template, a["hydronephrosis"], HYDRONEPHROSIS, rng)
    if topic == "lv_diameter":
        if kind == "yes_no" and rng.random() < 0.3:
            dilated = float(a["lv_diameter_mm"]) > LV_DILATED_MM
            return "Is the left ventricle dilated?", "yes" if dilated else "no", None
        return _numeric(kind, template, float(a["lv_diameter_mm"]), rng, _mm)
    if topic == "stenosis":
        return _numeric(kind, template, int(a["stenosis_percent"]), rng, lambda v: f"{int(v)}%",
                        integer=True)
    raise ValueError(f"unknown topic {topic!r}")


def make_qa(region: str, attributes: dict[str, Any], rng: np.random.Generator,
            num_questions: int = 6) -> list[dict[str, Any]]:
    """``num_questions`` VQA pairs ``{"question", "answer", "type"}`` about one case; choice
    questions also carry the ``"options"`` they list (in the order they are listed).

    (topic, type) pairs are drawn without repetition while they last (a normal study has
    fewer topics), then again in a fresh random order.  Deterministic for the ``rng`` state.
    """
    if region not in ORGANS:
        raise ValueError(f"unknown region {region!r}; expected one of {sorted(ORGANS)}")
    topics = ["organ", "presence", "diagnosis"]
    if attributes.get("lesion_present", False):
        topics += list(_LESION_TOPICS)
    if region in _STUDY_TOPIC:
        topics.append(_STUDY_TOPIC[region])
    pool = [(topic, kind) for topic in topics for kind in QA_TYPES]
    out: list[dict[str, Any]] = []
    while len(out) < num_questions:
        for i in rng.permutation(len(pool)):
            if len(out) == num_questions:
                break
            topic, kind = pool[int(i)]
            question, answer, options = _question(region, attributes, topic, kind, rng)
            item: dict[str, Any] = {"question": question, "answer": answer, "type": kind}
            if options is not None:
                item["options"] = list(options)
            out.append(item)
    return out
