"""The evaluation harness: generate, ground and score a model on every task, per region.

::

    from echomoe.metrics.harness import evaluate_model, write_results

    result = evaluate_model(model, processor, samples, tasks=("report", "vqa", "segment"))
    result.metrics["per_task"]["report"]["bleu4"]
    result.metrics["per_region"]["thyroid"]["segment"]["dice"]
    result.records[0]        # {"id", "region", "task", "prompt", "prediction", "reference",
                             #  "scores": {...}} -- one row per (sample, prompt)
    result.routing           # per-layer routing report (echomoe.metrics.routing)
    write_results(result, "runs/eval")   # metrics.json, records.jsonl, metrics.md

How it runs (all deterministic):

1. **Prompts.**  For every task and sample, :func:`echomoe.data.tasks.build_task` with the
   generator ``default_rng([seed, sample_index, task_index])`` gives the (prompt, reference)
   pairs (VQA: one per question).  Samples that do not support a task are skipped.
2. **Generation.**  Batches of ``batch_size`` prompts go through the processor (left padded)
   and ``model.generate`` (greedy, ``max_new_tokens``; ``<image>`` is banned as an output
   token; with ``report_samples > 1`` reports are the minimum-Bayes-risk consensus of that
   many samples, :mod:`echomoe.models.decoding`).  The text up to the first eos is the
   prediction; closed questions (yes / no, the options a choice question lists) and diagnoses
   are answered with their most likely option instead (``closed="rank"``, the default;
   :mod:`echomoe.metrics.ranking`; the free text is kept in the record's ``generated``).
   The routers see the region the model predicts from the image (``regions="predicted"``,
   the default: the fair protocol, since a deployed model is not told the anatomy) or each
   sample's true region (``regions="given"``, the oracle; samples of unknown region still use
   the prediction).
3. **Grounding.**  For ``segment`` / ``detect`` / ``measure`` the prompt + generated tokens go
   through ``model.ground``.  When the model did not emit the task token (``[SEG]`` /
   ``[DET]`` / ``[KPT]``) it is appended (``force_task_token=True``, the default) so the head
   is still read out; ``task_token_rate`` reports how often the model emitted it itself.
   With ``measure="mask"`` a lesion measurement also asks for the lesion's mask and takes its
   calipers from it (:func:`evaluate_model`; ``mask_calipers_rate``: the fraction of measure
   examples measured so).
4. **Routing.**  One forward over prompt + generation per batch (for grounding tasks, the
   ``ground`` forward itself) feeds a :class:`~echomoe.metrics.routing.RoutingAccumulator`
   (padding excluded), so the routing report covers every evaluated token.  Its region x
   expert matrices count tokens by the samples' *true* regions, also when the router routed
   with predicted ones.
5. **Scoring** (each function documented in its module):

   ============ ==============================================================================
   report       BLEU-1..4, ROUGE-1/2/L, CIDEr-D (:func:`~echomoe.metrics.text.report_metrics`),
                finding-F1 micro / macro and size error in mm
                (:mod:`echomoe.metrics.findings`, from the parsed generated report)
   vqa          :func:`~echomoe.metrics.vqa.vqa_metrics` (closed accuracy, open exact match,
                token F1)
   diagnosis    accuracy / macro-F1 of the label read from the generated text
                (:func:`~echomoe.metrics.findings.diagnosis_label`) vs the sample's diagnosis
   segment      Dice, IoU, HD95 (mm) of the predicted mask vs the reference mask *resized to
                the model's image size* ``S x S`` (nearest neighbour, as in training); HD95 uses
                the pixel spacing scaled to that grid, ``(spacing * H / S, spacing * W / S)``
                per (row, col); ``hd95_undefined`` = fraction of samples where exactly one mask
                is empty (their HD95 is NaN and left out of the mean)
   detect       box IoU and Acc@0.5 in original pixel edges (``box_iou`` / ``acc50``)
   measure      keypoint radial error (px, mm) over the first ``min(K, n)`` reference
                keypoints (insertion order, as the collator; the two ends of each caliper
                pair matched in the nearer order), and the absolute / relative error
                of each caliper pair of ``grounding_config["measure_pairs"]`` that the reference
                has (reference length = keypoint distance x pixel spacing);
                ``measurement_bias_mm`` is the signed mean, predicted - reference (< 0:
                calipers too short)
   ============ ==============================================================================

   Corpus-level metrics (BLEU, CIDEr, finding-F1, accuracy) are recomputed on each region's
   subset; per-sample metrics are averaged over finite values.  A metric that is undefined on
   a subset (e.g. no open questions, no sample with pixel spacing) is NaN; ``write_results``
   writes NaN as ``null`` in JSON and ``-`` in markdown.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from echomoe.data.collate import resize_mask
from echomoe.data.schema import UltrasoundSample, from_hf_dataset
from echomoe.data.tasks import (
    TASKS,
    build_task,
    measured_mask_name,
    primary_box,
    primary_mask_name,
    segment_turn,
)
from echomoe.data.tokenizer import DET_TOKEN, IMAGE_TOKEN, KPT_TOKEN, SEG_TOKEN
from echomoe.grounding.calipers import calipers_near
from echomoe.grounding.losses import match_point_pairs
from echomoe.metrics.detection import box_iou, inclusive_to_edges
from echomoe.metrics.findings import (
    diagnosis_label,
    diagnosis_metrics,
    finding_f1,
    normalize_label,
    size_error_mm,
)
from echomoe.metrics.keypoints import measurement_error, radial_error
from echomoe.metrics.ranking import closed_options, diagnosis_options, rank_options
from echomoe.metrics.routing import RoutingAccumulator
from echomoe.metrics.segmentation import dice, hd95, iou
from echomoe.metrics.text import (
    LANGUAGES,
    HypothesisPool,
    bleu,
    consensus_index,
    report_metrics,
    resolve_language,
)
from echomoe.metrics.vqa import vqa_metrics
from echomoe.models.decoding import sample_sequences

GROUNDING_TOKENS: dict[str, str] = {"segment": SEG_TOKEN, "detect": DET_TOKEN,
                                    "measure": KPT_TOKEN}
"""The task token each grounding task's head reads."""

REGION_PROTOCOLS = ("predicted", "given")
"""Where the routers' region ids come from at evaluation (see :func:`evaluate_model`)."""

MEASURE_PROTOCOLS = ("keypoints", "mask")
"""Where a lesion measurement's calipers come from at evaluation (see :func:`evaluate_model`)."""

TASK_METRICS: dict[str, tuple[str, ...]] = {
    "report": ("bleu1", "bleu2", "bleu3", "bleu4", "rouge1", "rouge2", "rougeL", "cider",
               "finding_f1_micro", "finding_f1_macro", "size_error_mm", "size_reported_rate",
               "pool_rate"),
    "vqa": ("closed_accuracy", "open_exact_match", "open_token_f1", "exact_match", "token_f1"),
    "diagnosis": ("accuracy", "macro_f1", "parse_rate"),
    "segment": ("dice", "iou", "hd95_mm", "hd95_undefined", "task_token_rate"),
    "detect": ("box_iou", "acc50", "task_token_rate"),
    "measure": ("radial_error_px", "radial_error_mm", "measurement_abs_mm",
                "measurement_rel_pct", "measurement_bias_mm", "mask_calipers_rate",
                "task_token_rate"),
}
"""Metric keys reported for each task (plus ``"n"``, the number of scored examples)."""


@dataclass
class EvalResult:
    """What :func:`evaluate_model` returns.

    Attributes:
        metrics: ``{"overall": {"<task>/<metric>": v, "num_samples", "num_examples"},
            "per_task": {task: {metric: v, "n"}}, "per_region": {region: {task: {...}}}}``.
        records: one row per scored example: ``id``, ``region``, ``task``, ``prompt``,
            ``prediction``, ``reference``, ``scores`` (per-sample values).
        routing: per-layer routing report over the whole run (``{}`` for a dense model).
        settings: the arguments the run used.
    """

    metrics: dict[str, Any]
    records: list[dict[str, Any]]
    routing: dict[str, dict[str, Any]] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)

    def to_dict(self) -> dict[str, Any]:
        """A plain dict of every field."""
        return asdict(self)


@dataclass
class _Example:
    index: int
    sample: UltrasoundSample
    task: str
    prompt: str
    reference: str
    qa_type: str = ""
    options: list[str] = field(default_factory=list)  # the QA item's listed options, if any
    prediction: str = ""
    generated: str | None = None  # the free generation, when a ranked option replaced it
    emitted: bool = True
    ground: dict[str, np.ndarray] = field(default_factory=dict)
    scores: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- prompts
def _as_samples(samples: Any) -> list[UltrasoundSample]:
    if isinstance(samples, UltrasoundSample):
        return [samples]
    if hasattr(samples, "features") and hasattr(samples, "column_names"):  # datasets.Dataset
        return from_hf_dataset(samples)
    samples = list(samples)
    bad = [type(s).__name__ for s in samples if not isinstance(s, UltrasoundSample)]
    if bad:
        raise TypeError(f"samples must be UltrasoundSample objects or a datasets.Dataset made by "
                        f"echomoe.data.schema.to_hf_dataset; got {bad[0]}")
    return samples


def build_examples(samples: Sequence[UltrasoundSample], tasks: Sequence[str],
                   seed: int = 0) -> list[_Example]:
    """Every (sample, prompt, reference) of ``tasks``, task-major (deterministic by ``seed``)."""
    examples = []
    for task in tasks:
        t = TASKS.index(task)
        for i, sample in enumerate(samples):
            pairs = build_task(task, sample, np.random.default_rng([seed, i, t]))
            kept = [qa for qa in sample.qa
                    if str(qa.get("question", "")).strip() and str(qa.get("answer", "")).strip()]
            for j, (prompt, reference) in enumerate(pairs):
                qa = kept[j] if task == "vqa" else {}
                examples.append(_Example(i, sample, task, prompt, reference,
                                         str(qa.get("type", "open")) if qa else "",
                                         list(qa.get("options") or [])))
    # The diagnosis classes: the synthetic vocabulary and every label of these samples (a real
    # dataset's benign / malignant / normal), as a classification benchmark's class list.
    classes = sorted(set(diagnosis_options()) | {ex.reference for ex in examples
                                                 if ex.task == "diagnosis"})
    for ex in examples:
        if ex.task == "diagnosis":
            ex.options = classes
    return examples


def report_texts(samples: Any, seed: int = 0) -> list[str]:
    """The reference reports of ``samples`` (the ``report`` task's references, as scored), e.g.
    a train split's, for :func:`evaluate_model`'s ``report_pool``."""
    return [ex.reference for ex in build_examples(_as_samples(samples), ["report"], seed)]


# ----------------------------------------------------------------------------- model running
def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _routing_region(sample: UltrasoundSample, regions: Sequence[str]) -> str:
    return sample.region if sample.region in regions else "unknown"


def _pad_right(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def _run_batch(model, processor, batch: list[_Example], *, max_new_tokens: int,
               given_regions: bool, force_task_token: bool, rank_closed: bool,
               accumulator: RoutingAccumulator, report_samples: int = 1,
               report_temperature: float = 1.0, seed: int = 0, language: str = "auto",
               measure: str = "keypoints", pool: HypothesisPool | None = None) -> None:
    """Generate, decode and (for grounding tasks) ground one batch of one task, in place."""
    tok = processor.tokenizer
    device = _model_device(model)
    task = batch[0].task
    regions = [_routing_region(ex.sample, processor.regions) for ex in batch]
    inputs = processor(images=[list(ex.sample.images) for ex in batch],
                       text=[ex.prompt for ex in batch],
                       regions=regions if given_regions else None, padding_side="left")
    inputs = {k: v.to(device) for k, v in inputs.items()}
    image_id = processor.image_token_id
    stop = {"pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id,
            "bad_words_ids": [[image_id]], "max_new_tokens": max_new_tokens}
    mbr = task == "report" and report_samples > 1
    if mbr:
        out = sample_sequences(model, inputs, num_samples=report_samples, seed=seed,
                               temperature=report_temperature, **stop)
    else:
        out = model.generate(**inputs, do_sample=False, num_beams=1, **stop)
    prompt_len = inputs["input_ids"].shape[1]
    drop = {tok.pad_token_id, tok.bos_token_id, image_id}
    task_id = tok.convert_tokens_to_ids(GROUNDING_TOKENS[task]) if task in GROUNDING_TOKENS \
        else None

    def decoded(row: int) -> tuple[list[int], str]:
        generated = out[row, prompt_len:].tolist()
        if tok.eos_token_id in generated:
            generated = generated[: generated.index(tok.eos_token_id)]
        generated = [t for t in generated if t not in drop]
        return generated, tok.decode(generated, skip_special_tokens=task_id is None).strip()

    rows = []
    for i, ex in enumerate(batch):
        if mbr:  # the consensus of the sampled reports (echomoe.models.decoding)
            candidates = [decoded(i * report_samples + j) for j in range(report_samples)]
            texts = [text for _, text in candidates]
            if pool is None:
                generated, ex.prediction = candidates[consensus_index(texts, language)]
            else:
                chosen, ex.prediction = pool.choose(texts)
                ex.scores["from_pool"] = float(chosen < 0)
                generated = candidates[chosen][0] if chosen >= 0 else tok.encode(
                    ex.prediction, add_special_tokens=False)
        else:
            generated, ex.prediction = decoded(i)
        if task_id is not None:
            ex.emitted = task_id in generated
            if not ex.emitted and force_task_token:
                generated = [*generated, task_id]
        prompt = inputs["input_ids"][i][inputs["attention_mask"][i].bool()].tolist()
        rows.append(prompt + generated)
    if rank_closed and task_id is None:
        options = [closed_options(ex.task, ex.prompt, ex.qa_type, ex.options) for ex in batch]
        ranked = [i for i, opts in enumerate(options) if opts]
        if ranked:
            region_ids = inputs.get("region_ids")
            best = rank_options(
                model, processor, [list(batch[i].sample.images) for i in ranked],
                [batch[i].prompt for i in ranked], [options[i] for i in ranked],
                region_ids=None if region_ids is None else region_ids[ranked])
            for i, choice in zip(ranked, best, strict=True):
                batch[i].generated = batch[i].prediction
                batch[i].prediction = options[i][choice]
                prompt_len_i = int(inputs["attention_mask"][i].sum())
                rows[i] = rows[i][:prompt_len_i] + tok.encode(batch[i].prediction,
                                                              add_special_tokens=False)
    # Right-padded prompt + generation: positions start at 0 for every row, as in training.
    ids, mask = _pad_right(rows, tok.pad_token_id, device)
    region_ids = inputs.get("region_ids")
    # Routing is tabulated against the samples' true regions, whatever the router was given.
    names = list(processor.regions)
    true_regions = torch.tensor([names.index(r) if r in names else -1 for r in regions])
    if task_id is None:
        fwd = model(input_ids=ids, attention_mask=mask, pixel_values=inputs["pixel_values"],
                    image_counts=inputs["image_counts"], region_ids=region_ids)
        accumulator.update(fwd.routing, token_mask=mask, region_ids=true_regions)
        return
    sizes = torch.tensor([ex.sample.image_array(0).shape[:2] for ex in batch], dtype=torch.long)
    spacing = torch.tensor([math.nan if ex.sample.pixel_spacing is None
                            else float(ex.sample.pixel_spacing) for ex in batch])
    grounded = model.ground(ids, inputs["pixel_values"], image_counts=inputs["image_counts"],
                            region_ids=region_ids, attention_mask=mask,
                            original_sizes=sizes.to(device), pixel_spacing=spacing.to(device))
    accumulator.update(model.routing_context.routing(), token_mask=mask,
                       region_ids=true_regions)
    for i, ex in enumerate(batch):
        ex.ground = {k: v[i].detach().cpu().numpy() for k, v in grounded.items()}
    if task == "measure" and measure == "mask":
        _calipers_from_masks(model, processor, batch, region_ids, seed)


def _calipers_from_masks(model, processor, batch: list[_Example], region_ids, seed: int) -> None:
    """``measure="mask"``: each lesion measurement of ``batch`` asks the model for the lesion's
    mask (the ``segment`` prompt for it, answered ``Here is the <label>: [SEG]``) and replaces
    the keypoint head's calipers by those of the mask component nearest them
    (:func:`~echomoe.grounding.calipers.calipers_near`); an empty mask keeps the head's."""
    names = {i: measured_mask_name(ex.sample) for i, ex in enumerate(batch)
             if len(ex.ground.get("keypoints_px", ())) >= 4 and ex.ground.get("has_kpt", True)}
    rows = [i for i, name in names.items() if name]
    for ex in batch:
        ex.ground["mask_calipers"] = np.bool_(False)
    if not rows:
        return
    tok, device = processor.tokenizer, _model_device(model)
    turns = [segment_turn(batch[i].sample, names[i],
                          np.random.default_rng([seed, batch[i].index, len(TASKS)]))
             for i in rows]
    enc = processor(images=[list(batch[i].sample.images) for i in rows],
                    text=[prompt for prompt, _ in turns], padding_side="left")
    ids = [p[m.bool()].tolist() + tok.encode(target, add_special_tokens=False)
           for p, m, (_, target) in zip(enc["input_ids"], enc["attention_mask"], turns,
                                        strict=True)]
    ids, mask = _pad_right(ids, tok.pad_token_id, device)
    masks = model.ground(ids, enc["pixel_values"].to(device),
                         image_counts=enc["image_counts"].to(device),
                         region_ids=None if region_ids is None else region_ids[rows],
                         attention_mask=mask)["masks"].cpu().numpy()
    pairs = model.config.grounding_config["measure_pairs"]
    for j, i in enumerate(rows):
        ex, pred = batch[i], masks[j]
        h0, w0 = ex.sample.image_array(0).shape[:2]
        points = ex.ground["keypoints_px"]
        refined = calipers_near(pred, points[:4], (h0 / pred.shape[0], w0 / pred.shape[1]))
        if refined is None:
            continue
        points = points.copy()
        points[:4] = refined
        spacing = math.nan if ex.sample.pixel_spacing is None else float(ex.sample.pixel_spacing)
        lengths = [float(np.hypot(*(points[b] - points[a]))) * spacing for a, b in pairs]
        ex.ground.update(keypoints_px=points, measurements_mm=np.array(lengths),
                         mask_calipers=np.bool_(True))


# ----------------------------------------------------------------------------- per-sample scores
def _score_grounding(ex: _Example, image_size: int, measure_pairs: list[tuple[int, int]]):
    g, s = ex.ground, ex.sample
    h0, w0 = s.image_array(0).shape[:2]
    spacing = math.nan if s.pixel_spacing is None else float(s.pixel_spacing)
    ex.scores["task_token"] = float(ex.emitted)
    if ex.task == "segment":
        true = resize_mask(s.masks[primary_mask_name(s)], (image_size, image_size)) > 0.5
        pred = g["masks"] if "masks" in g and g.get("has_seg", True) else np.zeros_like(true)
        pred = pred.astype(bool)
        sp = np.array([[spacing * h0 / image_size, spacing * w0 / image_size]])
        ex.scores.update(dice=float(dice(pred, true)[0]), iou=float(iou(pred, true)[0]),
                         hd95_mm=float(hd95(pred, true, spacing_mm=sp)[0]))
    elif ex.task == "detect":
        true = inclusive_to_edges(primary_box(s)["bbox"])
        pred = g["boxes_xyxy"] if "boxes_xyxy" in g and g.get("has_det", True) else np.zeros(4)
        ex.scores["box_iou"] = float(box_iou(pred, true, fmt="xyxy")[0])
    elif ex.task == "measure":
        if "keypoints_px" not in g or not g.get("has_kpt", True):
            return  # no [KPT]: errors undefined (NaN), see task_token_rate
        points = np.asarray(list(s.keypoints.values()), dtype=np.float64)
        pred = g["keypoints_px"]
        n = min(len(points), len(pred))
        pairs = [p for p, (a, b) in enumerate(measure_pairs) if a < n and b < n]
        # A caliper pair's ends are unordered: each pair's points are matched to the reference
        # in the nearer of its two orders (a measurement has no direction).
        matched = match_point_pairs(torch.as_tensor(pred[None, :n], dtype=torch.float64),
                                    torch.as_tensor(points[None, :n]),
                                    [measure_pairs[p] for p in pairs])[0].numpy()
        err = radial_error(pred[:n], matched, pixel_spacing=spacing)
        if "mask_calipers" in g:
            ex.scores["mask_calipers"] = float(g["mask_calipers"])
        ex.scores.update(radial_error_px=float(err["px"].mean()),
                         radial_error_mm=float(err["mm"].mean()))
        if pairs and "measurements_mm" in g:
            true_mm = [float(np.hypot(*(points[b] - points[a]))) * spacing
                       for a, b in (measure_pairs[p] for p in pairs)]
            m = measurement_error(g["measurements_mm"][pairs], np.asarray(true_mm))
            ex.scores.update(measurement_abs_mm=float(np.mean(m["abs_mm"])),
                             measurement_rel_pct=float(np.mean(m["rel_pct"])),
                             measurement_bias_mm=float(np.mean(m["signed_mm"])))


def _score_text(ex: _Example, language: str) -> None:
    if ex.task == "vqa":
        v = vqa_metrics([ex.prediction], [ex.reference], [ex.qa_type], language=language)
        ex.scores.update(exact_match=v["exact_match"], token_f1=v["token_f1"])
        if ex.qa_type in ("yes_no", "choice"):
            ex.scores["correct"] = v["closed_accuracy"]
    elif ex.task == "diagnosis":
        label = diagnosis_label(ex.sample.region, ex.prediction, ex.options)
        ex.scores.update(label=label, correct=float(label == normalize_label(ex.reference)))
    elif ex.task == "report":
        # Sentence-level BLEU-1 (the per-case counterpart of corpus BLEU-1, for paired tests).
        ex.scores["bleu1"] = bleu([ex.prediction], [ex.reference], language=language)["bleu1"]
        ex.scores.update(_report_clinical([ex]))


def score_examples(examples: list[_Example], image_size: int,
                   measure_pairs: Sequence[Sequence[int]], *, language: str = "auto") -> None:
    """Fill each example's per-sample ``scores`` from its ``prediction`` / ``ground`` outputs.

    ``ground`` holds one row of ``model.ground``'s output (numpy): ``masks`` ``(S, S)`` with
    ``S = image_size``, ``boxes_xyxy`` ``(4,)`` and ``keypoints_px`` ``(K, 2)`` in original
    pixels, ``measurements_mm`` ``(P,)`` for ``measure_pairs``, and the ``has_*`` flags.  A
    missing mask counts as empty and a missing box as a zero box; without ``[KPT]`` (possible
    only with ``force_task_token=False``) keypoint and measurement errors are NaN (left out of
    the means; ``task_token_rate`` shows the coverage).  ``language`` tokenises the text
    scores (:func:`~echomoe.metrics.text.tokenize`).
    """
    pairs = [(int(a), int(b)) for a, b in measure_pairs]
    for ex in examples:
        if ex.task in GROUNDING_TOKENS:
            _score_grounding(ex, image_size, pairs)
        else:
            _score_text(ex, language)


def make_records(examples: list[_Example]) -> list[dict[str, Any]]:
    """Per-example table rows (``<image>`` tags dropped from the prompt)."""
    return [{
        "id": ex.sample.id, "region": ex.sample.region, "task": ex.task,
        "prompt": ex.prompt.replace(IMAGE_TOKEN, "").strip(), "prediction": ex.prediction,
        "reference": ex.reference, "scores": dict(ex.scores),
        **({} if ex.generated is None else {"generated": ex.generated}),
    } for ex in examples]


# ----------------------------------------------------------------------------- aggregation
def _nanmean(values: Sequence[float]) -> float:
    arr = np.asarray([v for v in values if v is not None], dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    return float(arr.mean()) if arr.size else math.nan


def _report_clinical(rows: list[_Example]) -> dict[str, float]:
    """Finding-F1 (micro / macro) and size error of generated reports
    (:func:`~echomoe.metrics.findings.finding_f1`, :func:`~echomoe.metrics.findings.size_error_mm`)
    over the rows whose region has a findings vocabulary (NaN when none has)."""
    from echomoe.data.synthetic.vocab import ORGANS

    rows = [r for r in rows if r.sample.region in ORGANS]
    if not rows:
        return {k: math.nan for k in ("finding_f1_micro", "finding_f1_macro", "size_error_mm",
                                      "size_reported_rate")}
    regions = [r.sample.region for r in rows]
    preds = [r.prediction for r in rows]
    attrs = [r.sample.attributes for r in rows]
    f1 = finding_f1(regions, preds, attrs)
    size = size_error_mm(regions, preds, attrs)
    return {
        "finding_f1_micro": float(f1["micro_f1"]),
        "finding_f1_macro": float(f1["macro_f1"]),
        "size_error_mm": float(size["mae_mm"]),
        "size_reported_rate": (size["n_found"] / size["n_reference"] if size["n_reference"]
                               else math.nan),
    }


def _diagnosis_summary(rows: list[_Example]) -> dict[str, float]:
    preds = [r.scores["label"] for r in rows]
    d = diagnosis_metrics(preds, [normalize_label(r.reference) for r in rows])
    return {"accuracy": d["accuracy"], "macro_f1": d["macro_f1"],
            "parse_rate": float(np.mean([p is not None for p in preds]))}


def _task_summary(task: str, rows: list[_Example], language: str) -> dict[str, float]:
    out: dict[str, float] = {"n": len(rows)}
    if task == "report":
        preds, refs = [r.prediction for r in rows], [r.reference for r in rows]
        out.update(report_metrics(preds, refs, language=language))
        out.update(_report_clinical(rows))
        out["pool_rate"] = _nanmean([r.scores.get("from_pool", math.nan) for r in rows])
    elif task == "vqa":
        v = vqa_metrics([r.prediction for r in rows], [r.reference for r in rows],
                        [r.qa_type for r in rows], language=language)
        out.update({k: v[k] for k in TASK_METRICS["vqa"]})
    elif task == "diagnosis":
        out.update(_diagnosis_summary(rows))
    else:
        keys = [k for k in TASK_METRICS[task] if k not in ("acc50", "hd95_undefined",
                                                            "task_token_rate",
                                                            "mask_calipers_rate")]
        for key in keys:
            out[key] = _nanmean([r.scores.get(key, math.nan) for r in rows])
        out["task_token_rate"] = _nanmean([r.scores["task_token"] for r in rows])
        if task == "segment":
            out["hd95_undefined"] = float(np.mean([not math.isfinite(r.scores["hd95_mm"])
                                                   and r.sample.pixel_spacing is not None
                                                   for r in rows]))
        if task == "measure":
            out["mask_calipers_rate"] = _nanmean([r.scores.get("mask_calipers", math.nan)
                                                  for r in rows])
        if task == "detect":
            out["acc50"] = float(np.mean([r.scores["box_iou"] >= 0.5 for r in rows]))
    return {k: out.get(k, math.nan) for k in ("n", *TASK_METRICS[task])}


def summarize(examples: list[_Example], tasks: Sequence[str], num_samples: int, *,
              language: str = "auto") -> dict:
    """``{"overall", "per_task", "per_region"}`` (see :class:`EvalResult`); ``language``
    tokenises the text metrics."""
    per_task, per_region = {}, {}
    regions = sorted({ex.sample.region for ex in examples})
    for task in tasks:
        rows = [ex for ex in examples if ex.task == task]
        if not rows:
            continue
        per_task[task] = _task_summary(task, rows, language)
        for region in regions:
            subset = [ex for ex in rows if ex.sample.region == region]
            if subset:
                per_region.setdefault(region, {})[task] = _task_summary(task, subset, language)
    overall: dict[str, float] = {"num_samples": num_samples, "num_examples": len(examples)}
    for task, values in per_task.items():
        overall.update({f"{task}/{k}": v for k, v in values.items() if k != "n"})
    return {"overall": overall, "per_task": per_task, "per_region": per_region}


# ----------------------------------------------------------------------------- entry point
def evaluate_model(
    model,
    processor,
    samples: Any,
    tasks: Sequence[str] = TASKS,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    progress: bool = True,
    *,
    seed: int = 0,
    regions: str = "predicted",
    closed: str = "rank",
    language: str = "auto",
    force_task_token: bool = True,
    report_samples: int = 1,
    report_temperature: float = 1.0,
    measure: str = "keypoints",
    report_pool: Sequence[str] | None = None,
) -> EvalResult:
    """Run ``model`` on every task of ``samples`` and score it (see the module docstring).

    Args:
        model: an :class:`~echomoe.models.modeling.EchoMoEForConditionalGeneration`.
        processor: its :class:`~echomoe.models.processor.EchoMoEProcessor`.
        samples: a list of :class:`~echomoe.data.schema.UltrasoundSample` or a
            ``datasets.Dataset`` made by :func:`~echomoe.data.schema.to_hf_dataset`.
        tasks: tasks to run, from :data:`~echomoe.data.tasks.TASKS`.
        batch_size: prompts per ``generate`` call.
        max_new_tokens: generation budget per prompt.
        progress: show a tqdm progress bar over batches.
        seed: prompt-phrasing seed.
        regions: ``"predicted"`` (default): the routers see the region the model predicts
            (``config.predict_region``; without it, no region); ``"given"``: each sample's
            true region (the oracle protocol, reported separately).
        closed: ``"rank"`` (default): closed VQA questions and diagnoses are answered with
            their most likely option (:mod:`echomoe.metrics.ranking`); ``"generate"``: with
            the free generation.
        language: text-metric tokenisation, ``"en"``, ``"zh"`` (CJK character level) or
            ``"auto"`` (default: ``zh`` when a reference has CJK ideographs, else ``en``; the
            resolved one is in ``settings["language"]``).
        force_task_token: append a missing ``[SEG]`` / ``[DET]`` / ``[KPT]`` before grounding.
        report_samples: ``1`` (default): reports are decoded greedily; ``N > 1``: minimum-Bayes-
            risk decoding, the consensus of ``N`` sampled reports
            (:mod:`echomoe.models.decoding`; seeded by ``seed``, so reproducible).
        report_temperature: the sampling temperature of those reports (``> 0``; 1: the
            model's distribution, lower: samples nearer the greedy report).
        measure: where a lesion measurement's calipers come from: ``"keypoints"`` (default:
            the ``[KPT]`` head's points) or ``"mask"``: the model also segments the lesion it
            measures and the calipers span that mask's component nearest the head's points, as
            the reference calipers span the true mask (:mod:`echomoe.grounding.calipers`;
            ``mask_calipers_rate`` = how often a mask was found; other measurements, e.g. the
            left-ventricular diameter, keep the head's points).  Needs ``measure_pairs``
            ``[[0, 1], [2, 3]]`` (long, short axis).
        report_pool: further minimum-Bayes-risk hypotheses for reports (with
            ``report_samples > 1``), e.g. the train split's reports (:func:`report_texts`): a
            pool report is chosen instead of the samples' consensus when its mean unigram F1 to
            the model's samples is higher than any sample's to the others
            (:class:`~echomoe.metrics.text.HypothesisPool`); ``report/pool_rate`` is how often.
            ``None`` (default): the consensus of the samples alone.

    Returns:
        :class:`EvalResult` (``metrics``, ``records``, ``routing``, ``settings``).
    """
    from tqdm.auto import tqdm

    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; valid: {', '.join(TASKS)}")
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError("batch_size and max_new_tokens must be >= 1")
    if language not in LANGUAGES:
        raise ValueError(f"language must be one of {LANGUAGES}, got {language!r}")
    if report_samples < 1:
        raise ValueError(f"report_samples must be >= 1, got {report_samples}")
    if not report_temperature > 0:
        raise ValueError(f"report_temperature must be > 0, got {report_temperature}")
    if report_pool is not None and report_samples < 2:
        raise ValueError("report_pool needs report_samples >= 2 (the samples are the evidence "
                         f"the pool's reports are scored against), got {report_samples}")
    if closed not in ("rank", "generate"):
        raise ValueError(f"closed must be 'rank' or 'generate', got {closed!r}")
    if measure not in MEASURE_PROTOCOLS:
        raise ValueError(f"measure must be one of {', '.join(MEASURE_PROTOCOLS)}, got "
                         f"{measure!r}")
    if measure == "mask" and [list(p) for p in model.config.grounding_config["measure_pairs"]
                              ][:2] != [[0, 1], [2, 3]]:
        raise ValueError("measure='mask' needs grounding_config measure_pairs [[0, 1], [2, 3]] "
                         "(long axis, short axis), got "
                         f"{model.config.grounding_config['measure_pairs']}")
    if regions not in REGION_PROTOCOLS:
        raise ValueError(f"regions must be one of {', '.join(REGION_PROTOCOLS)}, got {regions!r}")
    samples = _as_samples(samples)
    tasks = [t for t in TASKS if t in tasks]
    examples = build_examples(samples, tasks, seed)
    pool = None
    if report_pool is not None and "report" in tasks:
        pool = HypothesisPool(report_pool, resolve_language(
            language, [ex.reference for ex in examples]))
    config = model.config
    accumulator = RoutingAccumulator(config.num_regions)
    batches = [examples_of[i: i + batch_size]
               for task in tasks
               for examples_of in [[ex for ex in examples if ex.task == task]]
               for i in range(0, len(examples_of), batch_size)]
    was_training = model.training
    model.eval()
    try:
        with tqdm(total=len(batches), desc="evaluate", disable=not progress) as bar:
            for batch in batches:
                bar.set_postfix(task=batch[0].task)
                _run_batch(model, processor, batch, max_new_tokens=max_new_tokens,
                           given_regions=regions == "given",
                           force_task_token=force_task_token,
                           rank_closed=closed == "rank",
                           accumulator=accumulator, report_samples=report_samples,
                           report_temperature=report_temperature,
                           seed=seed, language=language, measure=measure, pool=pool)
                bar.update(1)
    finally:
        model.train(was_training)
    language = resolve_language(language, [ex.reference for ex in examples])
    score_examples(examples, int(config.image_size), config.grounding_config["measure_pairs"],
                   language=language)
    settings = {"tasks": list(tasks), "batch_size": batch_size, "max_new_tokens": max_new_tokens,
                "seed": seed, "regions": regions, "closed": closed, "language": language,
                "force_task_token": force_task_token, "report_samples": report_samples,
                "report_temperature": report_temperature, "measure": measure,
                "report_pool": None if report_pool is None else len(report_pool),
                "num_samples": len(samples)}
    return EvalResult(summarize(examples, tasks, len(samples), language=language),
                      make_records(examples),
                      accumulator.report(), settings)


# ----------------------------------------------------------------------------- output
def _clean(value: Any) -> Any:
    """JSON-safe copy: NaN / inf -> None, numpy scalars -> Python."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def results_markdown(result: EvalResult) -> str:
    """Markdown: one table per task (rows: all + each region; columns: its metrics), then the
    routing summary per layer."""
    m = result.metrics
    lines = ["# Evaluation", ""]
    lines.append(f"{m['overall']['num_samples']} samples, {m['overall']['num_examples']} "
                 f"examples; tasks: {', '.join(m['per_task'])}.")
    for task, values in m["per_task"].items():
        keys = ["n", *TASK_METRICS[task]]
        lines += ["", f"## {task}", "", "| region | " + " | ".join(keys) + " |",
                  "|" + "---|" * (len(keys) + 1)]
        rows = [("all", values)] + [(r, t[task]) for r, t in m["per_region"].items() if task in t]
        for name, row in rows:
            lines.append(f"| {name} | " + " | ".join(_fmt(row.get(k)) for k in keys) + " |")
    if result.routing:
        keys = ("nmi", "load_cv", "entropy", "dropped_fraction", "num_tokens")
        lines += ["", "## routing", "", "| layer | " + " | ".join(keys) + " |",
                  "|" + "---|" * (len(keys) + 1)]
        for layer, entry in result.routing.items():
            lines.append(f"| {layer} | " + " | ".join(_fmt(entry[k]) for k in keys) + " |")
    return "\n".join(lines) + "\n"


def write_results(result: EvalResult, out_dir: str | Path) -> dict[str, Path]:
    """Write ``metrics.json`` (metrics, routing, settings), ``records.jsonl`` and ``metrics.md``
    into ``out_dir`` (created); returns ``{"json", "records", "markdown"}`` paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "metrics.json", "records": out / "records.jsonl",
             "markdown": out / "metrics.md"}
    payload = {"metrics": result.metrics, "routing": result.routing,
               "settings": result.settings}
    paths["json"].write_text(json.dumps(_clean(payload), indent=2, allow_nan=False) + "\n")
    with paths["records"].open("w") as f:
        for row in result.records:
            f.write(json.dumps(_clean(row), allow_nan=False) + "\n")
    paths["markdown"].write_text(results_markdown(result))
    return paths
