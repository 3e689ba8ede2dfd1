"""Task builders: one :class:`~echomoe.data.schema.UltrasoundSample` -> (prompt, target) pairs.

Tasks (:data:`TASKS`):

========== =============================== ==================================================
task       needs                           target
========== =============================== ==================================================
report     findings or impression          ``sample.report`` ("Findings: ... Impression: ...")
vqa        QA pairs                        the answer (one pair per QA item)
diagnosis  a diagnosis label               the label
segment    a non-empty mask                ``"Here is the <label>: [SEG]"``
detect     a valid box                     ``"The <label> is here: [DET]"``
measure    >= 2 keypoints                  ``"Calipers on the <label>: [KPT]."`` + size if known
========== =============================== ==================================================

A task a sample cannot support gives an empty list (it is skipped, never faked).  Every prompt is
``"<image>" * len(sample.images) + "\\n" + instruction + "\\n"``; the instruction is drawn from
at least three phrasings per task with the ``numpy.random.Generator`` passed in, so the same
generator state gives the same prompt.  Targets are fixed per task (so metrics can compare them).

The pixel label a grounding task refers to is chosen by :func:`primary_mask_name`,
:func:`primary_box` and the sample's keypoints; the collator uses the same functions, so the
``[SEG]`` / ``[DET]`` / ``[KPT]`` token and the supervised mask / box / points always agree.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from echomoe.data.schema import UltrasoundSample
from echomoe.data.tokenizer import DET_TOKEN, IMAGE_TOKEN, KPT_TOKEN, SEG_TOKEN

TASKS: tuple[str, ...] = ("report", "vqa", "diagnosis", "segment", "detect", "measure")
"""Task names, in the order used for ``task_ids``."""

PROMPTS: dict[str, tuple[str, ...]] = {
    "report": (
        "Write the ultrasound report for this study.",
        "Describe the findings in this ultrasound image and give an impression.",
        "Generate a findings and impression report for this scan.",
        "You are a sonographer. Report on this examination.",
    ),
    "vqa": (
        "{question}",
        "Answer the question about the ultrasound image. {question}",
        "Question: {question}",
        "Look at the scan and answer: {question}",
    ),
    "diagnosis": (
        "What is the most likely diagnosis?",
        "Give the diagnosis for this ultrasound study.",
        "Classify this study.",
        "Which diagnosis fits these ultrasound findings?",
    ),
    "segment": (
        "Segment the {label}.",
        "Please outline the {label} in this image.",
        "Where is the {label}? Output a segmentation mask.",
        "Draw the mask of the {label}.",
    ),
    "detect": (
        "Detect the {label}.",
        "Locate the {label} with a bounding box.",
        "Find the {label} and draw a box around it.",
        "Where is the {label}? Give its bounding box.",
    ),
    "measure": (
        "Measure the {label}.",
        "Place calipers on the {label} and report its size.",
        "How large is the {label}?",
        "Give the dimensions of the {label}.",
    ),
}
"""Instruction phrasings per task (``{label}`` / ``{question}`` are filled in)."""


@dataclass(frozen=True)
class TaskExample:
    """One formatted example: the task name, the prompt (with ``<image>`` tags) and target."""

    task: str
    prompt: str
    target: str


# ----------------------------------------------------------------------------- label choice
def primary_mask_name(sample: UltrasoundSample) -> str | None:
    """The mask a ``segment`` example refers to: ``"lesion"`` if it has foreground pixels,
    else the first non-empty mask; ``None`` when no mask has foreground."""
    names = sorted(sample.masks, key=lambda name: name != "lesion")  # stable: lesion first
    for name in names:
        if np.any(np.asarray(sample.masks[name])):
            return name
    return None


def _valid_bbox(bbox: Any) -> bool:
    try:
        x0, y0, x1, y1 = (float(v) for v in bbox)
    except (TypeError, ValueError):
        return False
    return all(math.isfinite(v) for v in (x0, y0, x1, y1)) and x1 >= x0 and y1 >= y0


def primary_box(sample: UltrasoundSample) -> dict[str, Any] | None:
    """The box a ``detect`` example refers to: the first valid box labelled ``"lesion"``, else
    the first valid box; ``None`` when there is none.  Boxes are ``{"label", "bbox"}`` with
    inclusive pixel indices ``(x_min, y_min, x_max, y_max)``."""
    valid = [b for b in sample.boxes if _valid_bbox(b.get("bbox"))]
    for box in valid:
        if box.get("label") == "lesion":
            return box
    return valid[0] if valid else None


def _describe(sample: UltrasoundSample, name: str | None) -> str:
    """Readable structure name: the lesion type for ``"lesion"`` when known."""
    lesion_type = sample.attributes.get("lesion_type")
    if name in (None, "lesion") and isinstance(lesion_type, str) and lesion_type != "none":
        return lesion_type
    return (name or "lesion").replace("_", " ")


# ----------------------------------------------------------------------------- builders
def image_prefix(sample: UltrasoundSample) -> str:
    """``"<image>"`` once per image, then a newline."""
    if not sample.images:
        raise ValueError(f"sample {sample.id!r} has no images")
    return IMAGE_TOKEN * len(sample.images) + "\n"


def _prompt(sample: UltrasoundSample, task: str, rng: np.random.Generator, **fill: str) -> str:
    phrasings = PROMPTS[task]
    template = phrasings[int(rng.integers(len(phrasings)))]
    return image_prefix(sample) + template.format(**fill) + "\n"


def build_report(sample: UltrasoundSample, rng: np.random.Generator) -> list[tuple[str, str]]:
    """Report generation: target ``sample.report``; ``[]`` without findings / impression."""
    if not sample.report:
        return []
    return [(_prompt(sample, "report", rng), sample.report)]


def build_vqa(sample: UltrasoundSample, rng: np.random.Generator) -> list[tuple[str, str]]:
    """One (prompt, answer) per QA pair with a non-empty question and answer."""
    out = []
    for qa in sample.qa:
        question, answer = str(qa.get("question", "")).strip(), str(qa.get("answer", "")).strip()
        if question and answer:
            out.append((_prompt(sample, "vqa", rng, question=question), answer))
    return out


def build_diagnosis(sample: UltrasoundSample, rng: np.random.Generator) -> list[tuple[str, str]]:
    """Diagnosis: target is the diagnosis label itself; ``[]`` when it is unknown."""
    if sample.diagnosis is None or not str(sample.diagnosis).strip():
        return []
    return [(_prompt(sample, "diagnosis", rng), str(sample.diagnosis).strip())]


def segment_turn(sample: UltrasoundSample, name: str, rng: np.random.Generator
                 ) -> tuple[str, str]:
    """``(prompt, target)`` asking for mask ``name`` of ``sample``; the target ends with
    ``[SEG]``."""
    label = _describe(sample, name)
    return _prompt(sample, "segment", rng, label=label), f"Here is the {label}: {SEG_TOKEN}"


def build_segment(sample: UltrasoundSample, rng: np.random.Generator) -> list[tuple[str, str]]:
    """Segmentation of :func:`primary_mask_name`; target ends with ``[SEG]``."""
    name = primary_mask_name(sample)
    return [] if name is None else [segment_turn(sample, name, rng)]


def measured_mask_name(sample: UltrasoundSample) -> str | None:
    """The mask whose outline a ``measure`` example's calipers span: ``"lesion"`` for lesion
    size calipers (``size_long_mm`` known and a non-empty lesion mask), else ``None`` (e.g. the
    left-ventricular diameter, a line across the cavity rather than the extent of a mask)."""
    if "size_long_mm" in sample.attributes and "lesion" in sample.masks \
            and np.any(np.asarray(sample.masks["lesion"])):
        return "lesion"
    return None


def build_detect(sample: UltrasoundSample, rng: np.random.Generator) -> list[tuple[str, str]]:
    """Detection of :func:`primary_box`; target ends with ``[DET]``."""
    box = primary_box(sample)
    if box is None:
        return []
    label = _describe(sample, box.get("label"))
    return [(_prompt(sample, "detect", rng, label=label), f"The {label} is here: {DET_TOKEN}")]


def measurement_text(attributes: Mapping[str, Any]) -> str:
    """The size sentence of a ``measure`` target (``""`` when no size attribute is known).

    ``size_long_mm`` (and ``size_short_mm``) -> ``"It measures 12.3 x 8.1 mm."``;
    ``lv_diameter_mm`` -> ``"The left ventricular diameter is 48.0 mm."``;
    ``head_circumference_mm`` (HC18) -> ``"The head circumference is 170.2 mm."``; values are
    printed with one decimal (the synthetic benchmark rounds sizes to 0.1 mm).
    """
    def number(key: str) -> float | None:
        value = attributes.get(key)
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
        return float(value) if ok and math.isfinite(value) else None

    long_mm, short_mm = number("size_long_mm"), number("size_short_mm")
    if long_mm is not None:
        if short_mm is not None:
            return f"It measures {long_mm:.1f} x {short_mm:.1f} mm."
        return f"It measures {long_mm:.1f} mm."
    lv = number("lv_diameter_mm")
    if lv is not None:
        return f"The left ventricular diameter is {lv:.1f} mm."
    hc = number("head_circumference_mm")
    if hc is not None:
        return f"The head circumference is {hc:.1f} mm."
    return ""


def build_measure(sample: UltrasoundSample, rng: np.random.Generator) -> list[tuple[str, str]]:
    """Caliper measurement from the sample's keypoints (>= 2 needed); the target holds
    ``[KPT]`` and, when the attributes carry one, the size in mm."""
    if len(sample.keypoints) < 2:
        return []
    attrs = sample.attributes
    if "size_long_mm" in attrs:
        label = _describe(sample, "lesion")
    elif "lv_diameter_mm" in attrs:
        label = "left ventricle"
    else:  # e.g. HC18: the "head" mask; no mask -> the lesion type or "lesion"
        label = _describe(sample, primary_mask_name(sample))
    target = f"Calipers on the {label}: {KPT_TOKEN}."
    size = measurement_text(sample.attributes)
    if size:
        target += f" {size}"
    return [(_prompt(sample, "measure", rng, label=label), target)]


BUILDERS: dict[str, Callable[[UltrasoundSample, np.random.Generator], list[tuple[str, str]]]] = {
    "report": build_report,
    "vqa": build_vqa,
    "diagnosis": build_diagnosis,
    "segment": build_segment,
    "detect": build_detect,
    "measure": build_measure,
}


def _check_task(task: str) -> None:
    if task not in BUILDERS:
        raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")


def build_task(
    task: str, sample: UltrasoundSample, rng: np.random.Generator
) -> list[tuple[str, str]]:
    """All (prompt, target) pairs of ``task`` for ``sample`` (``[]`` if unsupported)."""
    _check_task(task)
    return BUILDERS[task](sample, rng)


def supported_tasks(sample: UltrasoundSample) -> tuple[str, ...]:
    """Tasks (in :data:`TASKS` order) that ``sample`` has the labels for."""
    rng = np.random.default_rng(0)  # the phrasing does not matter here
    return tuple(task for task in TASKS if BUILDERS[task](sample, rng))


# ----------------------------------------------------------------------------- sampling
def check_rates(rates: Mapping[str, float], name: str = "rates") -> dict[str, float]:
    """``rates`` (``{task: rate}``, tasks from :data:`TASKS`, finite rates >= 0, at least one
    positive) as floats in :data:`TASKS` order; anything else is a ``ValueError`` whose
    message starts with ``name`` (the config loader passes ``"tasks"``)."""
    if not isinstance(rates, Mapping) or not rates:
        raise ValueError(f"{name} must be a non-empty dict of task -> rate; valid tasks: "
                         f"{', '.join(TASKS)}")
    unknown = [t for t in rates if t not in BUILDERS]
    if unknown:
        raise ValueError(f"{name} has unknown task(s) {', '.join(map(repr, unknown))}; valid "
                         f"tasks: {', '.join(TASKS)}")
    for task, rate in rates.items():
        if not isinstance(rate, int | float) or not math.isfinite(rate) or rate < 0:
            raise ValueError(f"{name}.{task} rate must be a finite number >= 0, got "
                             f"{rate!r}")
    if not any(rate > 0 for rate in rates.values()):
        raise ValueError(f"{name} need at least one task with a positive rate")
    return {t: float(rates[t]) for t in TASKS if t in rates}


class TaskSampler:
    """Pick one task per sample according to sampling rates, among the tasks it supports.

    Rates are relative weights (they need not sum to 1); tasks missing from ``rates`` or with
    rate 0 are never chosen.  For a sample, the rates of its supported tasks are renormalised,
    one task is drawn, and one of that task's (prompt, target) pairs is drawn (e.g. one QA pair).

    Randomness: with ``key=None`` draws come from one generator seeded by ``seed`` (results
    depend on call order); with a ``key`` (e.g. ``(epoch, index)``) the draw uses a generator
    seeded by ``(seed, *key)`` only, so results do not depend on worker count or order.

    Args:
        rates: ``{task: rate}`` with tasks from :data:`TASKS` and finite rates >= 0, at least
            one positive.
        seed: base seed.
    """

    def __init__(self, rates: Mapping[str, float], seed: int = 0):
        check_rates(rates)
        self.rates: dict[str, float] = {t: float(rates[t]) for t in TASKS if t in rates}
        self.seed = int(seed)
        self._rng = np.random.default_rng(self.seed)

    def supported(self, sample: UltrasoundSample) -> tuple[str, ...]:
        """Tasks with a positive rate that ``sample`` supports."""
        return tuple(t for t in supported_tasks(sample) if self.rates.get(t, 0.0) > 0)

    def _generator(self, key: int | Sequence[int] | None) -> np.random.Generator:
        if key is None:
            return self._rng
        key = [key] if isinstance(key, int | np.integer) else list(key)
        return np.random.default_rng([self.seed, *(int(k) for k in key)])

    def __call__(
        self, sample: UltrasoundSample, key: int | Sequence[int] | None = None
    ) -> TaskExample | None:
        """One :class:`TaskExample` for ``sample``, or ``None`` when it supports no task with
        a positive rate."""
        rng = self._generator(key)
        candidates = {}
        for task, rate in self.rates.items():
            if rate > 0:
                pairs = BUILDERS[task](sample, rng)
                if pairs:
                    candidates[task] = pairs
        if not candidates:
            return None
        tasks = list(candidates)
        weights = np.array([self.rates[t] for t in tasks])
        task = tasks[int(rng.choice(len(tasks), p=weights / weights.sum()))]
        pairs = candidates[task]
        prompt, target = pairs[int(rng.integers(len(pairs)))]
        return TaskExample(task=task, prompt=prompt, target=target)

    def follow_ups(self, sample: UltrasoundSample, first: TaskExample,
                   key: int | Sequence[int] | None = None) -> list[TaskExample]:
        """Further turns about the same image after ``first``, in random order: every
        (prompt, target) pair of the tasks with a positive rate except ``first``'s own, with
        the image prefix left out of the prompts (the image is already in the sequence).

        Tasks whose labels a row holds once (all but ``vqa``: one report, one diagnosis, one
        mask / box / set of keypoints per sample) appear at most once in a row, so never
        again after a ``first`` of the same task; ``vqa`` gives one turn per other question.
        With a ``key`` the draw is seeded by ``(seed, *key, 1)``, apart from ``__call__``'s.
        """
        rng = (self._rng if key is None else
               np.random.default_rng([self.seed, *np.atleast_1d(key).tolist(), 1]))
        prefix = image_prefix(sample)
        asked = set()  # the question of a vqa first turn, not asked again
        if first.task == "vqa":
            asked = {q for qa in sample.qa if (q := str(qa.get("question", "")).strip())
                     and q in first.prompt}
        turns = []
        for task, rate in self.rates.items():
            if rate <= 0 or (task == first.task and task != "vqa"):
                continue
            for prompt, target in BUILDERS[task](sample, rng):
                body = prompt.removeprefix(prefix)
                if task == "vqa" and any(q in body for q in asked):
                    continue
                turns.append(TaskExample(task, body, target))
        return [turns[i] for i in rng.permutation(len(turns))]

    def __repr__(self) -> str:
        return f"TaskSampler(rates={self.rates}, seed={self.seed})"
