"""Clinical correctness of generated reports: finding-F1, size error, diagnosis metrics.

N-gram scores reward fluent text that gets the margin or the size wrong; these metrics read the
*facts* back.  A generated report is parsed with the data layer's
:func:`echomoe.data.synthetic.reports.parse_findings` (the exact inverse of the synthetic report
writer, lenient on free text) into an attributes dict and compared with the case's reference
``attributes`` (:mod:`echomoe.data.synthetic.vocab`).

Slot F1 (:func:`finding_f1`).  Every ``key=value`` pair of a reference is a slot.  Per report
and key:

* key in both, values match -> 1 TP;
* key in both, values differ -> 1 FP *and* 1 FN (a wrong value is a false claim and a miss);
* key only in the parsed report -> 1 FP (e.g. a margin described in a normal study);
* key only in the reference -> 1 FN (not mentioned, or not parseable).

Values match when equal, except the numeric keys of :data:`DEFAULT_TOLERANCES`, which match
when ``|pred - ref| <= tolerance`` (sizes and LV diameter 1.0 mm, IMT 0.1 mm, stenosis 5
percentage points).  Pass ``tolerances={}`` for exact numbers, or ``ignore_keys=NUMERIC_KEYS``
to score categorical slots only and read sizes from :func:`size_error_mm`.

* **micro F1** = ``2 TP / (2 TP + FP + FN)`` pooled over all slots;
* **macro F1** = mean over keys (attribute types such as ``margin``) of each key's F1, over
  keys with ``TP + FP + FN > 0``;
* both overall and per region; plus per-key counts and a per-report micro F1.

A report with no slots at all (empty reference and nothing parsed) contributes nothing; a
group with no slots gets NaN.  Empty or unparseable text gives FNs, never an error.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from echomoe.data.synthetic.reports import parse_findings

__all__ = [
    "DEFAULT_TOLERANCES", "NUMERIC_KEYS", "SIZE_KEYS", "slot_counts", "finding_f1",
    "size_error_mm", "diagnosis_metrics", "roc_auc", "diagnosis_label", "normalize_label",
]

DEFAULT_TOLERANCES: dict[str, float] = {
    "size_long_mm": 1.0,
    "size_short_mm": 1.0,
    "lv_diameter_mm": 1.0,
    "imt_mm": 0.1,
    "stenosis_percent": 5.0,
}
"""Absolute tolerance per numeric key for a slot match (mm, or percentage points)."""

NUMERIC_KEYS = tuple(DEFAULT_TOLERANCES)
SIZE_KEYS = ("size_long_mm", "size_short_mm")
_EPS = 1e-9  # float slack so that |12.9 - 11.9| <= 1.0 holds


def _parsed(region: str, prediction: Any) -> dict[str, Any]:
    if isinstance(prediction, Mapping):  # already parsed
        return dict(prediction)
    return parse_findings(region, "" if prediction is None else str(prediction))


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _match(key: str, pred: Any, ref: Any, tolerances: Mapping[str, float]) -> bool:
    if key in tolerances and _is_number(pred) and _is_number(ref):
        return abs(float(pred) - float(ref)) <= float(tolerances[key]) + _EPS
    if isinstance(ref, bool) or isinstance(pred, bool):  # True must not match 1
        return type(pred) is type(ref) and pred == ref
    return pred == ref


def slot_counts(region: str, prediction: Any, reference: Mapping[str, Any],
                tolerances: Mapping[str, float] | None = None,
                ignore_keys: Sequence[str] = ()) -> dict[str, tuple[int, int, int]]:
    """``{key: (tp, fp, fn)}`` of one report against its reference attributes.

    Args:
        region: the case's region (selects the parser's vocabulary).
        prediction: generated report text (findings, or findings + impression), or an
            already-parsed attributes dict.
        reference: the reference ``attributes`` dict.
        tolerances: numeric tolerances (default :data:`DEFAULT_TOLERANCES`).
        ignore_keys: keys left out of the comparison.
    """
    tol = DEFAULT_TOLERANCES if tolerances is None else tolerances
    pred = _parsed(region, prediction)
    out: dict[str, tuple[int, int, int]] = {}
    for key in sorted(set(pred) | set(reference)):
        if key in ignore_keys:
            continue
        if key in pred and key in reference:
            ok = _match(key, pred[key], reference[key], tol)
            out[key] = (1, 0, 0) if ok else (0, 1, 1)
        elif key in pred:
            out[key] = (0, 1, 0)
        else:
            out[key] = (0, 0, 1)
    return out


def _prf(tp: int, fp: int, fn: int) -> dict[str, float]:
    nan = float("nan")
    return {
        "precision": tp / (tp + fp) if tp + fp else nan,
        "recall": tp / (tp + fn) if tp + fn else nan,
        "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else nan,
    }


def _summarise(counts: list[dict[str, tuple[int, int, int]]]) -> dict[str, Any]:
    per_key: dict[str, list[int]] = {}
    for c in counts:
        for key, (tp, fp, fn) in c.items():
            acc = per_key.setdefault(key, [0, 0, 0])
            acc[0] += tp
            acc[1] += fp
            acc[2] += fn
    tp, fp, fn = (sum(v[i] for v in per_key.values()) for i in range(3))
    micro = _prf(tp, fp, fn)
    keys = {k: {**_prf(*v), "tp": v[0], "fp": v[1], "fn": v[2]} for k, v in sorted(per_key.items())}
    f1s = [v["f1"] for v in keys.values() if not np.isnan(v["f1"])]
    return {
        "micro_f1": micro["f1"],
        "macro_f1": float(np.mean(f1s)) if f1s else float("nan"),
        "precision": micro["precision"],
        "recall": micro["recall"],
        "tp": tp, "fp": fp, "fn": fn,
        "n": len(counts),
        "per_key": keys,
    }


def _check_lengths(**seqs: Sequence[Any]) -> None:
    lengths = {k: len(v) for k, v in seqs.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"lengths differ: {lengths}")


def finding_f1(regions: Sequence[str], predictions: Sequence[Any],
               references_attributes: Sequence[Mapping[str, Any]], *,
               tolerances: Mapping[str, float] | None = None,
               ignore_keys: Sequence[str] = ()) -> dict[str, Any]:
    """Slot-level finding F1 of ``N`` generated reports (see the module docstring).

    Args:
        regions: ``N`` region names (``vocab.ORGANS`` keys).
        predictions: ``N`` generated reports (text; ``None`` = empty), or parsed dicts.
        references_attributes: ``N`` reference attributes dicts.
        tolerances: numeric tolerances per key (default :data:`DEFAULT_TOLERANCES`; ``{}`` for
            exact equality).
        ignore_keys: keys not scored (e.g. :data:`NUMERIC_KEYS`, or ``("organ",)``).

    Returns:
        ``{"micro_f1", "macro_f1", "precision", "recall", "tp", "fp", "fn", "n",
        "per_key": {key: {"precision", "recall", "f1", "tp", "fp", "fn"}},
        "per_region": {region: {same keys}}, "per_sample_f1": [N floats]}``.
    """
    regions, predictions = list(regions), list(predictions)
    references_attributes = list(references_attributes)
    _check_lengths(regions=regions, predictions=predictions,
                   references_attributes=references_attributes)
    counts = [slot_counts(r, p, a, tolerances, ignore_keys)
              for r, p, a in zip(regions, predictions, references_attributes, strict=True)]
    out = _summarise(counts)
    out["per_region"] = {
        r: _summarise([c for c, rr in zip(counts, regions, strict=True) if rr == r])
        for r in sorted(set(regions))
    }
    out["per_sample_f1"] = [
        _prf(*(sum(v[i] for v in c.values()) for i in range(3)))["f1"] for c in counts
    ]
    return out


# ----------------------------------------------------------------------------- sizes
def _mae(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def size_error_mm(regions: Sequence[str], predictions: Sequence[Any],
                  references_attributes: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Absolute error of the lesion size (``"AA x BB mm"``) read from generated text.

    Only reports whose reference has a size (lesion studies) are scored.  A scored report whose
    text yields no size counts in ``n_missing`` and contributes no error (so also look at
    ``n_missing``: a model that never writes sizes has NaN MAE, not 0).  Text giving a size
    for a reference without one counts in ``n_unexpected``.

    Args:
        regions, predictions, references_attributes: as in :func:`finding_f1`.

    Returns:
        ``{"long_mae_mm", "short_mae_mm", "mae_mm" (both axes pooled), "n_reference",
        "n_found", "n_missing", "n_unexpected", "abs_error_long_mm": (N,) array,
        "abs_error_short_mm": (N,) array (NaN where not scored), "per_region": {region:
        {"long_mae_mm", "short_mae_mm", "mae_mm", "n_reference", "n_missing"}}}``.
    """
    regions, predictions = list(regions), list(predictions)
    references_attributes = list(references_attributes)
    _check_lengths(regions=regions, predictions=predictions,
                   references_attributes=references_attributes)
    n = len(regions)
    err = {k: np.full(n, np.nan) for k in SIZE_KEYS}
    has_ref = np.zeros(n, dtype=bool)
    found = np.zeros(n, dtype=bool)
    unexpected = 0
    for i, (r, p, a) in enumerate(zip(regions, predictions, references_attributes, strict=True)):
        parsed = _parsed(r, p)
        ref_has = all(k in a for k in SIZE_KEYS)
        pred_has = all(k in parsed for k in SIZE_KEYS)
        if not ref_has:
            unexpected += pred_has
            continue
        has_ref[i] = True
        if pred_has:
            found[i] = True
            for k in SIZE_KEYS:
                err[k][i] = abs(float(parsed[k]) - float(a[k]))

    def stats(mask: np.ndarray) -> dict[str, Any]:
        long_e = err["size_long_mm"][mask & found].tolist()
        short_e = err["size_short_mm"][mask & found].tolist()
        return {"long_mae_mm": _mae(long_e), "short_mae_mm": _mae(short_e),
                "mae_mm": _mae(long_e + short_e), "n_reference": int((mask & has_ref).sum()),
                "n_missing": int((mask & has_ref & ~found).sum())}

    everyone = np.ones(n, dtype=bool)
    out: dict[str, Any] = stats(everyone)
    out["n_found"] = int(found.sum())
    out["n_unexpected"] = int(unexpected)
    out["abs_error_long_mm"] = err["size_long_mm"]
    out["abs_error_short_mm"] = err["size_short_mm"]
    labels = np.asarray(regions, dtype=object)
    out["per_region"] = {r: stats(labels == r) for r in sorted(set(regions))}
    return out


# ----------------------------------------------------------------------------- diagnosis
def roc_auc(scores: Any, positives: Any) -> float:
    """Binary ROC AUC via the Mann-Whitney statistic (ties count 1/2); NaN if one class is
    absent.  ``scores``, ``positives``: ``(N,)`` float and bool."""
    s = np.asarray(scores, dtype=np.float64)
    pos = np.asarray(positives, dtype=bool)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    # average ranks over ties (1-based)
    _, first, counts = np.unique(sorted_s, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _diagnosis_core(pred: list[Any], true: list[Any], labels: list[str]) -> dict[str, Any]:
    label_set = set(labels)
    n = len(true)
    correct = [p == t for p, t in zip(pred, true, strict=True)]
    per_class: dict[str, dict[str, float]] = {}
    f1s = []
    for c in labels:
        tp = sum(p == c and t == c for p, t in zip(pred, true, strict=True))
        fp = sum(p == c and t != c for p, t in zip(pred, true, strict=True))
        fn = sum(p != c and t == c for p, t in zip(pred, true, strict=True))
        if tp + fp + fn == 0:
            continue
        row = _prf(tp, fp, fn)
        row = {k: (0.0 if np.isnan(v) else v) for k, v in row.items()}  # 0/0 -> 0 (sklearn)
        row["support"] = tp + fn
        per_class[c] = row
        f1s.append(row["f1"])
    return {
        "n": n,
        "accuracy": float(np.mean(correct)) if n else float("nan"),
        "macro_f1": float(np.mean(f1s)) if f1s else float("nan"),
        "n_invalid": sum(p not in label_set for p in pred),
        "per_class": per_class,
    }


def diagnosis_metrics(pred_labels: Sequence[Any], true_labels: Sequence[str],
                      scores: Any = None, labels: Sequence[str] | None = None,
                      regions: Sequence[str] | None = None) -> dict[str, Any]:
    """Diagnosis accuracy, macro F1 and (with scores) one-vs-rest macro AUC.

    Args:
        pred_labels: ``N`` predicted labels, e.g. from ``parse_diagnosis`` (``None`` or a label
            outside ``labels`` = invalid: wrong, counted in ``n_invalid``, and a false positive
            for no class).
        true_labels: ``N`` reference labels.
        scores: optional ``(N, C)`` class scores (probabilities or logits), columns in the order
            of ``labels`` (required with scores).
        labels: the ``C`` class names; default: sorted labels seen in ``true_labels`` and
            ``pred_labels``.
        regions: optional ``N`` region names for a per-region breakdown (accuracy, macro F1).

    Macro F1 averages per-class F1 over classes that occur in the references or the valid
    predictions (sklearn's default label set; a class predicted but never true has F1 0).
    AUC: per class, ROC AUC of its score column for "true == class" (Mann-Whitney, ties 1/2);
    macro = mean over classes with both positives and negatives among the references (others
    are skipped and listed in ``auc_skipped``).  Scores are used as given (AUC is rank based,
    so any per-column monotone map is harmless); note torchmetrics' ``multiclass_auroc``
    softmaxes scores outside [0, 1] first, which it matches on probabilities.

    Returns:
        ``{"n", "accuracy", "macro_f1", "n_invalid", "per_class": {label: {"precision",
        "recall", "f1", "support"}}}``; with scores also ``"auc_macro"``, ``"auc_per_class"``
        and ``"auc_skipped"``; with regions ``"per_region"``.
    """
    pred, true = list(pred_labels), list(true_labels)
    _check_lengths(pred_labels=pred, true_labels=true)
    if labels is None:
        if scores is not None:
            raise ValueError("labels (the column order of scores) is required with scores")
        labels = sorted({*true, *(p for p in pred if p is not None)}, key=str)
    labels = list(labels)
    out = _diagnosis_core(pred, true, labels)
    if scores is not None:
        s = scores.detach().cpu().numpy() if hasattr(scores, "detach") else np.asarray(scores)
        s = s.astype(np.float64)
        if s.shape != (len(true), len(labels)):
            raise ValueError(f"scores must be ({len(true)}, {len(labels)}), got {s.shape}")
        true_arr = np.asarray(true, dtype=object)
        per = {c: roc_auc(s[:, j], true_arr == c) for j, c in enumerate(labels)}
        valid = {c: v for c, v in per.items() if not np.isnan(v)}
        out["auc_per_class"] = valid
        out["auc_skipped"] = [c for c in labels if c not in valid]
        out["auc_macro"] = float(np.mean(list(valid.values()))) if valid else float("nan")
    if regions is not None:
        regions = list(regions)
        _check_lengths(regions=regions, true_labels=true)
        out["per_region"] = {}
        for r in sorted(set(regions)):
            idx = [i for i, x in enumerate(regions) if x == r]
            p_r, t_r = [pred[i] for i in idx], [true[i] for i in idx]
            seen = {*t_r, *(p for p in p_r if p in set(labels))}
            out["per_region"][r] = _diagnosis_core(p_r, t_r, [c for c in labels if c in seen])
    return out


def normalize_label(text: str) -> str:
    """A diagnosis label's canonical form: lower case, hyphens between letters dropped, other
    hyphens and spaces -> ``_`` (``"BI-RADS 4"`` -> ``birads_4``, ``"Benign"`` -> ``benign``)."""
    norm = re.sub(r"(?<=[a-z])-(?=[a-z])", "", str(text).strip().lower())
    return re.sub(r"[\s\-]+", "_", norm).strip("_.,;:!?")


def diagnosis_label(region: str, text: str, classes: Sequence[str] = ()) -> str | None:
    """The diagnosis label stated by generated ``text`` for a sample of ``region``.

    The diagnosis task's reference *is* a label (``"birads_4"``, ``"renal_cyst"``), so first the
    normalised text (:func:`normalize_label`) is matched against the region's labels
    (:data:`echomoe.data.synthetic.vocab.DIAGNOSES`) and the dataset's own ``classes``
    (normalised too: a real dataset's ``benign`` / ``malignant``): an exact match, else the
    first label that occurs as a whole word; free text (a report) of a synthetic region falls
    back to :func:`~echomoe.data.synthetic.reports.parse_diagnosis`.  Without any label to
    match, the normalised text itself is returned (``None`` when empty).  Compare the result
    with ``normalize_label(reference)``.
    """
    from echomoe.data.synthetic.reports import parse_diagnosis
    from echomoe.data.synthetic.vocab import DIAGNOSES

    norm = normalize_label(text)
    synthetic = list(DIAGNOSES.get(region, ()))
    labels = list(dict.fromkeys([*synthetic, *(normalize_label(c) for c in classes)]))
    if not labels:
        return norm or None
    if norm in labels:
        return norm
    for label in labels:
        if re.search(rf"(?<![a-z0-9]){re.escape(label)}(?![a-z0-9])", norm):
            return label
    return parse_diagnosis(region, str(text)) if synthetic else None
