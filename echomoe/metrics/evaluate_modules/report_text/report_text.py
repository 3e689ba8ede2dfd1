"""`evaluate` module: report-text metrics (BLEU-1..4, ROUGE-1/2/L, CIDEr-D, optional METEOR).

A thin wrapper around :func:`echomoe.metrics.text.report_metrics`, so the numbers are the
library's. Load it offline with
``evaluate.load(echomoe.metrics.text.evaluate_module_path("report_text"))``.
"""

import datasets
import evaluate

from echomoe.metrics.text import report_metrics

_CITATION = """\
@inproceedings{papineni2002bleu, title={BLEU: a method for automatic evaluation of machine
translation}, author={Papineni, Kishore and others}, booktitle={ACL}, year={2002}}
@inproceedings{lin2004rouge, title={ROUGE: A package for automatic evaluation of summaries},
author={Lin, Chin-Yew}, booktitle={Text Summarization Branches Out}, year={2004}}
@inproceedings{vedantam2015cider, title={CIDEr: Consensus-based image description
evaluation}, author={Vedantam, Ramakrishna and others}, booktitle={CVPR}, year={2015}}
"""

_DESCRIPTION = """\
Report-generation metrics as used by ultrasound VLM papers: corpus BLEU-1..4 (nltk, no smoothing
by default), ROUGE-1/2/L F-measure (rouge-score, mean over samples, best reference per metric),
CIDEr-D on pycocoevalcap's scale, and METEOR 1.5 when asked and runnable (Java). All use
echomoe's single tokenisation rule: NFKC + lower case, regex words and decimal numbers for
English, one token per CJK character for Chinese (`language="zh"`, or `"auto"`, the default,
which gives the English tokens on text without CJK characters).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of generated reports (strings).
    references: one reference string, or a list of reference strings, per prediction.
    language: "auto" (default), "en" or "zh" (character-level tokens for Chinese).
    smoothing: None (no BLEU smoothing, default) or an nltk SmoothingFunction method name.
    include_meteor: also compute METEOR (needs Java; warns and omits it otherwise).
Returns:
    dict with bleu1, bleu2, bleu3, bleu4, rouge1, rouge2, rougeL (in [0, 1]), cider (and meteor).
Examples:
    >>> metric = evaluate.load(evaluate_module_path("report_text"))
    >>> metric.compute(predictions=["a small cyst"], references=[["a small cyst"]])["bleu1"]
    1.0
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ReportText(evaluate.Metric):
    """BLEU-1..4, ROUGE-1/2/L and CIDEr-D for generated reports."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features(
                    {
                        "predictions": datasets.Value("string", id="sequence"),
                        "references": datasets.Sequence(datasets.Value("string", id="sequence")),
                    }
                ),
                datasets.Features(
                    {
                        "predictions": datasets.Value("string", id="sequence"),
                        "references": datasets.Value("string", id="sequence"),
                    }
                ),
            ],
            codebase_urls=["https://github.com/tylin/coco-caption"],
            reference_urls=["https://github.com/google-research/google-research/tree/master/rouge"],
        )

    def _compute(
        self, predictions, references, language="auto", smoothing=None, include_meteor=False
    ):
        return report_metrics(
            list(predictions),
            list(references),
            language=language,
            smoothing=smoothing,
            include_meteor=include_meteor,
        )
