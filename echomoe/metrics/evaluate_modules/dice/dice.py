"""`evaluate` module: Dice coefficient of binary segmentation masks.

A thin wrapper around :func:`echomoe.metrics.segmentation.dice` (same numbers, same empty-mask
convention). Load it offline with
``evaluate.load(echomoe.metrics.text.evaluate_module_path("dice"))``.
"""

import datasets
import evaluate
import numpy as np

from echomoe.metrics.segmentation import dice

_CITATION = """\
@article{dice1945measures, title={Measures of the amount of ecologic association between
species}, author={Dice, Lee R.}, journal={Ecology}, volume={26}, number={3}, year={1945}}
"""

_DESCRIPTION = """\
Dice = 2|P & T| / (|P| + |T|) per mask pair, then the mean over pairs. Both masks empty: 1.0
by default (`empty="nan"` or `"zero"` to change it); exactly one empty: 0.0. Masks are 2-D
arrays of 0/1 (or booleans); probabilities are rejected, threshold them first. Masks of
different examples may have different sizes.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of predicted masks, each (H, W) of 0/1 or bool.
    references: list of ground-truth masks, each the same shape as its prediction.
    empty: value when both masks are empty: "one" (default), "nan" or "zero".
Returns:
    dice: mean Dice over samples with a finite value (NaN if there is none),
    dice_per_sample: list of per-sample Dice, n: number of samples, n_nan: samples left out.
Examples:
    >>> metric = evaluate.load(evaluate_module_path("dice"))
    >>> metric.compute(predictions=[[[1, 0], [0, 0]]], references=[[[1, 1], [0, 0]]])["dice"]
    0.6666666666666666
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Dice(evaluate.Metric):
    """Dice coefficient for binary masks (per sample, then mean)."""

    def _info(self):
        # float32 storage keeps non-binary inputs visible, so segmentation.dice can reject
        # them; a bool feature would silently binarise probabilities.
        mask = datasets.Sequence(datasets.Sequence(datasets.Value("float32")))
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": mask, "references": mask}),
        )

    def _compute(self, predictions, references, empty="one"):
        pairs = zip(predictions, references, strict=True)
        # one call per pair: masks of different examples may differ in size
        values = np.array(
            [dice(np.asarray(p), np.asarray(t), empty=empty)[0] for p, t in pairs],
            dtype=np.float64,
        )
        finite = values[np.isfinite(values)]
        return {
            "dice": float(finite.mean()) if finite.size else float("nan"),
            "dice_per_sample": values.tolist(),
            "n": int(values.size),
            "n_nan": int(values.size - finite.size),
        }
