"""Chance baselines: answers computed from the train split's statistics, never from the image.

A results table without priors cannot show a model that learned nothing.
:func:`prior_results` predicts every test example of the evaluation harness from the *train*
split alone and scores the predictions with the harness's own code
(:func:`~echomoe.metrics.harness.build_examples`, :func:`~echomoe.metrics.harness.score_examples`,
:func:`~echomoe.metrics.harness.summarize`, :func:`~echomoe.metrics.harness.make_records`).
For the same ``seed`` the examples, prompts and references are those that
:func:`~echomoe.metrics.harness.evaluate_model` scores, so the rows sit beside any model's::

    from echomoe.metrics.priors import prior_results

    priors = prior_results(train, test, image_size=64, measure_pairs=[(0, 1), (2, 3)])
    priors["prior_region"].metrics["overall"]["vqa/closed_accuracy"]

There are two priors: ``prior_global`` predicts one constant per question / task, and
``prior_region`` predicts one constant per anatomical region (``sample.region``).  Where the
region has no train example of the task (or question), it falls back to the global constant.
Per task:

============ ================================================================================
vqa          the most common train answer to the same question (the QA item's question text
             through :func:`~echomoe.metrics.vqa.normalize_answer`, so the prompt phrasing
             does not matter), else the most common answer to questions of the same type
             (``yes_no`` / ``choice`` / ``open``), else the most common answer overall.
             Answers are counted by their normalised form (the form the metrics compare).
             The lookup order is: question in the region, question globally, type in the
             region, type globally, any in the region, any globally.
diagnosis    the most common train diagnosis label
report       the most typical train report, which is the medoid by unigram F1: the report with
             the highest summed unigram F1 (the :func:`~echomoe.metrics.text.tokenize` tokens,
             as ROUGE-1) to the other reports of its group.  It is picked among at most
             :data:`MAX_REPORTS` evenly spaced train reports, which keeps it fast and
             deterministic.  Unlike a word-by-word consensus, a medoid is a real report, so
             it stays fluent and parseable for the finding metrics.
segment      the best constant mask: the pixel frequency of the train masks at the model's
             input size ``S x S`` (resized as the harness resizes references), thresholded
             at the level with the highest mean Dice on the train masks.  Lesions that move
             around the image make the strict majority (``> 0.5``) empty or tiny; the
             best-Dice level is the strongest mask a model could output without the image
detect       the mean train box (pixel edges divided by each image's width / height), mapped to
             each test image's size as pixel edges ``xyxy``
measure      keypoints: the mean train keypoints in normalised coordinates
             (``(x + 0.5) / W``, ``(y + 0.5) / H``, as the collator does) over the train samples
             with the same number of keypoints, mapped to each test image as the model's
             ``keypoints_to_pixels`` maps them.  Caliper lengths: the train *median* length in
             mm of each ``measure_pairs`` pair, a constant that does not depend on the test
             image.  The median is the constant with the least absolute error.  A length taken
             from the mean keypoints would be biased short, because averaging the endpoints of
             differently oriented calipers pulls them together.
============ ================================================================================

Grounding outputs carry the ``has_*`` flags and ``emitted=True`` (a prior always answers).
If the train split has no example of a task, the prior predicts an empty answer: ``""``, an
empty mask, a zero box, or no keypoints (NaN errors).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Iterable, Sequence
from typing import Any

import numpy as np

from echomoe.data.collate import resize_mask
from echomoe.data.tasks import TASKS, primary_box, primary_mask_name
from echomoe.metrics.harness import (
    EvalResult,
    _as_samples,
    _Example,
    build_examples,
    make_records,
    score_examples,
    summarize,
)
from echomoe.metrics.text import consensus_index, resolve_language
from echomoe.metrics.vqa import normalize_answer

__all__ = ["MAX_REPORTS", "PRIOR_NAMES", "prior_result", "prior_results", "report_ceiling"]

MAX_REPORTS = 200
"""The most train reports per group among which the report prior's medoid is chosen."""

PRIOR_NAMES: dict[str, bool] = {"prior_global": False, "prior_region": True}
"""The names :func:`prior_results` returns, and whether each prior is per region."""

_GLOBAL = "*"  # group key of the global statistics (no region is named "*")
_TEXT_TASKS = ("report", "vqa", "diagnosis")


# ----------------------------------------------------------------------------- helpers
def _vqa_questions(examples: Sequence[_Example]) -> list[str]:
    """The normalised question of each VQA example (``""`` for other tasks).

    ``build_examples`` emits a sample's VQA examples consecutively, one per QA item that has
    a non-empty question and answer, so the n-th VQA example of a sample is its n-th such
    item.
    """
    out: list[str] = []
    asked: Counter[int] = Counter()
    for ex in examples:
        if ex.task != "vqa":
            out.append("")
            continue
        kept = [qa for qa in ex.sample.qa
                if str(qa.get("question", "")).strip() and str(qa.get("answer", "")).strip()]
        out.append(normalize_answer(kept[asked[ex.index]]["question"]))
        asked[ex.index] += 1
    return out


def _majority(answers: Sequence[str]) -> str:
    """The most common answer by normalised form; its most common spelling is returned (ties:
    the first seen)."""
    forms = Counter(normalize_answer(a) for a in answers)
    best = forms.most_common(1)[0][0]
    return Counter(a for a in answers if normalize_answer(a) == best).most_common(1)[0][0]


def _medoid(reports: Sequence[str], language: str = "auto") -> str:
    """The report with the highest summed unigram F1 to the others (see the module doc)."""
    n = len(reports)
    picks = np.unique(np.linspace(0, n - 1, min(n, MAX_REPORTS)).round().astype(int))
    return reports[int(picks[consensus_index([reports[i] for i in picks], language)])]


def _majority_mask(masks: np.ndarray) -> np.ndarray:
    """The best constant mask for ``(N, S, S)`` boolean train masks: the pixel frequency
    ``mean`` thresholded at the level whose mask has the highest mean Dice on those train masks
    (never empty unless all are)."""
    mean = masks.mean(axis=0)
    levels = np.unique(mean[mean > 0])
    if levels.size == 0:
        return np.zeros_like(mean, dtype=bool)
    flat = masks.reshape(len(masks), -1).astype(np.float64)
    candidates = mean.reshape(1, -1) >= levels[:, None]  # (T, S*S), T <= N distinct levels
    inter = candidates.astype(np.float64) @ flat.T  # (T, N)
    denom = candidates.sum(axis=1)[:, None] + flat.sum(axis=1)[None, :]
    dice = np.divide(2 * inter, denom, out=np.ones_like(inter), where=denom > 0)
    return candidates[int(np.argmax(dice.mean(axis=1)))].reshape(mean.shape)


def _size_wh(ex: _Example) -> np.ndarray:
    """``(W, H)`` of the example's key frame."""
    h, w = ex.sample.image_array(0).shape[:2]
    return np.array([w, h], dtype=np.float64)


def _points(ex: _Example) -> np.ndarray:
    """The sample's keypoints ``(K, 2)`` in pixels, in insertion order (as the harness)."""
    return np.asarray(list(ex.sample.keypoints.values()), dtype=np.float64).reshape(-1, 2)


def _first(table: dict, keys: Iterable[Hashable]) -> Any:
    """The value of the first of ``keys`` in ``table`` (``None`` when none is)."""
    return next((table[k] for k in keys if k in table), None)


# ----------------------------------------------------------------------------- fitting
class _Prior:
    """Statistics of the train examples, keyed by group (a region, or :data:`_GLOBAL`)."""

    def __init__(self, train: Sequence[_Example], *, by_region: bool, image_size: int,
                 measure_pairs: Sequence[tuple[int, int]]):
        self.by_region = by_region
        self.text: dict[tuple, str] = {}  # (task, group, key) -> answer
        self.masks: dict[str, np.ndarray] = {}  # group -> (S, S) bool
        self.boxes: dict[str, np.ndarray] = {}  # group -> normalised edges (4,)
        self.points: dict[tuple[str, int], np.ndarray] = {}  # (group, K) -> (K, 2) normalised
        self.lengths: dict[tuple[str, int], np.ndarray] = {}  # (group, K) -> (P,) mm
        self.common_k: dict[str, int] = {}  # group -> most common keypoint count
        questions = _vqa_questions(train)
        grouped: dict[tuple[str, str], list[int]] = {}
        for i, ex in enumerate(train):
            for group in self._groups(ex):
                grouped.setdefault((ex.task, group), []).append(i)
        for (task, group), rows in grouped.items():
            members = [train[i] for i in rows]
            if task in _TEXT_TASKS:
                self._fit_text(task, group, members, [questions[i] for i in rows])
            elif task == "segment":
                masks = [resize_mask(ex.sample.masks[primary_mask_name(ex.sample)],
                                     (image_size, image_size)) > 0.5 for ex in members]
                self.masks[group] = _majority_mask(np.stack(masks))
            elif task == "detect":
                boxes = [np.asarray(primary_box(ex.sample)["bbox"], dtype=np.float64)
                         + np.array([0.0, 0.0, 1.0, 1.0]) for ex in members]  # pixel edges
                self.boxes[group] = np.mean(
                    [b / np.tile(_size_wh(ex), 2) for b, ex in zip(boxes, members, strict=True)],
                    axis=0)
            elif task == "measure":
                self._fit_points(group, members, measure_pairs)

    def _groups(self, ex: _Example) -> tuple[str, ...]:
        return (_GLOBAL, ex.sample.region) if self.by_region else (_GLOBAL,)

    def _fit_text(self, task: str, group: str, members: list[_Example],
                  questions: list[str]) -> None:
        references = [ex.reference for ex in members]
        if task == "report":
            self.text[(task, group, "")] = _medoid(references)
            return
        self.text[(task, group, "")] = _majority(references)
        if task == "vqa":
            by_key: dict[str, list[str]] = {}
            for ex, question in zip(members, questions, strict=True):
                by_key.setdefault("question:" + question, []).append(ex.reference)
                by_key.setdefault("type:" + ex.qa_type, []).append(ex.reference)
            for key, answers in by_key.items():
                self.text[(task, group, key)] = _majority(answers)

    def _fit_points(self, group: str, members: list[_Example],
                    measure_pairs: Sequence[tuple[int, int]]) -> None:
        by_k: dict[int, list[_Example]] = {}
        for ex in members:
            by_k.setdefault(len(ex.sample.keypoints), []).append(ex)
        self.common_k[group] = Counter(len(ex.sample.keypoints) for ex in members) \
            .most_common(1)[0][0]
        for k, rows in by_k.items():
            self.points[(group, k)] = np.mean(
                [(_points(ex) + 0.5) / _size_wh(ex) for ex in rows], axis=0)
            spaced = [(_points(ex), float(ex.sample.pixel_spacing)) for ex in rows
                      if ex.sample.pixel_spacing is not None]
            lengths = [float(np.median([np.hypot(*(p[b] - p[a])) * sp for p, sp in spaced]))
                       if spaced and a < k and b < k else math.nan for a, b in measure_pairs]
            self.lengths[(group, k)] = np.asarray(lengths, dtype=np.float64)

    # -------------------------------------------------------------------------- prediction
    def predict(self, ex: _Example, question: str, image_size: int) -> None:
        """Fill ``ex.prediction`` / ``ex.ground`` / ``ex.emitted`` in place."""
        groups = (ex.sample.region, _GLOBAL) if self.by_region else (_GLOBAL,)
        ex.emitted = True
        if ex.task in _TEXT_TASKS:
            keys = ("question:" + question, "type:" + ex.qa_type, "") if ex.task == "vqa" \
                else ("",)
            answer = _first(self.text, ((ex.task, g, key) for key in keys for g in groups))
            ex.prediction = answer or ""
        elif ex.task == "segment":
            mask = _first(self.masks, groups)
            ex.ground = {"has_seg": True, "masks": np.zeros((image_size, image_size), bool)
                         if mask is None else mask.copy()}
        elif ex.task == "detect":
            box = _first(self.boxes, groups)
            ex.ground = {"has_det": True, "boxes_xyxy": np.zeros(4) if box is None
                         else box * np.tile(_size_wh(ex), 2)}
        elif ex.task == "measure":
            k = len(ex.sample.keypoints)
            keys = [(g, k) for g in groups] + [(g, self.common_k[g]) for g in groups
                                               if g in self.common_k]
            key = next((key for key in keys if key in self.points), None)
            ex.ground = {"has_kpt": True}
            if key is not None:
                ex.ground.update(keypoints_px=self.points[key] * _size_wh(ex) - 0.5,
                                 measurements_mm=self.lengths[key].copy())


# ----------------------------------------------------------------------------- entry points
def _check_tasks(tasks: Sequence[str]) -> list[str]:
    if isinstance(tasks, str):
        tasks = [tasks]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; valid: {', '.join(TASKS)}")
    return [t for t in TASKS if t in tasks]


def prior_result(train_samples: Any, test_samples: Any, tasks: Sequence[str] = TASKS, *,
                 by_region: bool, image_size: int, measure_pairs: Sequence[Sequence[int]],
                 seed: int = 0, language: str = "auto") -> EvalResult:
    """Score the global (``by_region=False``) or per-region (``by_region=True``) prior on
    ``test_samples`` (see the module docstring for what it predicts).

    Args:
        train_samples: the samples the statistics come from: a list of
            :class:`~echomoe.data.schema.UltrasoundSample` or a ``datasets.Dataset`` made by
            :func:`~echomoe.data.schema.to_hf_dataset`.
        test_samples: the samples to score, in the same forms.  Only their labels are read
            (the references, the image size and the pixel spacing), never the pixels.
        tasks: tasks from :data:`~echomoe.data.tasks.TASKS` (run in that order).
        by_region: one constant per region (falling back to the global one) or one overall.
        image_size: the model input size ``S`` whose ``S x S`` masks are scored.
        measure_pairs: the caliper pairs (the model's ``grounding_config["measure_pairs"]``).
        seed: prompt-phrasing seed, the ``seed`` of the ``evaluate_model`` run to compare with.
        language: text-metric tokenisation, as ``evaluate_model``'s (the medoid uses it too).

    Returns:
        An :class:`~echomoe.metrics.harness.EvalResult` with the shape of ``evaluate_model``'s
        (``routing == {}``; ``settings`` has ``prior``, ``tasks``, ``seed``, ``num_samples``,
        ``num_train_samples``, ``image_size``, ``measure_pairs``).

    Raises:
        ValueError: an unknown task, an empty train split, or ``image_size < 1``.
    """
    tasks = _check_tasks(tasks)
    if int(image_size) < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    train, test = _as_samples(train_samples), _as_samples(test_samples)
    if not train:
        raise ValueError("the train split is empty: priors need train samples")
    image_size = int(image_size)
    pairs = [(int(a), int(b)) for a, b in measure_pairs]
    prior = _Prior(build_examples(train, tasks, seed), by_region=by_region,
                   image_size=image_size, measure_pairs=pairs)
    examples = build_examples(test, tasks, seed)
    for ex, question in zip(examples, _vqa_questions(examples), strict=True):
        prior.predict(ex, question, image_size)
    language = resolve_language(language, [ex.reference for ex in examples])
    score_examples(examples, image_size, pairs, language=language)
    settings = {"prior": "per_region" if by_region else "global", "tasks": list(tasks),
                "seed": seed, "num_samples": len(test), "num_train_samples": len(train),
                "image_size": image_size, "measure_pairs": [list(p) for p in pairs],
                "language": language}
    return EvalResult(summarize(examples, tasks, len(test), language=language),
                      make_records(examples), {}, settings)


def prior_results(train_samples: Any, test_samples: Any, tasks: Sequence[str] = TASKS, *,
                  image_size: int, measure_pairs: Sequence[Sequence[int]],
                  seed: int = 0, language: str = "auto") -> dict[str, EvalResult]:
    """Both priors of :func:`prior_result`: ``{"prior_global": ..., "prior_region": ...}``."""
    train, test = _as_samples(train_samples), _as_samples(test_samples)
    return {name: prior_result(train, test, tasks, by_region=by_region, image_size=image_size,
                               measure_pairs=measure_pairs, seed=seed, language=language)
            for name, by_region in PRIOR_NAMES.items()}


def report_ceiling(test_samples: Any, *, seed: int = 0, phrasing_seed: int = 1
                   ) -> EvalResult | None:
    """What a model that reads every finding right scores on the report metrics of synthetic
    cases: each test case's own attributes written again by the benchmark's report writer
    (:func:`~echomoe.data.synthetic.reports.write_report`) with another phrasing and sentence
    order (``phrasing_seed``).

    Its finding F1 is 1 by construction; its BLEU / ROUGE are the ceiling that the
    benchmark's paraphrase randomness leaves (a model cannot know which phrasing the reference
    drew).  Only synthetic cases (a region of ``vocab.ORGANS`` and ``attributes``) are scored;
    ``None`` when there are none.  ``seed``: the prompt seed, as :func:`prior_result`.
    """
    from echomoe.data.synthetic.reports import write_report
    from echomoe.data.synthetic.vocab import ORGANS

    test = [s for s in _as_samples(test_samples) if s.region in ORGANS and s.attributes]
    if not test:
        return None
    rng = np.random.default_rng(phrasing_seed)
    examples = build_examples(test, ["report"], seed)
    for ex in examples:
        findings, impression = write_report(ex.sample.region, ex.sample.attributes, rng)
        ex.prediction = f"Findings: {findings} Impression: {impression}"
        ex.emitted = True
    score_examples(examples, 1, [])
    settings = {"prior": "report_ceiling", "tasks": ["report"], "seed": seed,
                "phrasing_seed": phrasing_seed, "num_samples": len(test)}
    return EvalResult(summarize(examples, ["report"], len(test)), make_records(examples), {},
                      settings)
