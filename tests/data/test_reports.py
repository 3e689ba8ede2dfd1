"""Synthetic reports and VQA: exact round trip, variety, determinism, robustness."""

from __future__ import annotations

import re
from collections import defaultdict

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from echomoe.data.synthetic import phrases as P
from echomoe.data.synthetic import vocab as V
from echomoe.data.synthetic.reports import (
    format_number,
    parse_diagnosis,
    parse_findings,
    write_report,
)
from echomoe.data.synthetic.vqa import QA_TYPES, make_qa

REGIONS = tuple(sorted(V.ORGANS))


def _choice(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


def sample_attributes(region: str, rng: np.random.Generator, p_normal: float = 0.25) -> dict:
    """A random attributes dict consistent with ``vocab.py`` (normal studies included)."""
    a: dict = {"organ": V.ORGANS[region]}
    present = bool(rng.random() >= p_normal)
    a["lesion_present"] = present
    if present:
        long = round(float(rng.uniform(2.0, 60.0)), 1)
        if rng.random() < 0.1:
            long = float(int(long))  # e.g. 12.0: printed "12.0"
        a.update(
            lesion_type=_choice(rng, V.LESION_TYPES[region]),
            shape=_choice(rng, V.SHAPES),
            margin=_choice(rng, V.MARGINS),
            echogenicity=_choice(rng, V.ECHOGENICITIES),
            posterior=_choice(rng, V.POSTERIOR),
            orientation=_choice(rng, V.ORIENTATIONS),
            size_long_mm=long,
            size_short_mm=round(float(rng.uniform(1.0, long)), 1),
            location=f"{_choice(rng, V.DEPTHS)} {_choice(rng, V.SIDES)}",
        )
        if region == "thyroid":
            a["composition"] = _choice(rng, V.COMPOSITIONS)
            a["echogenic_foci"] = _choice(rng, V.ECHOGENIC_FOCI)
            a["taller_than_wide"] = a["orientation"] == "not parallel"
    else:
        a["lesion_type"] = "none"
    if region == "kidney":
        a["hydronephrosis"] = _choice(rng, V.HYDRONEPHROSIS)
    elif region == "heart":
        a["lv_diameter_mm"] = round(float(rng.uniform(35.0, 75.0)), 1)
    elif region == "vessel":
        a["stenosis_percent"] = int(rng.integers(1, 100)) if present else 0
        a["imt_mm"] = round(float(rng.uniform(0.4, 1.8)), int(rng.integers(1, 3)))
    return a


def _cases(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    for i in range(n):
        region = REGIONS[i % len(REGIONS)]
        yield region, sample_attributes(region, rng), np.random.default_rng([seed, i])


# --------------------------------------------------------------------------------- round trip


def test_round_trip_exact_on_700_cases():
    normals = 0
    for region, attrs, rng in _cases(700):
        findings, impression = write_report(region, attrs, rng)
        assert parse_findings(region, findings) == attrs, (region, findings)
        full = f"Findings: {findings} Impression: {impression}"
        assert parse_findings(region, full) == attrs, (region, full)
        assert parse_findings(region, full.upper()) == attrs  # case-insensitive
        normals += not attrs["lesion_present"]
    assert normals > 50


def test_round_trip_thyroid_inconsistent_taller_than_wide():
    """taller_than_wide is written independently of orientation, so any combination returns."""
    rng = np.random.default_rng(3)
    for i in range(60):
        attrs = sample_attributes("thyroid", rng, p_normal=0.0)
        attrs["taller_than_wide"] = bool(i % 2)
        findings, _ = write_report("thyroid", attrs, np.random.default_rng(i))
        assert parse_findings("thyroid", findings) == attrs


def test_every_value_round_trips():
    """Each value of each categorical attribute is written and read back in every region."""
    rng = np.random.default_rng(7)
    for region in REGIONS:
        for key, values in (("shape", V.SHAPES), ("margin", V.MARGINS),
                            ("echogenicity", V.ECHOGENICITIES), ("posterior", V.POSTERIOR),
                            ("orientation", V.ORIENTATIONS),
                            ("location", [f"{d} {s}" for d in V.DEPTHS for s in V.SIDES])):
            for value in values:
                attrs = sample_attributes(region, rng, p_normal=0.0)
                attrs[key] = value
                for seed in range(3):
                    text = " ".join(write_report(region, attrs, np.random.default_rng(seed)))
                    assert parse_findings(region, text)[key] == value, (region, text)


def test_format_number():
    assert format_number(12.3) == "12.3"
    assert format_number(5.0) == "5.0"
    assert format_number(0.85) == "0.85"
    assert float(format_number(round(7.123456, 1))) == 7.1


# ---------------------------------------------------------------------------------- variety


def _variants(texts: list[str], bank: dict) -> dict:
    """For each value of a phrase bank: which of its phrasings occur in the texts."""
    seen = defaultdict(set)
    for value, phrasings in bank.items():
        for i, phrase in enumerate(phrasings):
            core = re.escape(phrase.split("{subj}")[-1].strip(". ").lower())
            if any(re.search(rf"(?<![\w-]){core}(?![\w-])", t.lower()) for t in texts):
                seen[value].add(i)
    return seen


def test_paraphrase_variety():
    texts_by_region = defaultdict(list)
    impressions, counts = defaultdict(set), defaultdict(int)
    for region, attrs, rng in _cases(1400, seed=11):
        findings, impression = write_report(region, attrs, rng)
        texts_by_region[region].append(findings)
        impressions[(region, V.diagnose(region, attrs))].add(impression)
        counts[(region, V.diagnose(region, attrs))] += 1
    every = [t for ts in texts_by_region.values() for t in ts]
    for bank in (P.SHAPE_PHRASES, P.ECHO_PHRASES, P.MARGIN_PHRASES, P.POSTERIOR_SENTENCES,
                 P.ORIENTATION_SENTENCES):
        seen = _variants(every, bank)
        for value in bank:
            assert len(seen[value]) >= 3, (value, seen[value])
    thyroid = texts_by_region["thyroid"]
    for bank in (P.COMPOSITION_PHRASES, P.FOCI_SENTENCES, P.TTW_SENTENCES):
        seen = _variants(thyroid, bank)
        assert all(len(seen[v]) >= 3 for v in bank), seen
    for region in REGIONS:
        texts = texts_by_region[region]
        assert len({t.split(".")[0] for t in texts}) >= 3  # background openings
        assert all(any(sentence in t for t in texts) for sentence in P.NORMAL_SENTENCES[region])
        markers = ("There is ", " is seen ", " is identified.", " is present ", " mm in size",
                   "with dimensions of")  # main-sentence templates and size clauses
        assert all(any(m in t for t in texts) for m in markers), region
        for template, depths, sides in P.LOCATION_TEMPLATES:  # each location family is used
            phrases = [template.format(d=d, s=x) for d in depths for x in sides]
            assert any(p in t.lower() for p in phrases for t in texts), template
    for region, bank in (("kidney", P.HYDRO_SENTENCES["none"]),
                         ("kidney", P.HYDRO_SENTENCES["graded"]), ("heart", P.LV_SENTENCES),
                         ("vessel", P.STENOSIS_SENTENCES), ("vessel", P.STENOSIS_ZERO),
                         ("vessel", P.IMT_SENTENCES)):
        cores = [max(re.split(r"\{\w+\}", b), key=len).strip(" .:") for b in bank]
        assert all(any(c.lower() in t.lower() for t in texts_by_region[region])
                   for c in cores), (region, cores)
    for (region, label), seen in impressions.items():
        if counts[(region, label)] >= 20:  # rare labels (birads_2: simple cyst) may not show all
            assert len(seen) >= 3, (region, label, seen)


def test_sentence_order_varies():
    rng = np.random.default_rng(0)
    attrs = sample_attributes("breast", rng, p_normal=0.0)
    orders = set()
    for seed in range(40):
        low = write_report("breast", attrs, np.random.default_rng(seed))[0].lower()
        positions = [re.search(p, low).start() for p in ("margin", "posterior|through|shadow",
                                                          "parallel")]
        orders.add(tuple(np.argsort(positions)))
    assert len(orders) == 6  # margin, posterior, orientation sentences in every order


def test_deterministic_for_seed():
    rng = np.random.default_rng(5)
    for region in REGIONS:
        attrs = sample_attributes(region, rng)
        a = write_report(region, attrs, np.random.default_rng(42))
        b = write_report(region, attrs, np.random.default_rng(42))
        assert a == b
        others = {write_report(region, attrs, np.random.default_rng(s)) for s in range(20)}
        assert len(others) > 1


# ------------------------------------------------------------------------ impression/diagnosis

_DIAGNOSIS_WORDS = {
    "normal": r"normal|unremarkable|no |negative",
    "simple_cyst": r"cyst", "haemangioma": r"h(a)?emangioma", "metastasis": r"metasta",
    "renal_cyst": r"renal cyst", "renal_stone": r"calculus|nephrolithiasis|stone",
    "hydronephrosis": r"hydronephrosis|dilatation of the collecting",
    "dilated_lv": r"dilat", "lv_thrombus": r"thrombus",
    "stenosis_lt50": r"less than 50%|below the 50%|non-significant",
    "stenosis_ge50": r"significant|50% or more|above the 50%",
    "follicle": r"follicle", "fibroid": r"fibroid|leiomyoma",
}


def test_impression_names_the_diagnosis():
    labels = defaultdict(set)
    for region, attrs, rng in _cases(700, seed=21):
        findings, impression = write_report(region, attrs, rng)
        label = V.diagnose(region, attrs)
        labels[region].add(label)
        low = impression.lower()
        if label.startswith("birads_"):
            assert f"bi-rads {label[-1]}" in low or f"bi-rads category {label[-1]}" in low
        elif re.fullmatch(r"tr\d", label):
            assert f"tr{label[-1]}" in low or f"ti-rads level {label[-1]}" in low
        else:
            assert re.search(_DIAGNOSIS_WORDS[label], low), (label, impression)
        assert parse_diagnosis(region, f"{findings} {impression}") == label
        if region in ("breast", "thyroid"):
            assert parse_diagnosis(region, impression) == label
    for region in REGIONS:
        assert "normal" in labels[region] or region == "heart"


def test_kidney_stone_with_hydronephrosis_and_dilated_heart():
    stone = {"organ": "kidney", "lesion_present": True, "lesion_type": "stone",
             "shape": "oval", "margin": "circumscribed", "echogenicity": "hyperechoic",
             "posterior": "shadowing", "orientation": "parallel", "size_long_mm": 8.0,
             "size_short_mm": 5.5, "location": "middle central", "hydronephrosis": "moderate"}
    for seed in range(10):
        findings, impression = write_report("kidney", stone, np.random.default_rng(seed))
        assert parse_findings("kidney", findings + " " + impression) == stone
        assert "moderate" in impression.lower()
    heart = {"organ": "left ventricle", "lesion_present": False, "lesion_type": "none",
             "lv_diameter_mm": 61.4}
    for seed in range(10):
        findings, impression = write_report("heart", heart, np.random.default_rng(seed))
        assert "61.4 mm" in findings and "dilat" in impression.lower()
        assert parse_diagnosis("heart", findings + impression) == "dilated_lv"


# ---------------------------------------------------------------------------------- robustness


@pytest.mark.parametrize("region", REGIONS)
def test_parse_never_raises_on_garbage(region):
    rng = np.random.default_rng(0)
    findings, impression = write_report(region, sample_attributes(region, rng, 0.0), rng)
    full = f"{findings} {impression}"
    garbage = ["", "   ", ".", "x mm %", "12.3 x", "no", "lorem ipsum dolor sit amet",
               "\x00\x01 ñ × ≥ 50% 1e9 x 2 mm", "%" * 50, full[::-1], full * 3,
               "NO NO NO. without . ; : mild moderate severe", "Findings: Impression:"]
    garbage += [full[:k] for k in range(0, len(full), max(1, len(full) // 25))]
    for text in garbage:
        out = parse_findings(region, text)
        assert isinstance(out, dict)
        assert set(out) <= set(_keys_of(region))
        parse_diagnosis(region, text)
    assert parse_findings(region, "") == {}
    assert parse_findings(region, None) == {}  # type: ignore[arg-type]


_TOKENS = ["no", "not", "without", "mm", "x", "%", ".", ",", "12.3", "4", "0.85", "mild",
           "hypoechoic", "echoic", "parallel", "circumscribed", "mass", "nodule", "cyst",
           "stone", "plaque", "thrombus", "upper", "left", "deep", "IMT", "LVIDd", "stenosis",
           "solid", "mixed", "cystic", "punctate", "taller than wide", "BI-RADS", "TR", "\n"]


@settings(max_examples=150, deadline=None)
@given(region=st.sampled_from(REGIONS),
       words=st.lists(st.one_of(st.sampled_from(_TOKENS), st.text(max_size=8)), max_size=40))
def test_parse_fuzz(region, words):
    text = " ".join(words)
    out = parse_findings(region, text)
    assert set(out) <= set(_keys_of(region))
    assert parse_diagnosis(region, text) in (None, *V.DIAGNOSES[region])


def _keys_of(region: str) -> tuple[str, ...]:
    return ("organ", "lesion_present", *V.LESION_KEYS, *V.REGION_LESION_KEYS.get(region, ()),
            *V.REGION_STUDY_KEYS.get(region, ()))


def test_truncated_report_gives_partial_subset():
    for region, attrs, rng in _cases(70, seed=4):
        findings, _ = write_report(region, attrs, rng)
        cut = findings[: len(findings) // 2]
        cut = cut[: cut.rfind(".") + 1]  # whole sentences only
        out = parse_findings(region, cut)
        for key, value in out.items():
            assert attrs.get(key) == value, (key, cut)


def test_free_text_and_negations():
    text = ("Findings: Thyroid: A solid, markedly hypoechoic nodule, 14.2 x 9.0 mm, in the "
            "lower right third. Margins ill-defined. Microcalcifications seen. Taller than wide.")
    out = parse_findings("thyroid", text)
    assert out == {"organ": "thyroid lobe", "lesion_present": True, "lesion_type": "nodule",
                   "composition": "solid", "echogenicity": "hypoechoic",
                   "size_long_mm": 14.2, "size_short_mm": 9.0, "location": "lower right",
                   "margin": "indistinct", "echogenic_foci": "punctate",
                   "taller_than_wide": True}
    assert parse_findings("breast", "Not circumscribed, NOT parallel.")["orientation"] == \
        "not parallel"
    assert "margin" not in parse_findings("breast", "The mass is not circumscribed.")
    assert parse_findings("liver", "No focal liver lesion.")["lesion_present"] is False
    assert parse_findings("vessel", "Plaque with <50% stenosis.").get("stenosis_percent") is None
    assert parse_findings("kidney", "Mildly dilated collecting system.")["hydronephrosis"] == "mild"
    with pytest.raises(ValueError):
        parse_findings("elbow", "text")


# ------------------------------------------------------------------------------------------ VQA


def _check_qa(region: str, attrs: dict, qa: list[dict]) -> None:
    label = V.diagnose(region, attrs)
    for item in qa:
        expected = {"question", "answer", "type"} | ({"options"} if item["type"] == "choice"
                                                     else set())
        assert set(item) == expected
        assert item["type"] in QA_TYPES
        q, ans = item["question"], item["answer"]
        if item["type"] == "choice":  # the options the question lists
            assert ans in item["options"]  # (a 0% stenosis can list only itself)
            assert all(o in q for o in item["options"]), item
        assert q.endswith("?") or q.endswith(".")
        if item["type"] == "yes_no":
            assert ans in ("yes", "no")
        if item["type"] == "choice":
            assert ans.lower() in q.lower(), item
        if ans.endswith(" mm") and "lv" not in q.lower() and "ventric" not in q.lower() \
                and "intima" not in q.lower():
            assert float(ans[:-3]) in (attrs.get("size_long_mm"), attrs.get("size_short_mm"))
        values = {str(v) for v in attrs.values()} | {label, "yes", "no", "none", "present",
                                                      "absent"}
        if item["type"] != "yes_no" and not ans.endswith(("mm", "%")):
            assert ans in values, item


def test_vqa_answers_follow_attributes():
    for region, attrs, rng in _cases(350, seed=9):
        qa = make_qa(region, attrs, rng)
        assert len(qa) == 6
        _check_qa(region, attrs, qa)


def test_vqa_known_answers():
    attrs = {"organ": "breast", "lesion_present": True, "lesion_type": "mass", "shape": "oval",
             "margin": "spiculated", "echogenicity": "hypoechoic", "posterior": "shadowing",
             "orientation": "not parallel", "size_long_mm": 17.4, "size_short_mm": 9.1,
             "location": "upper left"}
    by_question = {}
    for seed in range(60):
        for item in make_qa("breast", attrs, np.random.default_rng(seed), num_questions=12):
            by_question[item["question"]] = item
    opens = {q: i["answer"] for q, i in by_question.items() if i["type"] == "open"}
    answers = set(opens.values())
    assert {"breast", "hypoechoic", "spiculated", "oval", "17.4 mm", "upper left",
            "birads_5"} <= answers, answers
    for q, item in by_question.items():
        if item["type"] == "yes_no" and "hypoechoic" in q and "echogenic" in q.lower():
            assert item["answer"] == "yes"


def test_vqa_variety_determinism_and_count():
    rng = np.random.default_rng(2)
    attrs = sample_attributes("thyroid", rng, p_normal=0.0)
    a = make_qa("thyroid", attrs, np.random.default_rng(1))
    assert a == make_qa("thyroid", attrs, np.random.default_rng(1))
    assert len(make_qa("thyroid", attrs, np.random.default_rng(1), num_questions=3)) == 3
    assert len(make_qa("thyroid", attrs, np.random.default_rng(1), num_questions=40)) == 40
    normal = sample_attributes("liver", rng, p_normal=1.0)
    assert len(make_qa("liver", normal, np.random.default_rng(0), num_questions=15)) == 15
    types, questions = set(), defaultdict(set)
    for seed in range(300):
        for item in make_qa("thyroid", attrs, np.random.default_rng(seed)):
            types.add(item["type"])
            stem = re.sub(r"\b(" + "|".join(map(re.escape, _all_values())) + r")\b", "_",
                          item["question"].split("?")[0])
            questions[item["type"]].add(stem)
    assert types == set(QA_TYPES)
    for kind, stems in questions.items():
        assert len(stems) >= 3 * 4, (kind, len(stems))  # >= 3 phrasings for several topics


def _all_values() -> list[str]:
    return sorted({*V.SHAPES, *V.MARGINS, *V.ECHOGENICITIES, *V.ORGANS.values()},
                  key=len, reverse=True)
