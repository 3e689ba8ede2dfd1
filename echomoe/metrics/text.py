"""Report-text metrics: BLEU-1..4, ROUGE-1/2/L, CIDEr-D and (where it can run offline) METEOR.

Every function takes ``predictions`` (a list of strings) and ``references`` (a list with, per
prediction, either one string or a list of strings) and returns a dict of floats.

Tokenisation and lower-casing (one rule for every metric)
---------------------------------------------------------
:func:`tokenize` first applies Unicode NFKC normalisation (full-width digits and letters become
ASCII, e.g. ``"１．５ｃｍ"`` -> ``"1.5cm"``) and lower-cases the text. Then:

* ``language="en"``: tokens are decimal numbers (``"1.5"`` stays one token) and maximal runs of
  letters; everything else (whitespace, punctuation, symbols, ``-``, ``/``, ``%``) separates
  tokens and is dropped. ``"Hypo-echoic, 1.5x2cm."`` -> ``["hypo", "echoic", "1.5", "x", "2",
  "cm"]``.
* ``language="zh"``: character level: every CJK ideograph is one token; embedded Latin words and
  numbers follow the English rule; punctuation (Chinese or ASCII) is dropped.
  ``"甲状腺左叶见1.2cm低回声结节。"`` -> ``["甲", "状", "腺", "左", "叶", "见", "1.2", "cm",
  "低", "回", "声", "结", "节"]``.
* ``language="auto"``: the ``zh`` rule, which gives exactly the ``en`` tokens on text without
  CJK ideographs; so English scores are unchanged and Chinese (or mixed) text is scored at
  character level without being told.  :func:`resolve_language` names the language a corpus
  resolves to (``"zh"`` as soon as one text has an ideograph).

The same tokens feed nltk's BLEU, rouge-score's ROUGE (through its ``tokenizer=`` hook, so
rouge-score's own ASCII-only tokenizer, which would delete all Chinese text, is never used), our
CIDEr-D and METEOR. No stemming is applied.

Edge cases (documented behaviour, never an exception)
-----------------------------------------------------
* An empty (or punctuation-only) prediction scores 0 on every metric for its sample, even when
  its reference is empty too.
* An empty reference string is an empty token list; a sample given an empty *list* of
  references is treated as having one empty reference. Such samples score 0.
* An empty corpus (``predictions == [] and references == []``) returns all zeros.
* ``len(predictions) != len(references)`` raises :class:`ValueError` naming both lengths;
  passing a bare string instead of a list raises :class:`TypeError`.
"""

from __future__ import annotations

import importlib.util
import math
import re
import shutil
import subprocess
import threading
import unicodedata
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "LANGUAGES",
    "resolve_language",
    "tokenize",
    "unigram_f1",
    "consensus_index",
    "consensus_scores",
    "HypothesisPool",
    "bleu",
    "rouge",
    "cider",
    "meteor",
    "report_metrics",
    "evaluate_module_path",
]

LANGUAGES = ("en", "zh", "auto")

_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ebef"
_NUMBER = r"\d+(?:\.\d+)?"
_TOKEN_RE = {
    "en": re.compile(rf"{_NUMBER}|[^\W\d_]+"),
    "zh": re.compile(rf"[{_CJK}]|{_NUMBER}|[^\W\d_{_CJK}]+"),
}
_TOKEN_RE["auto"] = _TOKEN_RE["zh"]
_HAS_CJK = re.compile(f"[{_CJK}]")

References = Sequence["str | Sequence[str]"]


# --------------------------------------------------------------------------------------------
# tokenisation and input checking
# --------------------------------------------------------------------------------------------
def resolve_language(language: str, texts: Iterable[Any]) -> str:
    """``"en"`` or ``"zh"``: ``language`` itself, or for ``"auto"`` ``"zh"`` when any of
    ``texts`` (strings, or lists of strings) contains a CJK ideograph, else ``"en"``."""
    if language not in LANGUAGES:
        raise ValueError(f"language must be one of {LANGUAGES}, got {language!r}")
    if language != "auto":
        return language
    for text in texts:
        for t in ([text] if isinstance(text, str) else text or []):
            if isinstance(t, str) and _HAS_CJK.search(t):
                return "zh"
    return "en"


def tokenize(text: str, language: str = "auto") -> list[str]:
    """Split ``text`` into lower-cased tokens with the module's single rule (see module doc).

    Args:
        text: a report, answer or caption.
        language: ``"en"`` (regex word tokenizer), ``"zh"`` (character level for CJK) or
            ``"auto"`` (the ``zh`` rule; see the module docstring).

    Returns:
        The list of tokens; ``[]`` for an empty or punctuation-only text.
    """
    if language not in _TOKEN_RE:
        raise ValueError(f"language must be one of {LANGUAGES}, got {language!r}")
    if not isinstance(text, str):
        raise TypeError(f"expected a string, got {type(text).__name__}")
    text = unicodedata.normalize("NFKC", text).lower()
    return _TOKEN_RE[language].findall(text)


def unigram_f1(a: Sequence[str], b: Sequence[str]) -> float:
    """F1 of the clipped unigram overlap of two token lists (1.0 for two empty lists)."""
    if not a and not b:
        return 1.0
    overlap = sum((Counter(a) & Counter(b)).values())
    return 2.0 * overlap / (len(a) + len(b))


def consensus_scores(texts: Sequence[str], language: str = "auto") -> np.ndarray:
    """Each text's summed :func:`unigram_f1` to the *other* ``texts`` (``(n,)``; see
    :func:`consensus_index`).  Vectorised over the ``(n, n)`` pairs."""
    return _pairwise_scores([Counter(tokenize(text, language)) for text in texts])


def _pairwise_scores(bags: Sequence[Counter]) -> np.ndarray:
    """:func:`consensus_scores` of texts already counted into token bags."""
    vocab = {tok: j for j, tok in enumerate(sorted({t for bag in bags for t in bag}))}
    counts = _bag_matrix(bags, vocab)
    lengths = counts.sum(axis=1)
    overlap = np.stack([np.minimum(row, counts).sum(axis=1) for row in counts])  # (n, n)
    denom = lengths[:, None] + lengths[None, :]
    f1 = np.divide(2 * overlap, denom, out=np.ones_like(overlap), where=denom > 0)
    np.fill_diagonal(f1, 0.0)
    return f1.sum(axis=1)


def consensus_index(texts: Sequence[str], language: str = "auto") -> int:
    """Index of the text with the highest summed :func:`unigram_f1` to the other ``texts``
    (their medoid under unigram F1 on :func:`tokenize` tokens; ties: the first).

    It is the consensus of minimum-Bayes-risk decoding (:mod:`echomoe.models.decoding`) and
    the report prior (:mod:`echomoe.metrics.priors`); :class:`HypothesisPool` adds
    hypotheses that are not samples.  A few hundred texts take milliseconds."""
    if not texts:
        raise ValueError("consensus_index needs at least one text")
    return int(np.argmax(consensus_scores(texts, language)))


def _bag_matrix(bags: Sequence[Counter], vocab: dict[str, int]) -> np.ndarray:
    """``(len(bags), len(vocab))`` token counts; tokens outside ``vocab`` are left out."""
    counts = np.zeros((len(bags), max(len(vocab), 1)), dtype=np.float64)
    for i, bag in enumerate(bags):
        for tok, c in bag.items():
            if tok in vocab:
                counts[i, vocab[tok]] = c
    return counts


class HypothesisPool:
    """Further hypotheses for minimum-Bayes-risk decoding, with the model's samples as the
    evidence: e.g. the train split's reports, so that a report that agrees with what the model
    samples more than any one sample does can be chosen instead.

    :meth:`choose` scores every sample by its mean :func:`unigram_f1` to the *other* samples
    (as :func:`consensus_index`) and every pool text by its mean unigram F1 to *all* samples
    (the model's distribution, estimated by its samples), and returns the best of both (ties:
    the first sample).  The pool is tokenised once (duplicates dropped), so a choice among a
    few thousand texts takes a millisecond or two.

    >>> pool = HypothesisPool(["no focal lesion is seen", "a cyst is seen"])
    >>> pool.choose(["a cyst seen", "cyst is seen", "a round cyst is seen"])
    (-1, 'a cyst is seen')
    """

    def __init__(self, texts: Sequence[str], language: str = "auto") -> None:
        if isinstance(texts, str) or not isinstance(texts, Sequence):
            raise TypeError(f"texts must be a list of strings, got {type(texts).__name__}")
        bad = [i for i, text in enumerate(texts) if not isinstance(text, str)]
        if bad:
            raise TypeError(f"texts[{bad[0]}] is a {type(texts[bad[0]]).__name__}, not a string")
        self.language = language
        unique = {text: Counter(tokenize(text, language)) for text in texts}
        self.texts = [text for text, bag in unique.items() if bag]
        bags = [unique[text] for text in self.texts]
        self.vocab = {tok: j for j, tok in enumerate(sorted({t for bag in bags for t in bag}))}
        self.counts = _bag_matrix(bags, self.vocab)  # (m, V)
        self.lengths = self.counts.sum(axis=1)

    def __len__(self) -> int:
        return len(self.texts)

    def choose(self, samples: Sequence[str]) -> tuple[int, str]:
        """``(i, text)``: ``i >= 0`` when sample ``i`` wins, ``-1`` when ``text`` is from the
        pool.  Needs two samples or more (a sample is never its own evidence)."""
        if len(samples) < 2:
            raise ValueError(f"choosing against a pool needs >= 2 samples, got {len(samples)}")
        bags = [Counter(tokenize(text, self.language)) for text in samples]
        own = _pairwise_scores(bags) / (len(samples) - 1)
        if not self.texts:
            best = int(np.argmax(own))
            return best, samples[best]
        counts = _bag_matrix(bags, self.vocab)  # (n, V): tokens the pool never uses add nothing
        lengths = np.array([sum(bag.values()) for bag in bags], dtype=np.float64)
        overlap = np.minimum(self.counts[:, None, :], counts[None, :, :]).sum(axis=2)  # (m, n)
        denom = self.lengths[:, None] + lengths[None, :]
        pooled = np.divide(2 * overlap, denom, out=np.zeros_like(overlap), where=denom > 0)
        pooled = pooled.mean(axis=1)
        if own.max() >= pooled.max():
            best = int(np.argmax(own))
            return best, samples[best]
        return -1, self.texts[int(np.argmax(pooled))]


class _RougeTokenizer:
    """Adapter giving rouge-score our tokenisation (it calls ``.tokenize(text)``)."""

    def __init__(self, language: str) -> None:
        self.language = language

    def tokenize(self, text: str) -> list[str]:
        return tokenize(text, self.language)


def _as_reference_lists(predictions, references) -> list[list[str]]:
    """Validate inputs; return references as one list of strings per prediction."""
    for name, value in (("predictions", predictions), ("references", references)):
        if isinstance(value, str) or not isinstance(value, Sequence):
            raise TypeError(f"{name} must be a list, got {type(value).__name__}")
    if len(predictions) != len(references):
        raise ValueError(
            f"got {len(predictions)} predictions and {len(references)} references; "
            "expected one reference (or one list of references) per prediction"
        )
    for i, p in enumerate(predictions):
        if not isinstance(p, str):
            raise TypeError(f"predictions[{i}] must be a string, got {type(p).__name__}")
    out = []
    for i, refs in enumerate(references):
        refs = [refs] if isinstance(refs, str) else list(refs)
        if not all(isinstance(r, str) for r in refs):
            raise TypeError(f"references[{i}] must be a string or a list of strings")
        out.append(refs or [""])
    return out


def _tokenized(predictions, references, language):
    refs = _as_reference_lists(predictions, references)
    hyp_tokens = [tokenize(p, language) for p in predictions]
    ref_tokens = [[tokenize(r, language) for r in rs] for rs in refs]
    return hyp_tokens, ref_tokens


# --------------------------------------------------------------------------------------------
# BLEU
# --------------------------------------------------------------------------------------------
_BLEU_WEIGHTS = [(1.0,), (0.5, 0.5), (1 / 3, 1 / 3, 1 / 3), (0.25, 0.25, 0.25, 0.25)]


def bleu(
    predictions: Sequence[str],
    references: References,
    *,
    language: str = "auto",
    smoothing: str | Callable | None = None,
) -> dict[str, float]:
    """Corpus-level BLEU-1..4 with :func:`nltk.translate.bleu_score.corpus_bleu`.

    BLEU-n uses uniform weights over 1..n-gram precisions (cumulative BLEU, as in the COCO and
    EchoVLM papers), n-gram counts pooled over the corpus, one brevity penalty for the corpus
    (closest reference length per sample). Values are in [0, 1]. As in nltk, an empty
    prediction adds nothing to the matches but 1 to each precision denominator and its closest
    reference length to the brevity penalty, so it lowers the corpus score.

    Smoothing: none by default (nltk's ``method0``): BLEU-n is exactly 0.0 when the corpus has
    no matching k-gram for some k <= n (nltk itself returns ~1e-77 there, via log(float_min),
    and warns; the warning is silenced because this is the documented behaviour). Pass
    ``smoothing="method1"`` ... ``"method7"`` (names of
    :class:`nltk.translate.bleu_score.SmoothingFunction`) or a callable to smooth instead.

    Args:
        predictions: generated texts.
        references: one string or a list of strings per prediction.
        language: tokenisation, ``"en"``, ``"zh"`` or ``"auto"`` (default; see :func:`tokenize`).
        smoothing: ``None``, a SmoothingFunction method name, or a smoothing callable.

    Returns:
        ``{"bleu1", "bleu2", "bleu3", "bleu4"}`` floats.
    """
    from nltk.translate.bleu_score import SmoothingFunction, corpus_bleu, modified_precision

    hyp_tokens, ref_tokens = _tokenized(predictions, references, language)
    keys = ["bleu1", "bleu2", "bleu3", "bleu4"]
    if isinstance(smoothing, str):
        if not re.fullmatch(r"method[0-7]", smoothing):
            raise ValueError(f"unknown smoothing {smoothing!r}; use 'method0'..'method7'")
        smoothing = getattr(SmoothingFunction(), smoothing)
    if not any(hyp_tokens):  # empty corpus or only empty predictions
        return dict.fromkeys(keys, 0.0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"\s*The hypothesis contains 0 counts")
        scores = corpus_bleu(
            ref_tokens, hyp_tokens, weights=_BLEU_WEIGHTS, smoothing_function=smoothing
        )
    if smoothing is None:
        # nltk's method0 turns a zero precision into log(float_min), leaving ~1e-77 instead of
        # 0: report an exact 0 for BLEU-n when some order k <= n has no match in the corpus.
        pairs = list(zip(ref_tokens, hyp_tokens, strict=True))
        matched = [
            sum(modified_precision(r, h, k).numerator for r, h in pairs) for k in range(1, 5)
        ]
        scores = [0.0 if 0 in matched[:n] else s for n, s in enumerate(scores, start=1)]
    return {k: float(s) for k, s in zip(keys, scores, strict=True)}


# --------------------------------------------------------------------------------------------
# ROUGE
# --------------------------------------------------------------------------------------------
def rouge(
    predictions: Sequence[str], references: References, *, language: str = "auto"
) -> dict[str, float]:
    """ROUGE-1, ROUGE-2 and ROUGE-L F-measure with ``rouge_score``, averaged over samples.

    Each sample is scored by :class:`rouge_score.rouge_scorer.RougeScorer` (no stemmer, our
    tokenisation). With several references the best reference is taken *per metric* (maximum
    F-measure, exactly ``RougeScorer.score_multi``). ``rougeL`` is sentence-level LCS (not
    ``rougeLsum``). Values are in [0, 1]; empty predictions or references score 0.

    Returns:
        ``{"rouge1", "rouge2", "rougeL"}`` floats (zeros for an empty corpus).
    """
    from rouge_score import rouge_scorer

    keys = ["rouge1", "rouge2", "rougeL"]
    refs = _as_reference_lists(predictions, references)
    if language not in _TOKEN_RE:
        raise ValueError(f"language must be one of {LANGUAGES}, got {language!r}")
    if not predictions:
        return dict.fromkeys(keys, 0.0)
    scorer = rouge_scorer.RougeScorer(keys, use_stemmer=False, tokenizer=_RougeTokenizer(language))
    totals = dict.fromkeys(keys, 0.0)
    for pred, rs in zip(predictions, refs, strict=True):
        scores = scorer.score_multi(rs, pred)
        for k in keys:
            totals[k] += scores[k].fmeasure
    return {k: v / len(predictions) for k, v in totals.items()}


# --------------------------------------------------------------------------------------------
# CIDEr-D
# --------------------------------------------------------------------------------------------
def _ngram_counts(tokens: list[str], n: int) -> Counter:
    """Counts of all 1..n-grams of ``tokens`` (as tuples)."""
    return Counter(
        tuple(tokens[i : i + k]) for k in range(1, n + 1) for i in range(len(tokens) - k + 1)
    )


def cider(
    predictions: Sequence[str],
    references: References,
    *,
    language: str = "auto",
    n: int = 4,
    sigma: float = 6.0,
) -> dict[str, float]:
    """CIDEr-D on pycocoevalcap's scale (a re-implementation of its ``Cider`` scorer).

    TF-IDF vectors of 1..n-grams, document frequencies from the references of *this corpus*
    (so the score depends on the corpus: a single-sample corpus always scores 0, since every
    idf is log(1/1)), clipped cosine similarity per n-gram order, Gaussian length penalty with
    ``sigma``, mean over orders, mean over references, times 10; the corpus score is the mean
    over samples. As in pycocoevalcap, the "length" in the penalty counts 2-grams (an upstream
    quirk kept so the numbers match). Cross-checked against
    ``pycocoevalcap.cider.cider.Cider`` on the same tokens in the tests; it does not need
    pycocoevalcap or Java at run time.

    Returns:
        ``{"cider": float}`` (>= 0, typically 0..10; 0.0 for an empty corpus).
    """
    hyp_tokens, ref_tokens = _tokenized(predictions, references, language)
    if not hyp_tokens:
        return {"cider": 0.0}
    hyp_counts = [_ngram_counts(t, n) for t in hyp_tokens]
    ref_counts = [[_ngram_counts(r, n) for r in rs] for rs in ref_tokens]
    doc_freq: Counter = Counter()
    for rs in ref_counts:
        doc_freq.update({g for c in rs for g in c})
    log_n_docs = math.log(len(ref_counts))

    def vectorise(counts: Counter):
        vec = [{} for _ in range(n)]
        norm = [0.0] * n
        length = 0
        for gram, tf in counts.items():
            k = len(gram) - 1
            w = tf * (log_n_docs - math.log(max(1.0, doc_freq[gram])))
            vec[k][gram] = w
            norm[k] += w * w
            if k == 1:  # pycocoevalcap counts 2-grams as the "length"
                length += tf
        return vec, [math.sqrt(x) for x in norm], length

    penalty_denom = 2 * sigma**2
    per_sample = []
    for hc, rcs in zip(hyp_counts, ref_counts, strict=True):
        vec_h, norm_h, len_h = vectorise(hc)
        total = 0.0
        for rc in rcs:
            vec_r, norm_r, len_r = vectorise(rc)
            penalty = math.exp(-((len_h - len_r) ** 2) / penalty_denom)
            for k in range(n):
                val = sum(
                    min(w, vec_r[k].get(g, 0.0)) * vec_r[k].get(g, 0.0) for g, w in vec_h[k].items()
                )
                if norm_h[k] != 0 and norm_r[k] != 0:
                    val /= norm_h[k] * norm_r[k]
                total += val * penalty
        per_sample.append(10.0 * total / n / len(rcs))
    return {"cider": float(sum(per_sample) / len(per_sample))}


# --------------------------------------------------------------------------------------------
# METEOR (pycocoevalcap's METEOR 1.5 jar, run by Java; offline)
# --------------------------------------------------------------------------------------------
class _MeteorProcess:
    """One long-lived ``java -jar meteor-1.5.jar - - -stdio -l en -norm`` process.

    Same protocol and options as ``pycocoevalcap.meteor.meteor.Meteor``; starting the JVM and
    loading the paraphrase table takes several seconds, so the process is reused across calls.
    """

    _instance: _MeteorProcess | None = None
    _lock = threading.Lock()

    def __init__(self, jar: Path, java: str) -> None:
        self.proc = subprocess.Popen(
            [java, "-jar", "-Xmx2G", jar.name, "-", "-", "-stdio", "-l", "en", "-norm"],
            cwd=jar.parent,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )

    @classmethod
    def get(cls, jar: Path, java: str) -> _MeteorProcess:
        if cls._instance is None or cls._instance.proc.poll() is not None:
            cls._instance = cls(jar, java)
        return cls._instance

    def _ask(self, line: str) -> str:
        self.proc.stdin.write((line + "\n").encode("utf-8"))
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline().decode("utf-8").strip()
        if not answer:
            raise RuntimeError("METEOR process exited unexpectedly")
        return answer

    def score(self, hyps: list[str], refs: list[list[str]]) -> float:
        stats = [
            self._ask(" ||| ".join(["SCORE", " ||| ".join(r), h]))
            for h, r in zip(hyps, refs, strict=True)
        ]
        self.proc.stdin.write(("EVAL ||| " + " ||| ".join(stats) + "\n").encode("utf-8"))
        self.proc.stdin.flush()
        for _ in hyps:  # per-segment scores, then the corpus score
            self.proc.stdout.readline()
        return float(self.proc.stdout.readline().decode("utf-8").strip())


def _meteor_backend() -> tuple[Path, str] | str:
    """``(jar, java)`` if METEOR can run here, else the reason it cannot."""
    spec = importlib.util.find_spec("pycocoevalcap")
    locations = list(spec.submodule_search_locations or []) if spec else []
    jars = [Path(p) / "meteor" / "meteor-1.5.jar" for p in locations]
    jars = [j for j in jars if j.is_file() and (j.parent / "data" / "paraphrase-en.gz").is_file()]
    if not jars:
        return "pycocoevalcap (which ships meteor-1.5.jar) is not installed"
    java = shutil.which("java")
    if java is None:
        return "no `java` executable on PATH (METEOR 1.5 is a Java program)"
    return jars[0], java


def meteor(
    predictions: Sequence[str], references: References, *, language: str = "auto"
) -> dict[str, float] | None:
    """Corpus METEOR 1.5 (pycocoevalcap's jar, ``-l en -norm``) on our tokens, or ``None``.

    nltk's METEOR needs WordNet data that cannot be downloaded offline, so we use the Java
    METEOR 1.5 shipped with pycocoevalcap (it bundles its own WordNet and paraphrase table). It
    runs only for ``language="en"``, with ``pycocoevalcap`` installed and ``java`` on PATH;
    otherwise it **warns and returns None** (never a silent 0). The first call starts a JVM
    (~8 s); later calls reuse it.

    Returns:
        ``{"meteor": float}`` in [0, 1], or ``None`` when METEOR cannot run here.
    """
    hyp_tokens, ref_tokens = _tokenized(predictions, references, language)
    language = resolve_language(language, [*predictions, *references])
    if language != "en":
        warnings.warn(f"METEOR skipped: METEOR 1.5 has no {language!r} resources", stacklevel=2)
        return None
    backend = _meteor_backend()
    if isinstance(backend, str):
        warnings.warn(f"METEOR skipped: {backend}", stacklevel=2)
        return None
    if not hyp_tokens:
        return {"meteor": 0.0}
    hyps = [" ".join(t) for t in hyp_tokens]
    refs = [[" ".join(r) for r in rs] for rs in ref_tokens]
    with _MeteorProcess._lock:
        try:
            return {"meteor": _MeteorProcess.get(*backend).score(hyps, refs)}
        except (OSError, RuntimeError, ValueError) as err:
            _MeteorProcess._instance = None
            warnings.warn(f"METEOR skipped: the Java process failed ({err})", stacklevel=2)
            return None


# --------------------------------------------------------------------------------------------
# everything together
# --------------------------------------------------------------------------------------------
def report_metrics(
    predictions: Sequence[str],
    references: References,
    *,
    language: str = "auto",
    include_meteor: bool = False,
    smoothing: str | Callable | None = None,
) -> dict[str, float]:
    """BLEU-1..4, ROUGE-1/2/L and CIDEr-D (and METEOR if asked and available) in one dict.

    Keys: ``bleu1..bleu4``, ``rouge1``, ``rouge2``, ``rougeL``, ``cider`` and, with
    ``include_meteor=True`` and METEOR runnable, ``meteor`` (if it cannot run, a warning is
    issued and the key is absent).
    """
    out = bleu(predictions, references, language=language, smoothing=smoothing)
    out.update(rouge(predictions, references, language=language))
    out.update(cider(predictions, references, language=language))
    if include_meteor:
        m = meteor(predictions, references, language=language)
        if m is not None:
            out.update(m)
    return out


def evaluate_module_path(name: str) -> str:
    """Local path of one of echomoe's ``evaluate`` modules, for ``evaluate.load(path)`` offline.

    ``name`` is ``"report_text"`` or ``"dice"``. Example::

        import evaluate
        from echomoe.metrics.text import evaluate_module_path
        metric = evaluate.load(evaluate_module_path("report_text"))
        metric.compute(predictions=["a b c"], references=["a b c"])
    """
    from echomoe.metrics.evaluate_modules import evaluate_module_path as _path

    return _path(name)
