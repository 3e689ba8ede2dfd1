"""The attribute vocabulary of the synthetic ultrasound benchmark, and its diagnosis rules.

A synthetic case is described by a flat ``attributes`` dict.  Keys common to every region:

* ``organ`` (str): the region's organ, e.g. ``"thyroid lobe"``.
* ``lesion_present`` (bool).
* ``lesion_type`` (str): one of ``LESION_TYPES[region]``, or ``"none"`` for a normal study.
* ``shape``: ``oval`` | ``round`` | ``irregular``.
* ``margin``: ``circumscribed`` | ``indistinct`` | ``angular`` | ``microlobulated`` |
  ``spiculated``.
* ``echogenicity``: ``anechoic`` | ``hypoechoic`` | ``isoechoic`` | ``hyperechoic`` |
  ``heterogeneous``.
* ``posterior``: ``none`` | ``enhancement`` | ``shadowing``.
* ``orientation``: ``parallel`` | ``not parallel`` (long axis vs the skin line).
* ``size_long_mm``, ``size_short_mm`` (float, rounded to 0.1 mm): caliper lengths.
* ``location``: ``"<upper|middle|lower> <left|central|right>"`` of the lesion centroid in
  the image (depth third, lateral third).

Region-specific keys (present only for that region; lesion keys only when a lesion is present):

* breast: none beyond the common ones (the BI-RADS-like category follows from them).
* thyroid: ``composition`` (``cystic`` | ``spongiform`` | ``mixed`` | ``solid``),
  ``echogenic_foci`` (``none`` | ``macrocalcifications`` | ``punctate``),
  ``taller_than_wide`` (bool, = orientation ``not parallel``).
* kidney: ``hydronephrosis`` (``none`` | ``mild`` | ``moderate`` | ``severe``; normal and
  lesion studies alike).
* heart: ``lv_diameter_mm`` (float, the measured chamber dimension; every heart study).
* vessel: ``stenosis_percent`` (int, 0 when no plaque), ``imt_mm`` (float, intima-media).
* liver, gynaecology: none beyond the common ones.

For a normal study (``lesion_present=False``) the lesion keys (``shape`` ... ``location``,
``composition``, ``echogenic_foci``, ``taller_than_wide``) are absent.
"""

from __future__ import annotations

from typing import Any

ORGANS: dict[str, str] = {
    "breast": "breast",
    "gynaecology": "uterus",
    "heart": "left ventricle",
    "kidney": "kidney",
    "liver": "liver",
    "thyroid": "thyroid lobe",
    "vessel": "carotid artery",
}

LESION_TYPES: dict[str, tuple[str, ...]] = {
    "breast": ("mass",),
    "gynaecology": ("follicle", "fibroid"),
    "heart": ("thrombus",),
    "kidney": ("cyst", "stone"),
    "liver": ("cyst", "haemangioma", "metastasis"),
    "thyroid": ("nodule",),
    "vessel": ("plaque",),
}

SHAPES = ("oval", "round", "irregular")
MARGINS = ("circumscribed", "indistinct", "angular", "microlobulated", "spiculated")
ECHOGENICITIES = ("anechoic", "hypoechoic", "isoechoic", "hyperechoic", "heterogeneous")
POSTERIOR = ("none", "enhancement", "shadowing")
ORIENTATIONS = ("parallel", "not parallel")
DEPTHS = ("upper", "middle", "lower")
SIDES = ("left", "central", "right")
COMPOSITIONS = ("cystic", "spongiform", "mixed", "solid")
ECHOGENIC_FOCI = ("none", "macrocalcifications", "punctate")
HYDRONEPHROSIS = ("none", "mild", "moderate", "severe")

LESION_KEYS = (
    "lesion_type", "shape", "margin", "echogenicity", "posterior", "orientation",
    "size_long_mm", "size_short_mm", "location",
)
REGION_LESION_KEYS: dict[str, tuple[str, ...]] = {
    "thyroid": ("composition", "echogenic_foci", "taller_than_wide"),
}
REGION_STUDY_KEYS: dict[str, tuple[str, ...]] = {
    "kidney": ("hydronephrosis",),
    "heart": ("lv_diameter_mm",),
    "vessel": ("stenosis_percent", "imt_mm"),
}

LV_DILATED_MM = 56.0  # adult LV end-diastolic diameter above this: dilated


def birads_category(attrs: dict[str, Any]) -> int:
    """BI-RADS-like category (2-5) from breast mass features (a documented simplification).

    Points: irregular shape +1, not-parallel orientation +1, margin not circumscribed +1
    (spiculated or angular +2), posterior shadowing +1, heterogeneous or hypoechoic +0.5.
    Category 2 if anechoic with enhancement (simple cyst); else 3 (< 1.5 points), 4 (< 3.5),
    5 (>= 3.5).
    """
    if attrs["echogenicity"] == "anechoic" and attrs["posterior"] == "enhancement":
        return 2
    points = 0.0
    points += attrs["shape"] == "irregular"
    points += attrs["orientation"] == "not parallel"
    if attrs["margin"] in ("spiculated", "angular"):
        points += 2
    elif attrs["margin"] != "circumscribed":
        points += 1
    points += attrs["posterior"] == "shadowing"
    points += 0.5 * (attrs["echogenicity"] in ("heterogeneous", "hypoechoic"))
    return 3 if points < 1.5 else 4 if points < 3.5 else 5


def tirads_points(attrs: dict[str, Any]) -> int:
    """ACR TI-RADS points from thyroid nodule features (composition, echogenicity, shape,
    margin, echogenic foci)."""
    points = {"cystic": 0, "spongiform": 0, "mixed": 1, "solid": 2}[attrs["composition"]]
    points += {"anechoic": 0, "hyperechoic": 1, "isoechoic": 1, "heterogeneous": 1,
               "hypoechoic": 2}[attrs["echogenicity"]]
    points += 3 * bool(attrs["taller_than_wide"])
    points += {"circumscribed": 0, "indistinct": 0, "microlobulated": 2, "angular": 2,
               "spiculated": 3}[attrs["margin"]]
    points += {"none": 0, "macrocalcifications": 1, "punctate": 3}[attrs["echogenic_foci"]]
    return points


def tirads_level(points: int) -> int:
    """TR level 1-5 from TI-RADS points (0 -> TR1, 2 -> TR2, 3 -> TR3, 4-6 -> TR4, >=7 -> TR5)."""
    if points == 0:
        return 1
    if points <= 2:
        return 2
    if points == 3:
        return 3
    return 4 if points <= 6 else 5


def diagnose(region: str, attrs: dict[str, Any]) -> str:
    """The rule-based diagnosis label of a synthetic case (exact, from its attributes).

    Labels: ``normal``; breast ``birads_2`` ... ``birads_5``; thyroid ``tr1`` ... ``tr5``;
    liver ``simple_cyst`` | ``haemangioma`` | ``metastasis``; kidney ``renal_cyst`` |
    ``renal_stone`` (a stone wins over hydronephrosis), else ``hydronephrosis`` when graded,
    else ``normal``; heart ``lv_thrombus`` if a thrombus is present, else ``dilated_lv`` when
    ``lv_diameter_mm > 56``, else ``normal``; vessel ``stenosis_ge50`` | ``stenosis_lt50`` |
    ``normal`` (plaque with 0 % does not occur); gynaecology ``follicle`` | ``fibroid``.
    """
    present = attrs.get("lesion_present", False)
    kind = attrs.get("lesion_type", "none")
    if region == "heart":
        if present:
            return "lv_thrombus"
        return "dilated_lv" if attrs["lv_diameter_mm"] > LV_DILATED_MM else "normal"
    if region == "kidney":
        if present:
            return "renal_stone" if kind == "stone" else "renal_cyst"
        return "hydronephrosis" if attrs["hydronephrosis"] != "none" else "normal"
    if region == "vessel":
        stenosis = attrs["stenosis_percent"]
        if not present:
            return "normal"
        return "stenosis_ge50" if stenosis >= 50 else "stenosis_lt50"
    if not present:
        return "normal"
    if region == "breast":
        return f"birads_{birads_category(attrs)}"
    if region == "thyroid":
        return f"tr{tirads_level(tirads_points(attrs))}"
    if region == "liver":
        return {"cyst": "simple_cyst", "haemangioma": "haemangioma",
                "metastasis": "metastasis"}[kind]
    if region == "gynaecology":
        return kind
    raise ValueError(f"no diagnosis rule for region {region!r}")


DIAGNOSES: dict[str, tuple[str, ...]] = {
    "breast": ("normal", "birads_2", "birads_3", "birads_4", "birads_5"),
    "gynaecology": ("normal", "follicle", "fibroid"),
    "heart": ("normal", "dilated_lv", "lv_thrombus"),
    "kidney": ("normal", "hydronephrosis", "renal_cyst", "renal_stone"),
    "liver": ("normal", "simple_cyst", "haemangioma", "metastasis"),
    "thyroid": ("normal", "tr1", "tr2", "tr3", "tr4", "tr5"),
    "vessel": ("normal", "stenosis_lt50", "stenosis_ge50"),
}
