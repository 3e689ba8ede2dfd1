"""VQA metrics: closed-question accuracy, open exact match and SQuAD-style token F1.

Question types follow :mod:`echomoe.data.synthetic.vqa`: ``"yes_no"`` and ``"choice"`` are
*closed*, ``"open"`` is open; any other type string is scored like ``"open"`` and reported
under its own name.

Normalisation (:func:`normalize_answer`), applied to predictions and answers alike:

1. Unicode NFKC (full-width letters and digits become ASCII); Unicode dashes -> ``-``;
   lower-case.
2. ``_`` and whitespace runs become one space; hyphens between letters are removed
   (``"BI-RADS 4"`` and ``"birads_4"`` both -> ``"birads 4"``, ``"ill-defined"`` ->
   ``"illdefined"``).
3. A number glued to a unit is split (``"12mm"`` -> ``"12 mm"``, ``"45%"`` -> ``"45 %"``).
4. Numbers are canonical: decimal point kept, leading zeros and trailing fractional zeros
   dropped (``"12.30"`` -> ``"12.3"``, ``"12.0"`` -> ``"12"``, ``"007"`` -> ``"7"``).
5. Every other punctuation character (``%`` included, ``.`` not between digits, and non-ASCII
   punctuation such as ``，。、？``) becomes a space; the articles ``a``, ``an``, ``the`` are
   removed (SQuAD).
6. Whitespace is collapsed and stripped.

Units are kept as words: ``"12.3 mm"`` and ``"12.3"`` do *not* match exactly, but share a
token for token F1 (0.67).  ``"45%"`` -> ``"45"``.

Closed scoring: a ``yes_no`` prediction counts as correct when its *first* ``yes``/``no``
token equals the answer (so ``"Yes, it is."`` is correct, ``"maybe"`` is wrong); a ``choice``
prediction must match the answer exactly after normalisation.  Open scoring: exact match after
normalisation, and token F1 over normalised whitespace tokens (bag of tokens; both empty ->
1.0, one empty -> 0.0).  With ``language="zh"`` or ``"auto"`` (the default) every CJK
ideograph is a token of its own, as in :func:`echomoe.metrics.text.tokenize`: Chinese answers
have no spaces, so whitespace tokens would make token F1 an exact match.  On text without
ideographs the three languages give the same tokens.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["normalize_answer", "exact_match", "token_f1", "closed_correct", "vqa_metrics",
           "CLOSED_TYPES"]

CLOSED_TYPES = ("yes_no", "choice")

_DASHES = str.maketrans({"\u2010": "-", "\u2011": "-", "\u2012": "-", "\u2013": "-",
                         "\u2014": "-", "\u2212": "-"})
_LETTER_HYPHEN = re.compile(r"(?<=[a-z])-(?=[a-z0-9])")
_NUM_UNIT = re.compile(r"(\d)(?=[^\d\s.,])")
_NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?!\w)")
_PUNCT = re.compile("[" + re.escape(string.punctuation.replace(".", "")) + "]")
_CJK_SPLIT = re.compile("([\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ebef])")
_LANGUAGES = ("en", "zh", "auto")
_DOT = re.compile(r"(?<!\d)\.|\.(?!\d)")
_ARTICLES = re.compile(r"\b(?:a|an|the)\b")
_YES_NO = re.compile(r"\b(yes|no)\b")


def _canonical_number(m: re.Match) -> str:
    text = m.group(0)
    if "." in text:
        whole, frac = text.split(".", 1)
        frac = frac.rstrip("0")
        whole = whole.lstrip("0") or "0"
        return f"{whole}.{frac}" if frac else whole
    return text.lstrip("0") or "0"


def normalize_answer(text: Any) -> str:
    """The normalised form of an answer (see the module docstring); ``None`` -> ``""``."""
    if text is None:
        return ""
    s = unicodedata.normalize("NFKC", str(text)).translate(_DASHES).lower()
    s = "".join(" " if ord(ch) > 127 and unicodedata.category(ch).startswith("P") else ch
                for ch in s)
    s = s.replace("_", " ")
    s = _LETTER_HYPHEN.sub("", s)
    s = _NUM_UNIT.sub(r"\1 ", s)
    s = _NUMBER.sub(_canonical_number, s)
    s = _PUNCT.sub(" ", s)
    s = _DOT.sub(" ", s)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match(prediction: Any, answer: Any) -> float:
    """1.0 if the normalised strings are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(answer))


def _answer_tokens(text: Any, language: str) -> list[str]:
    words = normalize_answer(text).split()
    if language == "en":
        return words
    return [t for w in words for t in _CJK_SPLIT.split(w) if t]


def token_f1(prediction: Any, answer: Any, language: str = "auto") -> float:
    """SQuAD token F1 between normalised strings (bag of whitespace tokens; CJK ideographs one
    token each unless ``language="en"``).

    Both empty -> 1.0; exactly one empty -> 0.0.
    """
    if language not in _LANGUAGES:
        raise ValueError(f"language must be one of {_LANGUAGES}, got {language!r}")
    p, a = _answer_tokens(prediction, language), _answer_tokens(answer, language)
    if not p or not a:
        return float(p == a)
    common = sum((Counter(p) & Counter(a)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(a)
    return 2 * precision * recall / (precision + recall)


def closed_correct(prediction: Any, answer: Any, qtype: str) -> float:
    """Closed-question correctness: first yes/no token for ``yes_no``, exact match otherwise."""
    if qtype == "yes_no":
        m = _YES_NO.search(normalize_answer(prediction))
        return float(m is not None and m.group(1) == normalize_answer(answer))
    return exact_match(prediction, answer)


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def _scores(predictions, answers, types, language: str) -> dict[str, Any]:
    em, f1, closed = [], [], []
    per_type: dict[str, dict[str, list[float]]] = {}
    for pred, ans, qtype in zip(predictions, answers, types, strict=True):
        e, f = exact_match(pred, ans), token_f1(pred, ans, language)
        em.append(e)
        f1.append(f)
        bucket = per_type.setdefault(qtype, {"em": [], "f1": [], "acc": []})
        bucket["em"].append(e)
        bucket["f1"].append(f)
        if qtype in CLOSED_TYPES:
            c = closed_correct(pred, ans, qtype)
            closed.append(c)
            bucket["acc"].append(c)
    open_em = [e for e, t in zip(em, types, strict=True) if t not in CLOSED_TYPES]
    open_f1 = [f for f, t in zip(f1, types, strict=True) if t not in CLOSED_TYPES]
    out: dict[str, Any] = {
        "n": len(em),
        "closed_accuracy": _mean(closed),
        "open_exact_match": _mean(open_em),
        "open_token_f1": _mean(open_f1),
        "exact_match": _mean(em),
        "token_f1": _mean(f1),
        "per_type": {},
    }
    for qtype in sorted(per_type):
        b = per_type[qtype]
        row = {"n": len(b["em"]), "exact_match": _mean(b["em"]), "token_f1": _mean(b["f1"])}
        if qtype in CLOSED_TYPES:
            row["accuracy"] = _mean(b["acc"])
        out["per_type"][qtype] = row
    return out


def vqa_metrics(predictions: Sequence[Any], answers: Sequence[Any], types: Sequence[str],
                regions: Sequence[str] | None = None, *, language: str = "auto"
                ) -> dict[str, Any]:
    """VQA scores of ``N`` answered questions.

    Args:
        predictions: ``N`` generated answers (``None`` counts as an empty answer).
        answers: ``N`` reference answers.
        types: ``N`` question types (``"yes_no"``, ``"choice"``, ``"open"``, ...).
        regions: optional ``N`` region names for a per-region breakdown.
        language: token F1's tokens (see :func:`token_f1`).

    Returns:
        ``{"n", "closed_accuracy", "open_exact_match", "open_token_f1", "exact_match",
        "token_f1", "per_type": {type: {"n", "exact_match", "token_f1"[, "accuracy"]}}}``
        (means in [0, 1]; NaN when a group is empty), plus ``"per_region": {region: same
        dict without per_region}`` when ``regions`` is given.
    """
    predictions, answers, types = list(predictions), list(answers), list(types)
    if not len(predictions) == len(answers) == len(types):
        raise ValueError(f"lengths differ: {len(predictions)} predictions, {len(answers)} "
                         f"answers, {len(types)} types")
    out = _scores(predictions, answers, types, language)
    if regions is not None:
        regions = list(regions)
        if len(regions) != len(predictions):
            raise ValueError(f"{len(regions)} regions for {len(predictions)} predictions")
        out["per_region"] = {}
        for r in sorted(set(regions)):
            idx = [i for i, x in enumerate(regions) if x == r]
            out["per_region"][r] = _scores([predictions[i] for i in idx],
                                           [answers[i] for i in idx], [types[i] for i in idx],
                                           language)
    return out
