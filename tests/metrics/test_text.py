"""Tests for echomoe.metrics.text and the offline `evaluate` modules.

Cross-checks run the reference implementations (nltk ``corpus_bleu``, ``rouge_score``,
pycocoevalcap ``Cider``) on the same tokens and compare; golden cases are worked by hand.
"""

import importlib.util
import shutil
import warnings

import numpy as np
import pytest
from nltk.translate.bleu_score import SmoothingFunction, corpus_bleu
from rouge_score import rouge_scorer

from echomoe.metrics import text as T

BLEU_W = [(1.0,), (0.5, 0.5), (1 / 3,) * 3, (0.25,) * 4]

PREDS = [
    "There is a hypoechoic nodule of 1.2 cm in the left lobe.",
    "The liver is normal in size with homogeneous echotexture",
    "a dog is running in the park",
    "No free fluid.",
    "the cat sat on the mat",
]
REFS = [
    ["A hypoechoic nodule measuring 1.2 cm is seen in the left lobe.", "Left lobe nodule, 1.2 cm"],
    "Liver normal in size, echotexture homogeneous.",
    "a dog runs in the park",
    ["no free fluid is seen", "No ascites."],
    "the cat is on the mat",
]


def _ref_lists(refs):
    return [[r] if isinstance(r, str) else list(r) for r in refs]


# ----------------------------------------------------------------------------- tokenisation
def test_tokenize_english_rule():
    assert T.tokenize("Hypo-echoic, 1.5x2cm. FULL width: １．５ｃｍ") == [
        "hypo", "echoic", "1.5", "x", "2", "cm", "full", "width", "1.5", "cm"
    ]  # fmt: skip
    assert T.tokenize("") == [] and T.tokenize(" ,.;!? ") == []


def test_tokenize_chinese_character_level():
    assert T.tokenize("甲状腺左叶见1.2cm低回声结节。", "zh") == [
        "甲", "状", "腺", "左", "叶", "见", "1.2", "cm", "低", "回", "声", "结", "节"
    ]  # fmt: skip
    with pytest.raises(ValueError, match="language"):
        T.tokenize("abc", "fr")


# ----------------------------------------------------------------------------- cross-checks
def test_bleu_matches_nltk_corpus_bleu():
    hyps = [T.tokenize(p) for p in PREDS]
    refs = [[T.tokenize(r) for r in rs] for rs in _ref_lists(REFS)]
    expected = corpus_bleu(refs, hyps, weights=BLEU_W)
    got = T.bleu(PREDS, REFS)
    assert list(got) == ["bleu1", "bleu2", "bleu3", "bleu4"]
    np.testing.assert_allclose(list(got.values()), expected, rtol=0, atol=1e-12)
    assert all(0.0 <= v <= 1.0 for v in got.values())
    smooth = corpus_bleu(refs, hyps, weights=BLEU_W, smoothing_function=SmoothingFunction().method1)
    got = T.bleu(PREDS, REFS, smoothing="method1")
    np.testing.assert_allclose(list(got.values()), smooth, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="smoothing"):
        T.bleu(PREDS, REFS, smoothing="add-one")


def test_rouge_matches_rouge_score():
    # plain lower-case ASCII text: rouge_score's own tokenizer gives the same tokens as ours
    preds = ["the liver is normal in size", "a dog is running in the park", "no free fluid"]
    refs = ["liver normal in size", ["a dog runs in the park", "the dog is in the park"], "fluid"]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)
    per = [scorer.score_multi(r, p) for p, r in zip(preds, _ref_lists(refs), strict=True)]
    expected = {k: np.mean([s[k].fmeasure for s in per]) for k in ("rouge1", "rouge2", "rougeL")}
    got = T.rouge(preds, refs)
    assert got == pytest.approx(expected, abs=1e-12)


def test_cider_matches_pycocoevalcap():
    Cider = pytest.importorskip("pycocoevalcap.cider.cider").Cider
    gts = {i: [" ".join(T.tokenize(r)) for r in rs] for i, rs in enumerate(_ref_lists(REFS))}
    res = {i: [" ".join(T.tokenize(p))] for i, p in enumerate(PREDS)}
    expected, _ = Cider().compute_score(gts, res)
    got = T.cider(PREDS, REFS)["cider"]
    assert got == pytest.approx(float(expected), abs=1e-10)
    assert got > 1.0  # on pycocoevalcap's x10 scale, not [0, 1]


# ----------------------------------------------------------------------------- golden cases
def test_identical_texts_score_one():
    preds = ["a small hypoechoic nodule is seen", "the gallbladder wall is thickened"]
    m = T.report_metrics(preds, list(preds))
    for k in ("bleu1", "bleu2", "bleu3", "bleu4", "rouge1", "rouge2", "rougeL"):
        assert m[k] == pytest.approx(1.0), k
    # disjoint vocabularies -> every idf = log(2), cosine 1 for each order -> 10
    assert m["cider"] == pytest.approx(10.0)


def test_disjoint_texts_score_zero():
    m = T.report_metrics(["alpha beta gamma delta"], ["one two three four"])
    assert all(v == 0.0 for v in m.values()), m


def test_partial_overlap_hand_worked():
    # pred: the cat sat on the mat  |  ref: the cat is on the mat   (6 tokens each, BP = 1)
    # 1-grams: the x2, cat, on, mat match            -> p1 = 5/6
    # 2-grams: the-cat, on-the, the-mat of 5          -> p2 = 3/5
    # 3-grams: on-the-mat of 4                        -> p3 = 1/4
    # 4-grams: none of 3                              -> p4 = 0
    # BLEU1 = 5/6; BLEU2 = sqrt(5/6 * 3/5) = sqrt(1/2); BLEU3 = (5/6 * 3/5 * 1/4)^(1/3) = 1/2;
    # BLEU4 = 0 (no smoothing).
    # ROUGE-1 P = R = 5/6; ROUGE-2 P = R = 3/5; LCS "the cat on the mat" = 5 -> ROUGE-L 5/6.
    pred, ref = ["The cat sat on the mat."], ["the cat is on the mat"]
    assert T.bleu(pred, ref) == pytest.approx(
        {"bleu1": 5 / 6, "bleu2": 0.5**0.5, "bleu3": 0.5, "bleu4": 0.0}, abs=1e-12
    )
    assert T.rouge(pred, ref) == pytest.approx(
        {"rouge1": 5 / 6, "rouge2": 0.6, "rougeL": 5 / 6}, abs=1e-12
    )
    assert T.cider(pred, ref) == {"cider": 0.0}  # one-sample corpus: every idf is log(1) = 0


# ----------------------------------------------------------------------------- edge cases
def test_empty_prediction_scores_zero_without_crash():
    preds = ["the cat sat on the mat", "", "..."]
    refs = ["the cat sat on the mat", "a dog", ""]
    r = T.rouge(preds, refs)
    assert r == pytest.approx(dict.fromkeys(r, 1 / 3))  # samples 2 and 3 score 0
    c = T.cider(preds, refs)["cider"]
    assert np.isfinite(c) and c >= 0
    b = T.bleu(preds, refs)
    # nltk (and so we) count an empty hypothesis as 1 in the precision denominator and add its
    # closest reference length: p1 = 6 / (6 + 1 + 1), BP = exp(1 - (6 + 2 + 0) / 6)
    assert b["bleu1"] == pytest.approx(6 / 8 * np.exp(1 - 8 / 6), abs=1e-12)
    hyps, refs_tok = [T.tokenize(p) for p in preds], [[T.tokenize(r)] for r in refs]
    assert b["bleu1"] == pytest.approx(corpus_bleu(refs_tok, hyps, weights=[(1.0,)]), abs=1e-12)


def test_empty_references_and_empty_corpus():
    m = T.report_metrics(["a b c", "d e f"], [[], ""])  # an empty list = one empty reference
    assert all(v == 0.0 for v in m.values()), m
    m = T.report_metrics(["", ""], ["", ""])
    assert all(v == 0.0 for v in m.values()), m
    m = T.report_metrics([], [])
    assert set(m) == {"bleu1", "bleu2", "bleu3", "bleu4", "rouge1", "rouge2", "rougeL", "cider"}
    assert all(v == 0.0 for v in m.values())


def test_length_mismatch_and_bad_types():
    with pytest.raises(ValueError, match="3 predictions and 2 references"):
        T.bleu(["a", "b", "c"], ["a", "b"])
    for fn in (T.rouge, T.cider, T.report_metrics):
        with pytest.raises(ValueError, match="1 predictions and 2 references"):
            fn(["a"], ["a", "b"])
    with pytest.raises(TypeError):
        T.bleu("a b c", "a b c")  # a bare string is not a corpus
    with pytest.raises(TypeError):
        T.rouge([None], ["a"])


def test_chinese_character_level():
    preds = ["甲状腺左叶低回声结节", "肝脏回声均匀"]
    refs = ["甲状腺左叶见低回声结节。", ["肝脏大小正常，回声均匀", "肝脏回声增粗"]]
    hyps = [list(p) for p in preds]
    rtok = [[T.tokenize(r, "zh") for r in rs] for rs in _ref_lists(refs)]
    np.testing.assert_allclose(
        list(T.bleu(preds, refs, language="zh").values()), corpus_bleu(rtok, hyps, weights=BLEU_W)
    )

    class Spaces:
        def tokenize(self, text):
            return text.split()

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=Spaces())
    per = [
        scorer.score_multi([" ".join(r) for r in rs], " ".join(h))
        for h, rs in zip(hyps, rtok, strict=True)
    ]
    expected = {k: np.mean([s[k].fmeasure for s in per]) for k in ("rouge1", "rouge2", "rougeL")}
    got = T.rouge(preds, refs, language="zh")
    assert got == pytest.approx(expected, abs=1e-12)
    assert got["rouge1"] > 0.7
    # the English rule keeps a run of Chinese as one "word": almost no overlap; the default
    # ("auto") is character level as soon as the text has ideographs
    assert T.rouge(preds, refs, language="en")["rouge1"] < 0.3
    assert T.rouge(preds, refs) == got


def test_multiple_references():
    # the matching reference wins for every metric
    m = T.report_metrics(["a b c d", "e f g h"], [["x y", "a b c d"], ["e f g h"]])
    for k in ("bleu1", "bleu4", "rouge1", "rouge2", "rougeL"):
        assert m[k] == pytest.approx(1.0), k
    # ROUGE takes the best reference per metric (rouge_score.score_multi semantics)
    r = T.rouge(["a b c d"], [["a b c d x y z w", "a b"]])
    assert r["rouge1"] == pytest.approx(2 * 4 / 12)  # P=1, R=4/8 from the first reference
    # CIDEr averages over references (pycocoevalcap), so an extra bad reference lowers it
    preds, good = ["a b c d", "e f g h"], ["a b c d", "e f g h"]
    assert T.cider(preds, [[g, "q r s t"] for g in good])["cider"] < T.cider(preds, good)["cider"]


# ----------------------------------------------------------------------------- METEOR
def _meteor_available():
    spec = importlib.util.find_spec("pycocoevalcap")
    return spec is not None and shutil.which("java") is not None


def test_meteor_skips_with_warning_not_zero(monkeypatch):
    with pytest.warns(UserWarning, match="METEOR skipped"):
        assert T.meteor(["甲状腺"], ["甲状腺"], language="zh") is None
    monkeypatch.setattr(T, "_meteor_backend", lambda: "no `java` executable on PATH")
    with pytest.warns(UserWarning, match="METEOR skipped: no `java`"):
        assert T.meteor(["a"], ["a"]) is None
    with pytest.warns(UserWarning, match="METEOR skipped"):
        m = T.report_metrics(["a b"], ["a b"], include_meteor=True)
    assert "meteor" not in m


@pytest.mark.skipif(not _meteor_available(), reason="needs pycocoevalcap's METEOR jar and java")
def test_meteor_java_offline_matches_pycocoevalcap():
    # golden value: pycocoevalcap.meteor.Meteor().compute_score on these exact strings
    # (pycocoevalcap 1.2, METEOR 1.5, `-l en -norm`): 0.3960465649458717
    preds = ["the cat is on the mat", "a dog is running"]
    refs = [["the cat sat on the mat"], ["a dog runs", "a dog is running fast"]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # must not fall back to a warning
        assert T.meteor(preds, refs) == pytest.approx({"meteor": 0.3960465649458717}, abs=1e-9)
        assert T.meteor(["The cat, on the mat."], ["the cat on the mat"])["meteor"] == 1.0
        assert T.meteor(["", "a dog"], ["x", "a dog"])["meteor"] >= 0.0  # empty: no crash
        m = T.report_metrics(preds, refs, include_meteor=True)
    assert m["meteor"] == pytest.approx(0.3960465649458717, abs=1e-9)


# ----------------------------------------------------------------------------- evaluate modules
def test_evaluate_module_path():
    from pathlib import Path

    for name in ("report_text", "dice"):
        p = Path(T.evaluate_module_path(name))
        assert p.is_file() and p.name == f"{name}.py"
        assert (p.parent / "__init__.py").is_file()  # ships with find_packages
    with pytest.raises(ValueError, match="unknown"):
        T.evaluate_module_path("rouge")


def test_evaluate_report_text_module_offline(monkeypatch, tmp_path):
    evaluate = pytest.importorskip("evaluate")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    metric = evaluate.load(T.evaluate_module_path("report_text"), cache_dir=str(tmp_path))
    got = metric.compute(predictions=PREDS, references=_ref_lists(REFS))
    assert got == pytest.approx(T.report_metrics(PREDS, REFS), abs=1e-12)
    single = ["the liver is normal", "no free fluid"]
    got = metric.compute(predictions=single, references=["liver is normal", "free fluid"])
    expected = T.report_metrics(single, ["liver is normal", "free fluid"])
    assert got == pytest.approx(expected, abs=1e-12)
    zh = (["甲状腺结节", "肝脏回声均匀"], ["甲状腺低回声结节", "肝脏回声增粗"])
    got = metric.compute(predictions=zh[0], references=zh[1], language="zh")
    assert got == pytest.approx(T.report_metrics(*zh, language="zh"), abs=1e-12)


def test_evaluate_dice_module_offline(monkeypatch, tmp_path):
    evaluate = pytest.importorskip("evaluate")
    seg = pytest.importorskip(
        "echomoe.metrics.segmentation", reason="echomoe.metrics.segmentation not available"
    )
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    metric = evaluate.load(T.evaluate_module_path("dice"), cache_dir=str(tmp_path))
    rng = np.random.default_rng(0)
    pred = rng.random((4, 16, 16)) > 0.5
    true = rng.random((4, 16, 16)) > 0.5
    pred[3] = true[3] = False  # both empty -> 1.0 by segmentation's convention
    got = metric.compute(predictions=list(pred), references=list(true))
    expected = seg.dice(pred, true)
    np.testing.assert_allclose(got["dice_per_sample"], expected, atol=1e-12)
    assert got["dice"] == pytest.approx(float(expected.mean()), abs=1e-12)
    assert got["n"] == 4 and got["n_nan"] == 0
    hand = metric.compute(predictions=[[[1, 0], [0, 0]]], references=[[[1, 1], [0, 0]]])
    assert hand["dice"] == pytest.approx(2 / 3)  # 2*1 / (1 + 2)
    with pytest.raises(ValueError):  # probabilities are rejected, not silently thresholded
        metric.compute(predictions=[[[0.5, 0.0], [0.0, 0.0]]], references=[[[1, 0], [0, 0]]])


# ------------------------------------------------------------------ unigram F1 and the consensus
def test_unigram_f1_clips_counts():
    assert T.unigram_f1([], []) == 1.0
    assert T.unigram_f1(["a"], []) == 0.0
    # overlap min(2, 1) = 1 for "a" plus 1 for "b": 2 * 2 / (3 + 2)
    assert T.unigram_f1(["a", "a", "b"], ["a", "b"]) == pytest.approx(0.8)


def test_consensus_is_the_medoid_not_the_first_or_the_outlier():
    candidates = [
        "no focal lesion",                                       # the odd one out
        "a round cyst in the left lobe measuring 5 mm",
        "a round cyst in the left lobe measuring 6 mm",
        "a round cyst in the right lobe measuring 5 mm",
    ]
    # candidate 1 shares 9 of 10 tokens with 2 and 3; 2 and 3 share only 8 with each other
    assert T.consensus_index(candidates) == 1
    assert T.consensus_index(["only one"]) == 0
    assert T.consensus_index(["x y", "x y", "z"]) == 0  # ties go to the first
    with pytest.raises(ValueError, match="at least one text"):
        T.consensus_index([])


def test_consensus_compares_chinese_by_character():
    # Without character tokens the three strings would share no token at all.
    assert T.consensus_index(["肝脏正常", "肝脏囊肿", "肝内囊肿"], language="zh") == 1


def test_consensus_matches_the_pairwise_definition():
    # The vectorised medoid against the sum of pairwise unigram F1, empty texts included.
    rng = np.random.default_rng(3)
    words = ["cyst", "solid", "left", "right", "lobe", "5", "mm", "no", "lesion"]
    texts = [" ".join(rng.choice(words, size=rng.integers(0, 7))) for _ in range(23)]
    tokens = [T.tokenize(t) for t in texts]
    gains = [sum(T.unigram_f1(a, b) for j, b in enumerate(tokens) if j != i)
             for i, a in enumerate(tokens)]
    assert T.consensus_index(texts) == int(np.argmax(gains))
    assert T.consensus_index(["", "", "x"]) == 0  # two empty texts agree fully


# ------------------------------------------------------------------ MBR against a hypothesis pool
def test_pool_matches_the_pairwise_definition():
    # Samples score by their mean unigram F1 to the other samples, pool texts by their mean to
    # all samples; the best of both wins (ties: the samples).
    rng = np.random.default_rng(5)
    words = ["cyst", "solid", "left", "right", "lobe", "5", "mm", "no", "lesion", "seen"]
    draw = lambda: " ".join(rng.choice(words, size=rng.integers(1, 8)))  # noqa: E731
    for _ in range(20):
        samples, texts = [draw() for _ in range(5)], [draw() for _ in range(31)]
        pool = T.HypothesisPool(texts)
        s_tok, p_tok = [T.tokenize(t) for t in samples], [T.tokenize(t) for t in pool.texts]
        own = [np.mean([T.unigram_f1(a, b) for j, b in enumerate(s_tok) if j != i])
               for i, a in enumerate(s_tok)]
        pooled = [np.mean([T.unigram_f1(a, b) for b in s_tok]) for a in p_tok]
        chosen, text = pool.choose(samples)
        if max(own) >= max(pooled):
            assert (chosen, text) == (int(np.argmax(own)), samples[int(np.argmax(own))])
        else:
            assert (chosen, text) == (-1, pool.texts[int(np.argmax(pooled))])
            assert max(pooled) > max(own)


def test_pool_prefers_a_text_the_samples_agree_with_and_keeps_good_samples():
    pool = T.HypothesisPool(["no focal lesion is seen", "a round cyst in the left lobe",
                             "a round cyst in the left lobe", ""])
    assert len(pool) == 2  # duplicates and empty texts dropped
    broken = ["a round cyst the left", "round cyst in left lobe", "a cyst in the left lobe"]
    assert pool.choose(broken) == (-1, "a round cyst in the left lobe")
    agreeing = ["a small cyst in the right lobe"] * 3
    assert pool.choose(agreeing) == (0, agreeing[0])
    assert T.HypothesisPool([]).choose(["x y", "x", "x y"]) == (0, "x y")
    with pytest.raises(ValueError, match=">= 2 samples"):
        pool.choose(["one"])
    with pytest.raises(TypeError, match=r"texts\[1\] is a int"):
        T.HypothesisPool(["a", 3])
