"""Metrics: report text, clinical correctness, VQA, grounding, routing, and the eval harness.

Public names are resolved lazily, so ``import echomoe.metrics`` stays cheap (nltk, rouge-score
and matplotlib load when a metric that needs them is first used)::

    from echomoe.metrics import bleu, rouge, cider, dice, iou, hd95
    bleu(["a small cyst"], ["a small simple cyst"])      # {"bleu1", ..., "bleu4"} in [0, 1]
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "text": ("bleu", "rouge", "cider", "meteor", "report_metrics", "tokenize"),
    "findings": ("finding_f1", "size_error_mm", "diagnosis_metrics"),
    "vqa": ("vqa_metrics", "normalize_answer"),
    "segmentation": ("dice", "iou", "hd95", "aggregate"),
    "detection": ("box_iou", "box_accuracy"),
    "keypoints": ("radial_error", "measurement_error"),
    "routing": ("routing_report", "RoutingAccumulator", "routing_heatmap"),
    "harness": ("evaluate_model", "write_results", "EvalResult"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'echomoe.metrics' has no attribute {name!r}")
    module = importlib.import_module(f"echomoe.metrics.{_WHERE[name]}")
    return getattr(module, name)


def __dir__() -> list[str]:
    return __all__
