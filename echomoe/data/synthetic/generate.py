"""Synthetic ultrasound benchmark: cases with exact labels for every task, from one geometry.

:func:`make_sample` draws case ``index`` of a benchmark with ``seed``: region anatomy and lesion
(:mod:`.anatomy`), a B-mode image (:mod:`.phantom`), then every label from the *same masks*:

* masks ``organ`` and ``lesion`` (``(S, S)`` bool; ``lesion`` all ``False`` in a normal study);
* boxes ``= bbox(mask)`` exactly: ``[x_min, y_min, x_max, y_max]`` inclusive pixel indices;
* caliper keypoints ``long_axis_start/end`` (the two lesion-boundary pixels farthest apart) and
  ``short_axis_start/end`` (the longest boundary-to-boundary chord perpendicular to it), all
  centres of boundary pixels; heart studies add ``lv_diameter_start/end``;
* ``size_long_mm`` / ``size_short_mm`` = caliper distance (px) x spacing, rounded to 0.1 mm;
* ``location`` from the lesion centroid (depth third x lateral third of the image);
* ``orientation`` ``not parallel`` iff the lesion's box is taller than wide (thyroid
  ``taller_than_wide`` is the same fact);
* ``diagnosis`` by :func:`.vocab.diagnose`; report by :func:`.reports.write_report`; VQA by
  :func:`.vqa.make_qa`.

Randomness: case ``index`` uses ``numpy.random.default_rng([seed, index])`` for the image and
``default_rng([seed, index, 1])`` for the texts, so output never depends on worker count or
order, and image knobs do not change the phrasing.
"""

from __future__ import annotations

import multiprocessing
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from echomoe.data.schema import REGIONS, UltrasoundSample, UnknownRegionError, to_hf_dataset
from echomoe.data.synthetic import anatomy, phantom
from echomoe.data.synthetic.reports import write_report
from echomoe.data.synthetic.vocab import DEPTHS, LESION_TYPES, SIDES, diagnose
from echomoe.data.synthetic.vqa import make_qa
from echomoe.grounding.calipers import CALIPER_NAMES, mask_calipers

KEYPOINT_NAMES = CALIPER_NAMES
SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class SyntheticConfig:
    """Difficulty knobs of the synthetic benchmark (the defaults are the reference benchmark).

    Attributes:
        image_size: image side ``S`` in pixels (128).  Pixel spacing = view depth / ``S``.
        regions: regions to draw (all seven).
        region_weights: sampling weights per region; ``None`` (default) cycles through
            ``regions`` by index, giving exact balance.
        normal_fraction: probability of a study without lesion (0.25).  Kidney, heart and
            vessel normal studies can still be abnormal (hydronephrosis, dilated LV).
        suspicious_fraction: probability that a breast mass / thyroid nodule is drawn with the
            malignant-looking profile (0.5); the class balance of BI-RADS / TI-RADS.
        noise: speckle strength in ``[0, 1]`` (1.0 = fully developed Rayleigh speckle).
        lesion_contrast: exponent on lesion echo contrast and posterior gains (1.0; lower is
            harder, 0 removes echo contrast).
        size_range: part ``(lo, hi)`` of each lesion type's clinical size range to sample
            (``(0, 1)``: all; ``(0, 0.3)``: small lesions only).
        hydronephrosis_p: none / mild / moderate / severe probabilities for kidney studies.
        dilated_lv_p: probability of a dilated LV in a heart study without thrombus (0.35).
        num_frames: images per case (1); extra frames are new speckle realisations of the
            same anatomy (EchoVLM cases carry several key frames).
        dynamic_range_db: log-compression window (50 dB).
    """

    image_size: int = 128
    regions: tuple[str, ...] = REGIONS
    region_weights: tuple[float, ...] | None = None
    normal_fraction: float = 0.25
    suspicious_fraction: float = 0.5
    noise: float = 1.0
    lesion_contrast: float = 1.0
    size_range: tuple[float, float] = (0.0, 1.0)
    hydronephrosis_p: tuple[float, float, float, float] = (0.55, 0.15, 0.15, 0.15)
    dilated_lv_p: float = 0.35
    num_frames: int = 1
    dynamic_range_db: float = 50.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "regions", tuple(self.regions))
        bad = [r for r in self.regions if r not in anatomy.REGION_VIEWS]
        if bad or not self.regions:
            raise UnknownRegionError(
                f"unknown region(s) {', '.join(map(repr, bad)) or '(none given)'}; "
                f"valid: {', '.join(REGIONS)}")
        if self.region_weights is not None and len(self.region_weights) != len(self.regions):
            raise ValueError("region_weights needs one weight per region")
        if self.image_size < 32:
            raise ValueError("image_size must be >= 32")
        lo, hi = self.size_range
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError("size_range must satisfy 0 <= lo <= hi <= 1")
        for name in ("normal_fraction", "suspicious_fraction", "noise", "dilated_lv_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]")
        if self.num_frames < 1:
            raise ValueError("num_frames must be >= 1")


# --- geometry -> labels ------------------------------------------------------------------


def bbox(mask: np.ndarray) -> list[int]:
    """``[x_min, y_min, x_max, y_max]`` (inclusive pixel indices) of a non-empty ``(H, W)``
    bool mask."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return [int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1])]


def _third(value: float, size: int, names: tuple[str, str, str]) -> str:
    return names[min(2, int(3 * value / size))]


def lesion_measurements(mask: np.ndarray, spacing: float) -> tuple[dict[str, Any], dict]:
    """Measured lesion attributes (orientation, sizes, location) and caliper keypoints.

    ``mask`` is the non-empty ``(S, S)`` bool lesion mask, ``spacing`` its mm per pixel.
    Returns ``(attributes, keypoints)``: ``{"orientation", "size_long_mm", "size_short_mm",
    "location"}`` and :func:`~echomoe.grounding.calipers.mask_calipers`' named ``(x, y)`` points.
    """
    kp = mask_calipers(mask)
    x0, y0, x1, y1 = bbox(mask)
    ys, xs = np.nonzero(mask)
    size = mask.shape[0]

    def dist(p: str, q: str) -> float:
        return float(np.hypot(kp[q][0] - kp[p][0], kp[q][1] - kp[p][1]))

    attrs = {
        "orientation": "not parallel" if (y1 - y0) > (x1 - x0) else "parallel",
        "size_long_mm": round(dist("long_axis_start", "long_axis_end") * spacing, 1),
        "size_short_mm": round(dist("short_axis_start", "short_axis_end") * spacing, 1),
        "location": f"{_third(ys.mean() + 0.5, size, DEPTHS)} "
                    f"{_third(xs.mean() + 0.5, size, SIDES)}",
    }
    return attrs, kp


_ORDER = ("organ", "lesion_present", "lesion_type", "shape", "margin", "echogenicity",
          "posterior", "orientation", "size_long_mm", "size_short_mm", "location",
          "composition", "echogenic_foci", "taller_than_wide", "hydronephrosis",
          "lv_diameter_mm", "stenosis_percent", "imt_mm")


# --- sampling ----------------------------------------------------------------------------


def _pick(rng: np.random.Generator, options: tuple, p: tuple | None = None):
    if p is None:
        return options[int(rng.integers(len(options)))]
    x, acc = rng.random() * sum(p), 0.0
    for opt, w in zip(options, p, strict=True):
        acc += w
        if x < acc:
            return opt
    return options[-1]


def sample_lesion_attributes(region: str, kind: str, rng: np.random.Generator,
                             suspicious: bool) -> dict[str, Any]:
    """Sampled (not measured) attributes of a lesion of type ``kind`` in ``region``.

    Returns ``shape``, ``margin``, ``echogenicity``, ``posterior``, ``orientation_target``
    (the drawing aim; the reported orientation is measured) and, for thyroid nodules,
    ``composition`` and ``echogenic_foci``.  ``suspicious`` selects the malignant-looking
    profile where the region has one (breast, thyroid).
    """
    p = rng
    smooth = ("circumscribed",)
    rough = ("indistinct", "angular", "microlobulated", "spiculated")
    if kind in ("cyst", "follicle"):
        a = dict(shape=_pick(p, ("round", "oval")), margin="circumscribed",
                 echogenicity="anechoic", posterior="enhancement")
    elif kind == "stone":
        a = dict(shape=_pick(p, ("round", "oval")), margin="circumscribed",
                 echogenicity="hyperechoic", posterior="shadowing")
    elif kind == "haemangioma":
        a = dict(shape=_pick(p, ("oval", "round")),
                 margin=_pick(p, ("circumscribed", "microlobulated"), (0.8, 0.2)),
                 echogenicity="hyperechoic", posterior=_pick(p, ("none", "enhancement"),
                                                             (0.7, 0.3)))
    elif kind == "metastasis":
        a = dict(shape=_pick(p, ("irregular", "round", "oval")),
                 margin=_pick(p, ("indistinct", "microlobulated", "angular", "circumscribed")),
                 echogenicity=_pick(p, ("hypoechoic", "heterogeneous", "hyperechoic"),
                                    (0.5, 0.35, 0.15)), posterior="none")
    elif kind == "thrombus":
        a = dict(shape=_pick(p, ("oval", "irregular", "round")),
                 margin=_pick(p, ("circumscribed", "indistinct")),
                 echogenicity=_pick(p, ("isoechoic", "hyperechoic", "heterogeneous")),
                 posterior="none")
    elif kind == "plaque":
        echo = _pick(p, ("hypoechoic", "isoechoic", "hyperechoic", "heterogeneous"))
        a = dict(shape=_pick(p, ("oval", "irregular")),
                 margin=_pick(p, ("circumscribed", "indistinct", "microlobulated")),
                 echogenicity=echo,
                 posterior="shadowing" if echo == "hyperechoic" else "none")
    elif kind == "fibroid":
        a = dict(shape=_pick(p, ("round", "oval")),
                 margin=_pick(p, ("circumscribed", "indistinct"), (0.75, 0.25)),
                 echogenicity=_pick(p, ("hypoechoic", "heterogeneous", "isoechoic")),
                 posterior=_pick(p, ("shadowing", "none"), (0.5, 0.5)))
    elif kind == "mass" and suspicious:
        a = dict(shape=_pick(p, ("irregular", "oval", "round"), (0.7, 0.15, 0.15)),
                 margin=_pick(p, rough), echogenicity=_pick(
                     p, ("hypoechoic", "heterogeneous", "isoechoic"), (0.6, 0.3, 0.1)),
                 posterior=_pick(p, ("shadowing", "none", "enhancement"), (0.5, 0.4, 0.1)))
    elif kind == "mass":
        if p.random() < 0.3:  # simple cyst
            a = dict(shape=_pick(p, ("oval", "round")), margin="circumscribed",
                     echogenicity="anechoic", posterior="enhancement")
        else:  # fibroadenoma-like
            a = dict(shape=_pick(p, ("oval", "round", "irregular"), (0.75, 0.15, 0.1)),
                     margin=_pick(p, smooth + ("microlobulated", "indistinct"), (0.8, 0.1, 0.1)),
                     echogenicity=_pick(p, ("hypoechoic", "isoechoic", "hyperechoic"),
                                        (0.6, 0.3, 0.1)),
                     posterior=_pick(p, ("none", "enhancement"), (0.7, 0.3)))
    elif kind == "nodule":
        comp = "solid" if suspicious else _pick(p, ("cystic", "spongiform", "mixed", "solid"))
        echo = {"cystic": "anechoic", "spongiform": _pick(p, ("isoechoic", "hyperechoic")),
                "mixed": _pick(p, ("heterogeneous", "isoechoic")),
                "solid": _pick(p, ("hypoechoic", "isoechoic", "hyperechoic"),
                               (0.7, 0.2, 0.1) if suspicious else (0.3, 0.4, 0.3))}[comp]
        foci = (_pick(p, ("punctate", "macrocalcifications", "none"), (0.5, 0.2, 0.3))
                if suspicious else _pick(p, ("none", "macrocalcifications"), (0.85, 0.15)))
        if comp == "cystic":
            foci = "none"
        a = dict(composition=comp, echogenic_foci=foci,
                 margin=_pick(p, rough if suspicious else ("circumscribed", "indistinct"),
                              None if suspicious else (0.8, 0.2)),
                 echogenicity=echo,
                 posterior={"cystic": "enhancement"}.get(comp, "none"))
        if foci == "macrocalcifications":
            a["posterior"] = "shadowing"
        a["shape"] = ("irregular" if a["margin"] != "circumscribed" and p.random() < 0.6
                      else _pick(p, ("oval", "round")))
    else:
        raise ValueError(f"no lesion profile for {region}/{kind}")
    upright = (suspicious and kind in ("mass", "nodule") and p.random() < 0.6) or (
        kind not in ("plaque",) and p.random() < 0.1)
    a["orientation_target"] = "not parallel" if upright else "parallel"
    return a


def _choose_region(index: int, rng: np.random.Generator, config: SyntheticConfig) -> str:
    if config.region_weights is None:
        return config.regions[index % len(config.regions)]
    w = np.asarray(config.region_weights, float)
    return config.regions[int(np.searchsorted(np.cumsum(w / w.sum()), rng.random(),
                                              side="right").clip(0, len(w) - 1))]


def make_sample(index: int, seed: int, config: SyntheticConfig | None = None) -> UltrasoundSample:
    """Case ``index`` of the benchmark with ``seed`` (deterministic; see module docstring).

    Returns an :class:`UltrasoundSample` with ``images`` (``num_frames`` ``(S, S)`` uint8),
    ``masks``, ``boxes``, ``keypoints`` (pixels), ``attributes``, report, QA and diagnosis.
    """
    config = config or SyntheticConfig()
    rng = np.random.default_rng([seed, index])
    region = _choose_region(index, rng, config)
    normal = rng.random() < config.normal_fraction
    kinds = LESION_TYPES[region]
    kind = None if normal else kinds[int(rng.integers(len(kinds)))]
    suspicious = bool(rng.random() < config.suspicious_fraction)
    lesion = None
    if kind is not None:
        lesion = {"lesion_type": kind, **sample_lesion_attributes(region, kind, rng, suspicious)}
    size = config.image_size
    scene = anatomy.build_scene(
        region, size, rng, lesion, contrast=config.lesion_contrast,
        size_range=config.size_range, hydronephrosis_p=config.hydronephrosis_p,
        dilated_lv_p=config.dilated_lv_p)
    geom = phantom.beam_geometry(scene.probe, size)
    tgc, gain = float(rng.uniform(-0.08, 0.12)), float(rng.uniform(-2.0, 2.0))
    images = [
        phantom.render(scene.echo, geom, rng, scene.interfaces, scene.posterior,
                       noise=config.noise, spacing=scene.spacing, tgc_residual=tgc,
                       gain_db=gain, dynamic_range_db=config.dynamic_range_db)
        for _ in range(config.num_frames)
    ]
    attrs = dict(scene.attributes)
    keypoints = dict(scene.keypoints)
    boxes = [{"label": "organ", "bbox": bbox(scene.organ)}]
    if kind is not None:
        measured, kp = lesion_measurements(scene.lesion, scene.spacing)
        attrs.update(measured)
        keypoints = {**kp, **keypoints}
        boxes.append({"label": "lesion", "bbox": bbox(scene.lesion)})
        if region == "thyroid":
            attrs["taller_than_wide"] = attrs["orientation"] == "not parallel"
    attrs = {k: attrs[k] for k in _ORDER if k in attrs}
    text_rng = np.random.default_rng([seed, index, 1])
    findings, impression = write_report(region, attrs, text_rng)
    qa = make_qa(region, attrs, text_rng)
    return UltrasoundSample(
        id=f"synthetic-{seed}-{index:07d}",
        images=images,
        region=region,
        pixel_spacing=round(scene.spacing, 6),
        masks={"organ": scene.organ, "lesion": scene.lesion},
        boxes=boxes,
        keypoints=keypoints,
        attributes=attrs,
        findings=findings,
        impression=impression,
        qa=qa,
        diagnosis=diagnose(region, attrs),
        source="synthetic",
    )


def _make_range(bounds: tuple[int, int], seed: int, config: SyntheticConfig):
    return [make_sample(i, seed, config) for i in range(*bounds)]


def generate(n: int, seed: int = 0, config: SyntheticConfig | None = None,
             num_proc: int = 1, start: int = 0) -> list[UltrasoundSample]:
    """Cases ``start .. start + n - 1``; identical for any ``num_proc`` (spawned workers each
    make a contiguous chunk of indices; results come back in index order)."""
    config = config or SyntheticConfig()
    if num_proc <= 1 or n < 2:
        return [make_sample(i, seed, config) for i in range(start, start + n)]
    chunks = min(n, num_proc * 4)
    edges = np.linspace(start, start + n, chunks + 1).astype(int)
    bounds = [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True)]
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(num_proc) as pool:
        parts = pool.map(partial(_make_range, seed=seed, config=config), bounds)
    return [s for part in parts for s in part]


def split_indices(samples: list[UltrasoundSample],
                  fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> dict[str, list]:
    """Region-stratified split: within each region (in index order) the first 80 % go to
    train, the next 10 % to validation, the rest to test (largest-remainder rounding over the
    pooled list keeps validation and test non-empty once ``n >= 10``)."""
    by_region: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        by_region.setdefault(s.region, []).append(i)
    pooled = [i for region in sorted(by_region) for i in by_region[region]]
    # Systematic sampling over the region-grouped list: position p -> split by p mod 10.
    cut = np.cumsum(np.round(np.asarray(fractions) * 10).astype(int))
    out: dict[str, list[int]] = {name: [] for name in SPLITS}
    for p, i in enumerate(pooled):
        out[SPLITS[int(np.searchsorted(cut, p % 10, side="right"))]].append(i)
    return {k: sorted(v) for k, v in out.items()}


def build_dataset_dict(n: int, seed: int = 0, config: SyntheticConfig | None = None,
                       num_proc: int = 1, samples: list[UltrasoundSample] | None = None):
    """A ``datasets.DatasetDict`` with ``train`` / ``validation`` / ``test`` (80/10/10,
    region-stratified) in the schema of :func:`echomoe.data.schema.to_hf_dataset`."""
    from datasets import DatasetDict

    samples = samples if samples is not None else generate(n, seed, config, num_proc)
    parts = split_indices(samples)
    return DatasetDict({
        name: to_hf_dataset([samples[i] for i in idx]) for name, idx in parts.items()
    })


def save_preview(samples: list[UltrasoundSample], path: str | Path, max_samples: int = 12,
                 per_row: int = 3) -> Path:
    """PNG grid: for each case the B-mode image and the same image with the organ outline
    (green), lesion mask (red), boxes, calipers (yellow), captioned region / diagnosis."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    shown = samples[:max_samples]
    rows = max(1, -(-len(shown) // per_row))
    fig, axes = plt.subplots(rows, 2 * per_row, figsize=(2.2 * 2 * per_row, 2.5 * rows),
                             squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for k, s in enumerate(shown):
        raw, over = axes[k // per_row, 2 * (k % per_row)], axes[k // per_row, 2 * (k % per_row) + 1]
        image = s.image_array(0)
        raw.imshow(image, cmap="gray", vmin=0, vmax=255)
        over.imshow(image, cmap="gray", vmin=0, vmax=255)
        organ, lesion = s.masks.get("organ"), s.masks.get("lesion")
        if organ is not None and organ.any():
            over.contour(organ, levels=[0.5], colors="lime", linewidths=0.7)
        if lesion is not None and lesion.any():
            over.imshow(np.ma.masked_where(~lesion, lesion), cmap="autumn", alpha=0.45,
                        vmin=0, vmax=1)
        for box in s.boxes:
            x0, y0, x1, y1 = box["bbox"]
            color = "red" if box["label"] == "lesion" else "lime"
            over.add_patch(plt.Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0 + 1, y1 - y0 + 1,
                                         fill=False, ec=color, lw=0.6, ls="--"))
        for a, b in (("long_axis_start", "long_axis_end"), ("short_axis_start",
                     "short_axis_end"), ("lv_diameter_start", "lv_diameter_end")):
            if a in s.keypoints:
                (xa, ya), (xb, yb) = s.keypoints[a], s.keypoints[b]
                over.plot([xa, xb], [ya, yb], "-+", color="yellow", lw=0.7, ms=4)
        size = s.attributes.get("size_long_mm")
        extra = f", {size} mm" if size is not None else ""
        raw.set_title(f"{s.region}", fontsize=8)
        over.set_title(f"{s.diagnosis}{extra}", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
