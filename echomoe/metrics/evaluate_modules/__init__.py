"""echomoe's metrics packaged as Hugging Face ``evaluate`` modules, loadable offline.

``evaluate.load("rouge")`` fetches a script from the Hub, which is unreachable on many clusters.
These modules ship inside the package instead::

    import evaluate
    from echomoe.metrics.evaluate_modules import evaluate_module_path

    report = evaluate.load(evaluate_module_path("report_text"))   # bleu1-4, rouge1/2/L, cider
    dice = evaluate.load(evaluate_module_path("dice"))            # Dice on binary masks

Each module lives in ``<name>/<name>.py`` (the layout ``evaluate.load(<dir>)`` expects) and only
wraps the library functions (:mod:`echomoe.metrics.text`, :mod:`echomoe.metrics.segmentation`),
so the numbers are the same as calling them directly. The sub-directories carry an
``__init__.py`` only so that ``find_packages`` ships them with the wheel.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["MODULES", "evaluate_module_path"]

MODULES = ("report_text", "dice")


def evaluate_module_path(name: str) -> str:
    """Absolute path of the module script ``<name>/<name>.py`` for ``evaluate.load``.

    Args:
        name: one of :data:`MODULES`.

    Raises:
        ValueError: for an unknown name.
    """
    if name not in MODULES:
        raise ValueError(f"unknown evaluate module {name!r}; available: {MODULES}")
    return str(Path(__file__).resolve().parent / name / f"{name}.py")
