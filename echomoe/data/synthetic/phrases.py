"""Phrase banks of the synthetic report generator, and the patterns that read them back.

Every attribute value has at least three phrasings.  The banks are designed so that
:func:`echomoe.data.synthetic.reports.parse_findings` can invert them without ambiguity:

* each value's key words are unique to its attribute (``echogenic`` only ever belongs to the
  thyroid ``echogenic_foci``; echogenicity never says "echogenic" or "mixed"; "mild" /
  "moderate" / "severe" only grade hydronephrosis; "upper", "superficially", "deep", "near
  field" ... only describe the location);
* substring traps are avoided by word boundaries and by checking the longer or negated forms
  first ("not parallel" before "parallel", "mixed cystic and solid" before "solid" and
  "cystic", "punctate" before "no echogenic foci", "wider than tall" before "taller than wide");
* a lesion noun is only ever negated (``no``, ``without``, ``free of`` earlier in its clause) in
  normal-study sentences; lesion sentences never carry a negation before their noun.

Templates use ``str.format`` fields: ``{subj}`` (sentence subject), ``{x}`` (a phrase of the
value), ``{organ}``, ``{noun}``, ``{p}`` (stenosis %), ``{v}`` (a measurement).
"""

from __future__ import annotations

# ---------------------------------------------------------------------------------------------
# organ and background
# ---------------------------------------------------------------------------------------------

#: Ways to name each region's organ in running text (the attribute value is vocab.ORGANS).
ORGAN_NAMES: dict[str, tuple[str, ...]] = {
    "breast": ("breast", "breast tissue", "breast parenchyma"),
    "gynaecology": ("uterus", "uterine body", "uterus"),
    "heart": ("left ventricle", "left ventricular cavity", "left ventricle"),
    "kidney": ("kidney", "renal parenchyma", "kidney"),
    "liver": ("liver", "hepatic parenchyma", "liver"),
    "thyroid": ("thyroid lobe", "lobe of the thyroid", "thyroid lobe"),
    "vessel": ("carotid artery", "common carotid artery", "carotid artery"),
}

#: A mention of the organ (lower-case regex).
ORGAN_PATTERNS: dict[str, str] = {
    "breast": r"\bbreast",
    "gynaecology": r"\buter(?:us|ine)\b",
    "heart": r"\bleft ventric|\blv\b",
    "kidney": r"\bkidney|\brenal\b",
    "liver": r"\bliver\b|\bhepatic\b",
    "thyroid": r"\bthyroid\b",
    "vessel": r"\bcarotid\b",
}

#: Opening sentence of the findings; ``{organ}`` is one of ORGAN_NAMES.
BACKGROUND: dict[str, tuple[str, ...]] = {
    "breast": (
        "The {organ} shows a fibroglandular background echotexture.",
        "Targeted ultrasound of the {organ} was performed.",
        "Scanning of the {organ} demonstrates fibroglandular and fatty tissue.",
    ),
    "gynaecology": (
        "The {organ} is anteverted with a regular endometrial echo.",
        "Transabdominal scanning of the {organ} and adnexa was performed.",
        "The {organ} is of normal size and contour.",
    ),
    "heart": (
        "The {organ} is imaged in the parasternal long-axis view.",
        "Transthoracic imaging of the {organ} was performed.",
        "The {organ} is well visualised on this view.",
    ),
    "kidney": (
        "The {organ} shows preserved corticomedullary differentiation.",
        "The {organ} is of normal size with a regular outline.",
        "Longitudinal scanning of the {organ} was performed.",
    ),
    "liver": (
        "The {organ} is of normal size with a homogeneous echotexture.",
        "The {organ} demonstrates a homogeneous background echotexture.",
        "Scanning of the {organ} was performed in the standard planes.",
    ),
    "thyroid": (
        "The {organ} is of normal size with a homogeneous background echotexture.",
        "Transverse and longitudinal images of the {organ} were obtained.",
        "The {organ} was examined with a linear transducer.",
    ),
    "vessel": (
        "Longitudinal imaging of the {organ} was performed.",
        "The {organ} was examined in B-mode.",
        "The {organ} is visualised along its course.",
    ),
}

#: Normal-study sentences (a lesion noun or "lesion"/"abnormality" negated in its clause).
NORMAL_SENTENCES: dict[str, tuple[str, ...]] = {
    "breast": (
        "No focal mass is identified.",
        "There is no discrete mass or focal lesion.",
        "No focal abnormality is seen.",
    ),
    "gynaecology": (
        "No fibroid or dominant follicle is identified.",
        "There is no focal uterine or adnexal lesion.",
        "No focal abnormality is seen.",
    ),
    "heart": (
        "No left ventricular thrombus is seen.",
        "There is no intracavitary thrombus.",
        "No mass or thrombus is identified within the cavity.",
    ),
    "kidney": (
        "No renal mass, cyst or calculus is identified.",
        "There is no focal renal lesion.",
        "No stone or cyst is seen.",
    ),
    "liver": (
        "No focal liver lesion is identified.",
        "There is no focal hepatic abnormality.",
        "No cyst or solid lesion is seen.",
    ),
    "thyroid": (
        "No thyroid nodule is seen.",
        "There is no focal lesion.",
        "No discrete nodule is identified.",
    ),
    "vessel": (
        "No plaque is seen.",
        "There is no atherosclerotic plaque.",
        "The vessel wall is free of plaque.",
    ),
}

# ---------------------------------------------------------------------------------------------
# lesion nouns
# ---------------------------------------------------------------------------------------------

#: Nouns for each lesion type (first entry: the short noun used as sentence subject).
LESION_NOUNS: dict[str, dict[str, tuple[str, ...]]] = {
    "breast": {"mass": ("mass", "breast mass", "mass lesion")},
    "gynaecology": {
        "follicle": ("follicle", "ovarian follicle", "follicular structure"),
        "fibroid": ("fibroid", "uterine fibroid", "leiomyoma"),
    },
    "heart": {"thrombus": ("thrombus", "mural thrombus", "intracavitary thrombus")},
    "kidney": {
        "cyst": ("cyst", "renal cyst", "cystic lesion"),
        "stone": ("stone", "calculus", "renal calculus"),
    },
    "liver": {
        "cyst": ("cyst", "hepatic cyst", "cystic lesion"),
        "haemangioma": ("haemangioma", "hemangioma", "hepatic haemangioma"),
        "metastasis": ("metastasis", "metastatic deposit", "metastatic lesion"),
    },
    "thyroid": {"nodule": ("nodule", "thyroid nodule", "nodular lesion")},
    "vessel": {"plaque": ("plaque", "atherosclerotic plaque", "atheromatous plaque")},
}

_CYST = r"\bcysts?\b|\bcystic lesion"
#: Regex of each lesion type's nouns.
LESION_PATTERNS: dict[str, dict[str, str]] = {
    "breast": {"mass": r"\bmass(?:es)?\b"},
    "gynaecology": {"follicle": r"\bfollic", "fibroid": r"\bfibroids?\b|\b(?:leio)?myoma"},
    "heart": {"thrombus": r"\bthromb"},
    "kidney": {"cyst": _CYST, "stone": r"\bstones?\b|\bcalcul|\bnephrolithiasis\b"},
    "liver": {"cyst": _CYST, "haemangioma": r"\bh(?:a)?emangioma",
              "metastasis": r"\bmetasta"},
    "thyroid": {"nodule": r"\bnodul"},
    "vessel": {"plaque": r"\bplaques?\b|\batherom"},
}

#: Words that, negated, mark a normal study.
GENERIC_LESION = r"\b(?:lesions?|abnormalit(?:y|ies)|mass(?:es)?|nodules?)\b"
#: Negation cues looked for before a lesion noun in the same clause.
NEGATION_CUES = r"\b(?:no|without|negative for|absence of|free of)\b"

#: Sentence subjects for attribute sentences; ``{noun}`` is the short lesion noun.
SUBJECTS = ("It", "The lesion", "The {noun}")

#: Main lesion sentences (``{np}`` noun phrase with article, ``{loc}``, ``{size}``).
MAIN_TEMPLATES = (
    "There is {np} {loc}, measuring {size}.",
    "{np} is seen {loc}, {size_clause}.",
    "{loc}, {np} measuring {size} is identified.",
    "{np} measuring {size} is present {loc}.",
)
SIZE_CLAUSES = ("measuring {size}", "{size} in size", "with dimensions of {size}")

# ---------------------------------------------------------------------------------------------
# common lesion attributes: phrases per value (predicates), sentence templates, patterns
# ---------------------------------------------------------------------------------------------

SHAPE_PHRASES: dict[str, tuple[str, ...]] = {
    "oval": ("oval", "ovoid", "elliptical"),
    "round": ("round", "rounded", "circular"),
    "irregular": ("irregular", "irregularly shaped", "irregular in shape"),
}
#: Shape phrases that can stand before the noun.
SHAPE_ADJECTIVES = 2
SHAPE_TEMPLATES = ("{subj} is {x}.", "{subj} appears {x}.", "In outline, {subj_l} is {x}.")

ECHO_PHRASES: dict[str, tuple[str, ...]] = {
    "anechoic": ("anechoic", "echo-free", "devoid of internal echoes"),
    "hypoechoic": ("hypoechoic", "of reduced echogenicity",
                   "darker than the surrounding tissue"),
    "isoechoic": ("isoechoic", "of similar echogenicity to the surrounding tissue",
                  "equal in echogenicity to the background"),
    "hyperechoic": ("hyperechoic", "of increased echogenicity",
                    "brighter than the surrounding tissue"),
    "heterogeneous": ("heterogeneous", "inhomogeneous", "of non-uniform echotexture"),
}
#: Echogenicity phrases (by index) that can stand before the noun.
ECHO_ADJECTIVES = {"anechoic": 2, "heterogeneous": 2}  # default 1
ECHO_TEMPLATES = ("{subj} is {x}.", "{subj} appears {x}.", "Internally, {subj_l} is {x}.")

MARGIN_PHRASES: dict[str, tuple[str, ...]] = {
    "circumscribed": ("circumscribed", "well-circumscribed", "smooth, well-defined"),
    "indistinct": ("indistinct", "ill-defined", "poorly defined"),
    "angular": ("angular", "angulated", "sharply angled"),
    "microlobulated": ("microlobulated", "micro-lobulated", "finely lobulated"),
    "spiculated": ("spiculated", "stellate", "finely spiculated"),
}
MARGIN_TEMPLATES = ("The margins are {x}.", "{subj} has {x} margins.", "Margin: {x}.")

#: Whole sentences per posterior-feature value.
POSTERIOR_SENTENCES: dict[str, tuple[str, ...]] = {
    "none": ("No posterior acoustic features are seen.",
             "There are no posterior acoustic features.",
             "Posterior acoustic features: none."),
    "enhancement": ("There is posterior acoustic enhancement.",
                    "Increased through-transmission is noted.",
                    "{subj} demonstrates enhanced through-transmission."),
    "shadowing": ("There is posterior acoustic shadowing.",
                  "{subj} casts a posterior acoustic shadow.",
                  "Distal acoustic shadowing is present."),
}

ORIENTATION_SENTENCES: dict[str, tuple[str, ...]] = {
    "parallel": ("{subj} is oriented parallel to the skin line.",
                 "Its long axis is parallel to the skin.",
                 "Orientation: parallel."),
    "not parallel": ("{subj} is not parallel to the skin line.",
                     "Its long axis is not parallel to the skin.",
                     "Orientation: non-parallel."),
}

#: Location: three phrasing families; each indexes a depth word and a side word.
LOCATION_TEMPLATES = (
    ("in the {d} {s} region of the image", ("upper", "middle", "lower"),
     ("left", "central", "right")),
    ("{d} {s}", ("superficially", "at mid-depth", "deep"),
     ("on the left", "in the midline", "on the right")),
    ("in the {d}, {s}", ("near field", "mid field", "far field"),
     ("to the left", "centrally", "to the right")),
)
DEPTH_PATTERNS = {
    "upper": r"upper|superficial(?:ly)?|near[ -]field",
    "middle": r"middle|(?:at )?mid[ -]depth|mid[ -]field",
    "lower": r"lower|deep(?:ly)?|far[ -]field",
}
SIDE_PATTERNS = {
    "left": r"left",
    "central": r"central(?:ly)?|midline|cent(?:re|er)",
    "right": r"right",
}

#: Ordered (value, regex) tables: the first value whose regex matches wins.
SHAPE_PATTERNS = (
    ("irregular", r"\birregular"),
    ("round", r"\bround(?:ed)?\b|\bcircular\b|\bspherical\b"),
    ("oval", r"\bov(?:al|oid)\b|\belliptical\b"),
)
ECHO_PATTERNS = (
    ("anechoic", r"\ban-?echoic\b|\becho-?free\b|devoid of (?:internal )?echoes"),
    ("hypoechoic", r"\bhypo-?echoic\b|\b(?:reduced|decreased|low) echogenicity|\bdarker than"),
    ("isoechoic", r"\biso-?echoic\b|\b(?:similar|equal|same) (?:in )?echogenicity"),
    ("hyperechoic", r"\bhyper-?echoic\b|\b(?:increased|higher|high) (?:in )?echogenicity"
                    r"|\bbrighter than"),
    ("heterogeneous", r"\bheterogeneous|\binhomogeneous|\bnon-?uniform echotexture"),
)
MARGIN_PATTERNS = (
    ("microlobulated", r"\bmicro-?lobulated\b|\bfinely lobulated\b"),
    ("spiculated", r"\bspiculat|\bstellate\b"),
    ("angular", r"\bangul(?:ar|ated)\b|\bsharply angled\b"),
    ("indistinct", r"\bindistinct\b|\bill[ -]defined\b|\bpoorly defined\b"),
    ("circumscribed", r"(?<!not )(?<!non-)(?<!non )\b(?:well-)?circumscribed\b"
                      r"|\bwell[ -]defined\b|\bsmooth\b"),
)
POSTERIOR_PATTERNS = (
    ("none", r"\b(?:no|without)\s+(?:\w+\s+)?(?:posterior|distal)\b"
             r"|\bposterior (?:acoustic )?features:? (?:none|absent)"),
    ("shadowing", r"\bshadow"),
    ("enhancement", r"\benhance|\bthrough-?transmission"),
)
ORIENTATION_PATTERNS = (
    ("not parallel", r"\b(?:not|non)[ -]?parallel\b|\bvertical(?:ly)? orient"),
    ("parallel", r"\bparallel\b|\bhorizontal(?:ly)? orient"),
)

# ---------------------------------------------------------------------------------------------
# region-specific keys
# ---------------------------------------------------------------------------------------------

COMPOSITION_PHRASES: dict[str, tuple[str, ...]] = {
    "cystic": ("cystic", "purely cystic", "entirely cystic"),
    "spongiform": ("spongiform", "predominantly spongiform", "sponge-like"),
    "mixed": ("mixed cystic and solid", "mixed solid and cystic", "partly cystic, partly solid"),
    "solid": ("solid", "entirely solid", "completely solid"),
}
COMPOSITION_TEMPLATES = ("{subj} is {x}.", "Composition: {x}.", "{subj} is {x} in composition.")
COMPOSITION_PATTERNS = (
    ("mixed", r"\bmixed\b|\bpart(?:ial)?ly (?:cystic|solid)|\bsolid and cystic|\bcystic and solid"),
    ("spongiform", r"\bspongiform\b|\bsponge-?like\b"),
    ("solid", r"\bsolid\b"),
    ("cystic", r"\bcystic\b"),
)

FOCI_SENTENCES: dict[str, tuple[str, ...]] = {
    "none": ("No echogenic foci are seen.", "There are no calcifications.",
             "Echogenic foci: none."),
    "macrocalcifications": ("There are macrocalcifications.",
                            "Coarse calcifications are present.",
                            "{subj} contains macrocalcifications."),
    "punctate": ("There are punctate echogenic foci.", "Microcalcifications are present.",
                 "{subj} contains punctate calcifications."),
}
FOCI_PATTERNS = (
    ("punctate", r"\bpunctate\b|\bmicro-?calcification"),
    ("macrocalcifications", r"\bmacro-?calcification|\bcoarse (?:calcification|echogenic foc)"),
    ("none", r"\b(?:no|without)\s+(?:echogenic foci|calcifications?)|\becho(?:genic )?foci:? none"),
)

TTW_SENTENCES: dict[bool, tuple[str, ...]] = {
    True: ("{subj} is taller-than-wide.", "{subj} is taller than wide.",
           "A taller-than-wide configuration is present."),
    False: ("{subj} is wider-than-tall.", "{subj} is not taller than wide.",
            "{subj} is wider than tall."),
}
TTW_PATTERNS = (
    (False, r"\bwider[ -]than[ -]tall\b|\bnot taller[ -]than[ -]wide|\bno taller[ -]than[ -]wide"),
    (True, r"\btaller[ -]than[ -]wide\b"),
)

HYDRO_SENTENCES: dict[str, tuple[str, ...]] = {
    "none": ("No hydronephrosis.", "The collecting system is not dilated.",
             "There is no pelvicalyceal dilatation."),
    "graded": ("{G} hydronephrosis is present.",
               "There is {g} dilatation of the pelvicalyceal system.",
               "The collecting system is {g}ly dilated."),
}
HYDRO_GRADED = (r"\b(mild|moderate|severe)(?:ly)?\b[^.\d]{0,40}?"
                r"(?:hydronephrosis|dilat|distension|distended)")
HYDRO_NONE = (r"\b(?:no|without)\b[^.]{0,20}?(?:hydronephrosis|dilatation)"
              r"|\bnot dilated\b|\bnon-?dilated\b")

LV_SENTENCES = (
    "The LV end-diastolic diameter measures {v} mm{qual}.",
    "Left ventricular internal diameter in diastole (LVIDd) is {v} mm{qual}.",
    "LV end-diastolic dimension: {v} mm{qual}.",
)
LV_QUALIFIERS = {
    True: (", consistent with a dilated left ventricle", " (dilated)", ", which is dilated"),
    False: (", within normal limits", " (normal)", ", which is normal"),
}
LV_PATTERN = (r"(?:lvidd|lvedd|end-diastolic (?:diameter|dimension)|internal diameter in "
              r"diastole)\)?[^.\d]{0,30}?(\d+(?:\.\d+)?)\s*mm")

STENOSIS_SENTENCES = (
    "The plaque causes approximately {p}% luminal stenosis.",
    "Estimated diameter stenosis is {p}%.",
    "The lumen is narrowed by about {p} percent.",
)
STENOSIS_ZERO = (
    "No luminal stenosis is seen.",
    "The lumen is widely patent without stenosis.",
    "There is no luminal narrowing.",
)
STENOSIS_PATTERN = r"(\d{1,3})\s*(?:%|percent\b|per cent\b)"
STENOSIS_ZERO_PATTERN = r"\b(?:no|without)\b[^.\d]{0,25}?(?:stenosis|narrowing)"
#: Text right before/after a percentage that marks it as a threshold, not a measurement.
THRESHOLD_BEFORE = r"(?:<|>|≥|≤|=|less than|more than|greater than|at least|below|under|over)\s*$"
THRESHOLD_AFTER = r"^\s*(?:or (?:more|greater|above|higher)|threshold|cut-?off)"

IMT_SENTENCES = (
    "The intima-media thickness measures {v} mm.",
    "IMT: {v} mm.",
    "Intima-media thickness (IMT) is {v} mm.",
)
IMT_PATTERN = (r"(?:intima[l]?[ -]*media[l]? thickness|\bimt\b)\)?[^.\d]{0,25}?"
               r"(\d+(?:\.\d+)?)\s*mm")
