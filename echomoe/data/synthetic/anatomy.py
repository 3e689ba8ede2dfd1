"""Region anatomy and lesion geometry of the synthetic ultrasound phantom.

:func:`build_scene` draws one case of a region on an ``(S, S)`` grid whose pixels are square,
``spacing = REGION_VIEWS[region].depth_mm / S`` millimetres wide: a mean-backscatter map
(1.0 = reference parenchyma), the organ mask, the lesion mask (all ``False`` in a normal study),
the beam-facing interfaces and posterior shadow/enhancement sources that
:func:`echomoe.data.synthetic.phantom.render` needs, and the study attributes it drew (organ,
lesion keys passed in, hydronephrosis grade, IMT, stenosis %, LV diameter).  Lesion attributes
are sampled by :func:`echomoe.data.synthetic.generate.sample_lesion_attributes` and drive the
outline (shape, margin, orientation), echo level and posterior features here.  Attributes that are
measurements (sizes, location, orientation, stenosis %, LV diameter) are computed from the masks
by :mod:`echomoe.data.synthetic.generate`, so that every label follows from one geometry.

Views: breast, thyroid (transverse) and carotid (longitudinal) with a linear probe; liver,
kidney and a transabdominal pelvis (uterus + ovary) with a convex probe; a parasternal
long-axis heart view with a phased array.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from echomoe.data.synthetic import phantom
from echomoe.data.synthetic.vocab import LESION_TYPES, LV_DILATED_MM, ORGANS


@dataclass(frozen=True)
class View:
    """Probe and imaging depth (mm) of a region's standard view."""

    probe: str
    depth_mm: float


REGION_VIEWS: dict[str, View] = {
    "breast": View("linear", 40.0),
    "gynaecology": View("convex", 120.0),
    "heart": View("phased", 160.0),
    "kidney": View("convex", 140.0),
    "liver": View("convex", 160.0),
    "thyroid": View("linear", 40.0),
    "vessel": View("linear", 30.0),
}

LESION_SIZE_MM: dict[tuple[str, str], tuple[float, float]] = {
    ("breast", "mass"): (6.0, 25.0),
    ("gynaecology", "follicle"): (16.0, 30.0),
    ("gynaecology", "fibroid"): (12.0, 40.0),
    ("heart", "thrombus"): (10.0, 25.0),
    ("kidney", "cyst"): (8.0, 35.0),
    ("kidney", "stone"): (4.0, 12.0),
    ("liver", "cyst"): (8.0, 40.0),
    ("liver", "haemangioma"): (8.0, 35.0),
    ("liver", "metastasis"): (10.0, 40.0),
    ("thyroid", "nodule"): (5.0, 20.0),
    ("vessel", "plaque"): (6.0, 18.0),
}
"""Clinical range of the long axis (mm) per lesion type; the ``size_range`` knob picks a part."""

# Echo level of a lesion relative to its host tissue, by echogenicity.
RELATIVE_ECHO = {"anechoic": 0.02, "hypoechoic": 0.35, "isoechoic": 0.85, "hyperechoic": 2.4,
                 "heterogeneous": 0.6}


@dataclass
class Scene:
    """One drawn case (arrays ``(S, S)``; see the module docstring for units).

    ``interfaces`` is a list of ``(mask, strength)``; ``posterior`` of ``(mask, gain,
    decay_px)``; ``keypoints`` holds extra named points (the heart's LV calipers).
    """

    region: str
    probe: str
    spacing: float
    echo: np.ndarray
    organ: np.ndarray
    lesion: np.ndarray
    interfaces: list = field(default_factory=list)
    posterior: list = field(default_factory=list)
    attributes: dict[str, Any] = field(default_factory=dict)
    keypoints: dict[str, tuple[float, float]] = field(default_factory=dict)


@dataclass
class _Ctx:
    """Drawing context: grid, RNG, scale and knobs of one case."""

    size: int
    spacing: float
    rng: np.random.Generator
    fov: np.ndarray
    contrast: float
    lesion: dict[str, Any] | None  # sampled lesion attributes + "long_px", "short_px"
    echo: np.ndarray = None
    texture: np.ndarray = None
    hydro_p: tuple[float, ...] = (0.55, 0.15, 0.15, 0.15)
    dilated_p: float = 0.35
    echo: np.ndarray | None = None
    texture: np.ndarray | None = None
    interfaces: list = field(default_factory=list)
    posterior: list = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    preset_lesion: np.ndarray | None = None

    def px(self, mm: float) -> float:
        return mm / self.spacing

    def u(self, lo: float, hi: float) -> float:
        return float(self.rng.uniform(lo, hi))

    def paint(self, mask: np.ndarray, level: float | np.ndarray, textured: float = 0.0) -> None:
        """Set the echo of ``mask`` to ``level`` (times a tissue texture of log-std
        ``textured``)."""
        value = level * np.exp(textured * self.texture) if textured else level
        np.copyto(self.echo, value, where=mask)


# --- primitives --------------------------------------------------------------------------


def _window(size: int, cx: float, cy: float, r: float) -> tuple[slice, slice]:
    y0, y1 = max(int(cy - r) - 1, 0), min(int(cy + r) + 2, size)
    x0, x1 = max(int(cx - r) - 1, 0), min(int(cx + r) + 2, size)
    return slice(y0, max(y0, y1)), slice(x0, max(x0, x1))


def _local(size: int, cx: float, cy: float, r: float, angle: float = 0.0):
    """Window slices and rotated local coordinates ``(u, v)`` (u along ``angle``)."""
    sy, sx = _window(size, cx, cy, r)
    yy, xx = phantom.grid(size)
    dy, dx = yy[sy, sx] - np.float32(cy), xx[sy, sx] - np.float32(cx)
    if angle == 0.0:
        return sy, sx, dx, dy
    ca, sa = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    return sy, sx, dx * ca + dy * sa, dy * ca - dx * sa


def ellipse(size: int, cx: float, cy: float, a: float, b: float,
            angle: float = 0.0) -> np.ndarray:
    """``(S, S)`` bool ellipse with semi-axes ``a`` (along ``angle``, radians from +x towards
    +y) and ``b``, in pixels."""
    m = np.zeros((size, size), bool)
    sy, sx, u, v = _local(size, cx, cy, max(a, b), angle)
    m[sy, sx] = (u / a) ** 2 + (v / b) ** 2 <= 1
    return m


def capsule(size: int, p0: tuple[float, float], p1: tuple[float, float], r: float) -> np.ndarray:
    """``(S, S)`` bool: pixels within ``r`` px of the segment ``p0``-``p1`` (``(x, y)``)."""
    (x0, y0), (x1, y1) = p0, p1
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    half = np.hypot(x1 - x0, y1 - y0) / 2
    angle = float(np.arctan2(y1 - y0, x1 - x0))
    m = np.zeros((size, size), bool)
    sy, sx, u, v = _local(size, cx, cy, half + r, angle)
    du = np.maximum(np.abs(u) - np.float32(half), 0)
    m[sy, sx] = du * du + v * v <= r * r
    return m


def below(size: int, y_of_x: np.ndarray) -> np.ndarray:
    """``(S, S)`` bool: pixels at or below the curve ``y(x)`` (``(S,)`` array, pixels)."""
    yy, _ = phantom.grid(size)
    return yy >= y_of_x[None, :].astype(np.float32)


def _curve(c: _Ctx, y0_mm: float, wobble_mm: float, slope: float = 0.0) -> np.ndarray:
    """A gently undulating depth curve ``(S,)`` in pixels."""
    x = np.arange(c.size) / c.size
    k, ph = c.u(1.0, 3.0), c.u(0, 2 * np.pi)
    return c.px(y0_mm) + c.px(wobble_mm) * np.sin(2 * np.pi * k * x + ph) + slope * c.size * x


def lesion_shape(c: _Ctx, cx: float, cy: float, long_px: float, short_px: float, angle: float,
                 shape: str, margin: str) -> tuple[np.ndarray, tuple[slice, slice], np.ndarray]:
    """A lesion outline: ``(mask (S, S) bool, window, alpha)`` where ``alpha`` is the soft
    coverage in the window (a ramp of ~2.5 px for indistinct margins, else the mask).

    The outline is an ellipse whose radius ``r(phi)`` is perturbed: irregular shapes by
    low-order harmonics; angular margins by a triangle wave (corners), microlobulated by
    ``|sin|`` scallops, spiculated by narrow radial spikes.
    """
    rng = c.rng
    a, b = long_px / 2, short_px / 2
    reach = max(a, b) * (1.8 if margin == "spiculated" else 1.35) + 3
    sy, sx, u, v = _local(c.size, cx, cy, reach, angle)
    rho = np.hypot(u, v)
    phi = np.arctan2(v, u)
    cos, sin = np.cos(phi), np.sin(phi)
    r = np.float32(a * b) / np.sqrt((b * cos) ** 2 + (a * sin) ** 2)
    pert = np.ones_like(r)
    if shape == "irregular":
        for k in (2, 3, 4):
            pert += np.float32(rng.uniform(0.04, 0.11)) * np.cos(k * phi + rng.uniform(0, 6.3))
    if margin == "angular":
        k, ph = int(rng.integers(4, 8)), rng.uniform(0, 1)
        tri = np.abs(((k * phi / (2 * np.pi) + ph) % 1.0) - 0.5) * 4 - 1
        pert += np.float32(0.13) * tri
    elif margin == "microlobulated":
        k = int(rng.integers(8, 14))
        pert += np.float32(0.08) * np.abs(np.sin(k * phi / 2 + rng.uniform(0, 3.1))) - 0.04
    elif margin == "spiculated":
        n = int(rng.integers(7, 13))
        centers = rng.uniform(-np.pi, np.pi, n).astype(np.float32)[:, None, None]
        amps = rng.uniform(0.3, 0.7, n).astype(np.float32)[:, None, None]
        pert += (amps * np.maximum(np.cos(phi[None] - centers), 0) ** 40).sum(0)
    elif margin == "indistinct":
        pert += np.float32(0.04) * np.cos(5 * phi + rng.uniform(0, 6.3))
    r *= pert
    inside = rho <= r
    mask = np.zeros((c.size, c.size), bool)
    mask[sy, sx] = inside
    mask &= c.fov
    if margin == "indistinct":
        alpha = np.clip((r - rho) / 2.5 + 0.5, 0, 1)
    else:
        alpha = inside.astype(np.float32)
    return mask, (sy, sx), alpha


def _aspect(c: _Ctx, shape: str) -> float:
    return {"round": c.u(0.88, 1.0), "oval": c.u(0.5, 0.78), "irregular": c.u(0.55, 0.9)}[shape]


# --- regions -----------------------------------------------------------------------------


def _skin(c: _Ctx, fat_mm: float, fat_level: float = 0.5) -> np.ndarray:
    """Skin line and subcutaneous fat from the top; returns the mask below the fat."""
    skin = c.px(1.2)
    c.echo[: max(1, int(round(skin)))] = 2.6
    deep = below(c.size, _curve(c, fat_mm, 0.08 * fat_mm))
    c.paint(~deep & (phantom.grid(c.size)[0] >= skin), fat_level, 0.25)
    c.interfaces.append((deep, 1.2))
    return deep


def _breast(c: _Ctx) -> tuple[np.ndarray, np.ndarray]:
    c.echo[:] = 0.8
    deep = _skin(c, c.u(5, 9), 0.45)
    gland_bottom = below(c.size, _curve(c, c.u(20, 26), 1.2))
    gland = deep & ~gland_bottom
    c.paint(gland, 1.5, 0.45)
    for _ in range(int(c.rng.integers(2, 5))):  # fat lobules and Cooper's ligaments
        x, y = c.u(0, c.size), c.px(c.u(3, 8))
        c.paint(ellipse(c.size, x, y, c.px(c.u(3, 6)), c.px(c.u(1.5, 2.5))), 0.4)
        c.paint(capsule(c.size, (x - c.px(4), y + c.px(2.5)), (x + c.px(4), y - c.px(1)),
                        0.8), 2.0)
    pec_top = _curve(c, c.u(28, 31), 1.0)
    pec = below(c.size, pec_top)
    c.paint(gland_bottom & ~pec, 0.45, 0.2)
    yy, xx = phantom.grid(c.size)
    stria = 1 + 0.6 * np.cos((yy + 0.08 * xx) * (2 * np.pi / c.px(1.6)))
    c.paint(pec, 0.7 * stria)
    c.interfaces.append((pec, 1.5))
    if c.rng.random() < 0.5:  # rib: bright anterior surface, clean shadow
        rib = ellipse(c.size, c.u(0.2, 0.8) * c.size, pec_top.mean() + c.px(9.5), c.px(9),
                      c.px(3))
        c.paint(rib, 0.5)
        c.interfaces.append((rib, 3.0))
        c.posterior.append((rib, 0.12, 0.0))
    return gland, gland


def _thyroid(c: _Ctx) -> tuple[np.ndarray, np.ndarray]:
    s = c.size
    c.echo[:] = 0.7
    deep = _skin(c, c.u(3, 4.5), 0.6)
    strap = deep & ~below(s, _curve(c, c.u(7.5, 9), 0.5))
    c.paint(strap, 0.45, 0.15)
    c.interfaces.append((strap, 1.0))
    need = c.lesion["long_px"] * 0.65 if c.lesion else 0
    a, b = max(c.px(c.u(10, 12.5)), need), max(c.px(c.u(7.5, 9.5)), need * 0.8)
    cx, cy = s * c.u(0.58, 0.64), c.px(9) + b
    lobe = ellipse(s, cx, cy, a, b, c.u(-0.15, 0.1)) & deep & ~strap
    c.paint(lobe, 1.5, 0.15)
    c.interfaces.append((lobe, 0.8))
    tx, ty, tr = cx - a - c.px(3.5), cy - c.px(1), c.px(6.5)
    trachea = ellipse(s, tx, ty, tr, tr)
    wall = trachea & ~np.roll(trachea, int(round(c.px(1.2))), axis=0)
    wall &= phantom.grid(s)[0] < ty
    c.paint(wall, 3.0)
    for k in (1, 2, 3):  # air: shadow with reverberation arcs of the anterior wall
        c.paint(np.roll(wall, int(round(k * c.px(4.0))), axis=0), 0.5 / k / 0.12)
    c.posterior.append((wall, 0.12, 0.0))
    carotid = ellipse(s, cx + a + c.px(2), cy + c.px(3), c.px(3.5), c.px(3.5))
    c.paint(carotid, 0.02)
    c.interfaces.append((carotid, 1.5))
    c.posterior.append((carotid, 1.5, c.px(6)))
    c.paint(ellipse(s, cx - c.px(3), cy + b + c.px(4), c.px(8), c.px(3)) & ~lobe, 0.4)
    core = ellipse(s, cx, cy, max(a - need / 2, 2), max(b - need / 2, 2)) & lobe
    return lobe, core


def _liver_wall(c: _Ctx) -> np.ndarray:
    c.echo[:] = 0.5
    deep = _skin(c, c.u(6, 10), 0.45)
    muscle_bottom = below(c.size, _curve(c, c.u(14, 18), 1.0))
    c.paint(deep & ~muscle_bottom, 0.7, 0.2)
    c.interfaces.append((muscle_bottom, 1.5))
    return muscle_bottom


def _liver(c: _Ctx) -> tuple[np.ndarray, np.ndarray]:
    s = c.size
    inner = _liver_wall(c)
    x = np.arange(s) / s
    dia_y = c.px(c.u(120, 140)) - c.px(c.u(10, 25)) * np.sin(np.pi * x) + c.u(-8, 8) * x
    lung = below(s, dia_y)
    liver = inner & ~lung & c.fov
    c.paint(liver, 1.0, 0.12)
    c.paint(lung, 0.25, 0.3)
    c.interfaces.append((lung, 5.0))
    vessels = np.zeros((s, s), bool)
    for i in range(int(c.rng.integers(2, 5))):
        p0 = (s * c.u(0.1, 0.9), c.px(c.u(40, 110)))
        ang, length = c.u(-0.8, 0.8), c.px(c.u(15, 45))
        p1 = (p0[0] + length * np.cos(ang), p0[1] + length * np.sin(ang))
        vessel = capsule(s, p0, p1, c.px(c.u(3.5, 7))) & liver
        c.paint(vessel, 0.03)
        vessels |= vessel
        if i % 2 == 0:  # portal veins: bright echogenic walls
            c.interfaces.append((vessel, 2.0))
    c.posterior.append((vessels, 1.25, c.px(15)))
    site = liver & ~vessels & ~below(s, dia_y - c.px(15)) & below(s, np.full(s, c.px(35)))
    return liver, site


def _kidney(c: _Ctx) -> tuple[np.ndarray, np.ndarray]:
    s = c.size
    inner = _liver_wall(c)
    liver = inner & ~below(s, _curve(c, c.u(45, 60), 6.0, c.u(-0.2, 0.2)))
    c.paint(liver, 1.0, 0.12)
    c.interfaces.append((liver, 0.8))
    cx, cy, ang = s * c.u(0.42, 0.58), c.px(c.u(85, 95)), c.u(-0.35, 0.35)
    a, b = c.px(c.u(48, 56)), c.px(c.u(24, 29))
    fat = ellipse(s, cx, cy, a + c.px(4), b + c.px(4), ang)
    c.paint(fat & ~liver, 1.8, 0.3)
    kidney = ellipse(s, cx, cy, a, b, ang) & c.fov
    c.paint(kidney, 0.6, 0.1)
    c.interfaces.append((kidney, 1.5))
    ca, sa = np.cos(ang), np.sin(ang)
    for t in np.linspace(-0.65, 0.65, 5):  # medullary pyramids
        for side in (-1, 1):
            px_, py_ = t * a, side * b * 0.55
            c.paint(ellipse(s, cx + px_ * ca - py_ * sa, cy + px_ * sa + py_ * ca,
                            c.px(4.5), c.px(3.5), ang + np.pi / 2), 0.42)
    sinus = ellipse(s, cx, cy, a * 0.62, b * 0.38, ang)
    c.paint(sinus, 1.9, 0.3)
    grade = ("none", "mild", "moderate", "severe")[int(np.searchsorted(
        np.cumsum(c.hydro_p) / sum(c.hydro_p), c.rng.random(), side="right").clip(0, 3))]
    if grade != "none":
        f = {"mild": 0.35, "moderate": 0.6, "severe": 0.85}[grade]
        pelvis = ellipse(s, cx, cy, a * 0.55 * f + c.px(3), b * 0.35 * f + c.px(2), ang)
        if grade != "mild":
            for t in np.linspace(-0.6, 0.6, 4):
                for side in (-1, 1):
                    px_, py_ = t * a, side * b * (0.3 + 0.2 * f)
                    pelvis |= ellipse(s, cx + px_ * ca - py_ * sa, cy + px_ * sa + py_ * ca,
                                      c.px(2 + 5 * f), c.px(1.5 + 4 * f))
        pelvis &= kidney
        c.paint(pelvis, 0.03)
        c.posterior.append((pelvis, 1.3, c.px(10)))
    c.extra["hydronephrosis"] = grade
    if c.lesion and c.lesion["lesion_type"] == "stone":
        return kidney, sinus & ~ellipse(s, cx, cy, a * 0.2, b * 0.1, ang)
    return kidney, ellipse(s, cx, cy, a * 0.8, b * 0.75, ang) & ~ellipse(
        s, cx, cy, a * 0.65, b * 0.5, ang)


def _heart(c: _Ctx) -> tuple[np.ndarray, np.ndarray]:
    s = c.size
    c.echo[:] = 0.35
    c.paint(phantom.grid(s)[0] < c.px(c.u(8, 12)), 0.9, 0.3)
    dilated = c.lesion is None and c.rng.random() < c.dilated_p
    lv_mm = c.u(LV_DILATED_MM + 2, 75) if dilated else c.u(38, LV_DILATED_MM - 2)
    b = c.px(lv_mm) / 2
    wall = c.px(c.u(8, 12))
    top = c.px(c.u(48, 56))
    cx, cy, a = s * c.u(0.45, 0.52), top + b, s * c.u(0.26, 0.3)
    rv = ellipse(s, cx + s * 0.05, top - wall - c.px(11), a * 1.1, c.px(11))
    myo = ellipse(s, cx, cy, a + wall, b + wall)
    c.paint(myo, 1.0, 0.25)
    c.paint(rv, 0.04, 0.3)
    c.interfaces.append((rv, 1.0))
    peri = ellipse(s, cx, cy, a + wall + c.px(3), b + wall + c.px(3)) & ~myo
    c.paint(peri & (phantom.grid(s)[0] > cy), 2.2, 0.2)
    lv = ellipse(s, cx, cy, a, b) & c.fov
    c.paint(lv, 0.04, 0.3)
    c.interfaces.append((lv, 0.8))
    la = ellipse(s, cx + a + c.px(10), cy + b * 0.6, c.px(18), c.px(16))
    c.paint(la & ~myo, 0.04, 0.3)
    aorta = capsule(s, (cx + a * 0.6, top - c.px(3)), (s * 1.1, top - c.px(10)), c.px(12))
    c.paint(aorta & ~rv, 0.04, 0.3)
    for dy in (-0.35, 0.35):  # mitral leaflets
        c.paint(capsule(s, (cx + a * 0.95, cy + dy * b), (cx + a * 0.55, cy + dy * 0.3 * b),
                        0.9), 2.2)
    return lv, lv & (phantom.grid(s)[1] < cx - a * 0.45)


def _vessel(c: _Ctx) -> tuple[np.ndarray, np.ndarray]:
    s = c.size
    c.echo[:] = 0.7
    deep = _skin(c, c.u(2.5, 4), 0.55)
    c.paint(deep & ~below(s, _curve(c, c.u(7, 9), 0.6)), 0.5, 0.15)
    x = np.arange(s, dtype=np.float32)
    yc = c.px(c.u(15, 18)) + c.u(-0.06, 0.06) * (x - s / 2)
    half = c.px(c.u(6, 8)) / 2
    imt = c.px(c.u(0.5, 1.3))
    adv = c.px(1.0)
    top, bot = yc - half, yc + half
    lumen = below(s, top) & ~below(s, bot + 1)
    near = below(s, top - imt - adv) & ~below(s, top)
    far = below(s, bot + 1) & ~below(s, bot + 1 + imt + adv)
    c.paint(near | far, 2.4)
    c.paint(near & below(s, top - imt), 0.5)
    c.paint(far & ~below(s, bot + 1 + imt), 0.5)
    c.paint(lumen, 0.02)
    c.interfaces.append((lumen, 1.5))
    c.extra["imt_mm"] = round(float(imt * c.spacing), 1)
    c.extra["stenosis_percent"] = 0
    if c.lesion:
        les = c.lesion
        length = les["long_px"]
        px0 = c.u(length / 2 + 2, s - length / 2 - 2)
        target = c.u(0.15, 0.85) * 2 * half
        on_far = c.rng.random() < 0.7
        t = np.clip(1 - ((x - px0) / (length / 2)) ** 2, 0, None) ** 0.5 * target
        if les["shape"] == "irregular" or les["margin"] != "circumscribed":
            t *= 1 + 0.15 * np.sin(x * c.u(0.3, 0.8) + c.u(0, 6))
        edge = bot + 1 - t if on_far else top + t
        plaque = lumen & (below(s, edge) if on_far else ~below(s, edge))
        c.preset_lesion = plaque
        counts, lum = plaque.sum(0), lumen.sum(0)
        c.extra["stenosis_percent"] = max(1, int(round(100 * float((counts / lum).max()))))
    return lumen, lumen


def _gynaecology(c: _Ctx) -> tuple[np.ndarray, np.ndarray]:
    s = c.size
    c.echo[:] = 0.6
    deep = _skin(c, c.u(6, 9), 0.45)
    c.paint(deep & ~below(s, _curve(c, c.u(11, 14), 0.8)), 0.7, 0.2)
    bladder = ellipse(s, s * c.u(0.35, 0.5), c.px(c.u(30, 36)), c.px(c.u(28, 38)),
                      c.px(c.u(12, 16)))
    c.paint(bladder, 0.02)
    c.interfaces.append((bladder, 1.5))
    c.posterior.append((bladder, 1.5, c.px(25)))
    ang = c.u(-0.5, -0.15)
    ux, uy, ua, ub = s * c.u(0.42, 0.52), c.px(c.u(68, 74)), c.px(c.u(34, 42)), c.px(
        c.u(18, 22))
    uterus = ellipse(s, ux, uy, ua, ub, ang) & c.fov & ~bladder
    c.paint(uterus, 0.9, 0.15)
    c.interfaces.append((uterus, 0.8))
    endo = ellipse(s, ux, uy, ua * 0.7, c.px(c.u(2, 5)), ang)
    c.paint(endo, 2.2, 0.2)
    need = c.lesion["long_px"] / 2 + c.px(4) if c.lesion else 0
    oa, ob = max(c.px(c.u(14, 18)), need), max(c.px(c.u(9, 12)), need * 0.9)
    ox, oy = min(ux + ua + oa * 0.6, s - oa * 0.7), min(uy + c.px(15), c.px(110) - ob)
    ovary = ellipse(s, ox, oy, oa, ob, c.u(-0.3, 0.3)) & c.fov
    c.paint(ovary & ~uterus, 0.65, 0.2)
    for _ in range(int(c.rng.integers(3, 7))):  # antral follicles
        fx, fy = ox + c.u(-0.6, 0.6) * oa, oy + c.u(-0.5, 0.5) * ob
        c.paint(ellipse(s, fx, fy, c.px(c.u(1.5, 4)), c.px(c.u(1.5, 3.5))) & ovary, 0.03)
    if c.lesion and c.lesion["lesion_type"] == "follicle":
        return uterus, ellipse(s, ox, oy, oa * 0.2, ob * 0.2)
    return uterus, uterus & ~ellipse(s, ux, uy, ua * 0.55, ub * 0.55, ang)


REGION_BUILDERS = {"breast": _breast, "gynaecology": _gynaecology, "heart": _heart,
                   "kidney": _kidney, "liver": _liver, "thyroid": _thyroid, "vessel": _vessel}

# Host echo level that a lesion's echogenicity is relative to (breast: subcutaneous fat).
HOST_ECHO = {"breast": 0.65, "gynaecology": 0.9, "heart": 1.0, "kidney": 0.6, "liver": 1.0,
             "thyroid": 1.5, "vessel": 0.7}


def _paint_lesion(c: _Ctx, region: str, kind: str, a: dict[str, Any], mask: np.ndarray,
                  window: tuple[slice, slice], alpha: np.ndarray) -> None:
    """Echo texture, internal features, walls and posterior features of a drawn lesion."""
    rng, k = c.rng, c.contrast
    sy, sx = window
    echo = a["echogenicity"]
    level = HOST_ECHO[region] * RELATIVE_ECHO[echo] ** k
    if kind == "stone":
        level = 5.0
    if echo == "heterogeneous":
        level = level * np.exp(0.9 * k * phantom.smooth_field(rng, c.size, 16)[sy, sx])
    local = c.echo[sy, sx]
    alpha = alpha * mask[sy, sx]
    local += alpha * (level - local)
    if kind == "metastasis":  # hypoechoic halo ("target" appearance)
        halo = mask & ~phantom.erode(mask, max(1, int(round(c.px(1.5)))))
        c.paint(halo, HOST_ECHO[region] * 0.25 ** k)
    ys, xs = np.nonzero(mask)
    n = ys.size
    if region == "thyroid":
        comp, foci = a["composition"], a["echogenic_foci"]
        if comp in ("spongiform", "mixed"):
            m = 12 if comp == "spongiform" else 1
            for i in rng.integers(0, n, m):
                r = c.px(c.u(0.4, 0.9)) if m > 1 else np.sqrt(n / np.pi) * 0.5
                c.paint(ellipse(c.size, xs[i], ys[i], r, r * 0.8) & mask, 0.03)
        if foci == "punctate":
            pick = rng.integers(0, n, int(rng.integers(3, 8)))
            c.echo[ys[pick], xs[pick]] = 6.0
        elif foci == "macrocalcifications":
            i = int(rng.integers(n))
            calc = ellipse(c.size, xs[i], ys[i], c.px(1.2), c.px(0.9)) & mask
            c.paint(calc, 6.0)
            c.posterior.append((calc, 0.2 ** k, 0.0))
    walls = {"cyst": 1.2, "follicle": 1.0, "stone": 3.0}.get(kind, 0.3)
    c.interfaces.append((mask, walls * (a["margin"] != "indistinct")))
    if a["posterior"] == "enhancement":
        height = ys.max() - ys.min() + 1
        c.posterior.append((mask, 1.0 + 0.9 * k, 1.5 * height + 4))
    elif a["posterior"] == "shadowing" and not (region == "thyroid"):
        c.posterior.append((mask, (0.15 if kind in ("stone", "plaque") else 0.4) ** k, 0.0))


def build_scene(region: str, size: int, rng: np.random.Generator,
                lesion: dict[str, Any] | None, contrast: float = 1.0,
                size_range: tuple[float, float] = (0.0, 1.0),
                hydronephrosis_p: tuple[float, ...] = (0.55, 0.15, 0.15, 0.15),
                dilated_lv_p: float = 0.35) -> Scene:
    """Draw one case of ``region`` (``lesion=None``: a normal study).

    Args:
        size: image side ``S`` in pixels (spacing = view depth / ``S`` mm).
        rng: the case's random generator (consumed in a fixed order: deterministic).
        lesion: sampled lesion attributes (``lesion_type``, ``shape``, ``margin``,
            ``echogenicity``, ``posterior``, ``orientation_target`` and the region's extra
            keys), e.g. from :func:`echomoe.data.synthetic.generate.sample_lesion_attributes`.
        contrast: exponent on a lesion's relative echo level and posterior gain (1 = default,
            0 = invisible by echo level).
        size_range: the part ``(lo, hi)`` in ``[0, 1]`` of the lesion type's clinical long-axis
            range (:data:`LESION_SIZE_MM`) that sizes are drawn from.
        hydronephrosis_p: probabilities of none / mild / moderate / severe (kidney).
        dilated_lv_p: probability of a dilated LV in a heart study without thrombus.
    """
    view = REGION_VIEWS[region]
    spacing = view.depth_mm / size
    geom = phantom.beam_geometry(view.probe, size)
    lesion_type = None if lesion is None else lesion["lesion_type"]
    c = _Ctx(size, spacing, rng, geom.fov, contrast, None, hydronephrosis_p, dilated_lv_p)
    if lesion is not None:
        if lesion_type not in LESION_TYPES[region]:
            raise ValueError(f"{region} has no lesion type {lesion_type!r}")
        lo, hi = LESION_SIZE_MM[(region, lesion_type)]
        long_px = (lo + (hi - lo) * rng.uniform(*size_range)) / spacing
        lesion = c.lesion = {**lesion, "long_px": long_px,
                             "short_px": long_px * _aspect(c, lesion["shape"])}
    c.echo = np.empty((size, size), np.float32)
    c.texture = phantom.smooth_field(rng, size, 12)
    organ, site = REGION_BUILDERS[region](c)
    lesion_mask = np.zeros((size, size), bool)
    if lesion is not None:
        if c.preset_lesion is not None:
            lesion_mask = c.preset_lesion
            ys, xs = np.nonzero(lesion_mask)
            window = _window(size, xs.mean(), ys.mean(), max(np.ptp(xs), np.ptp(ys)) / 2 + 2)
            alpha = np.ones(lesion_mask[window].shape, np.float32)
        else:
            candidates = np.flatnonzero(site if site.any() else organ)
            centre = candidates[int(rng.integers(candidates.size))]
            cy, cx = divmod(int(centre), size)
            upright = lesion["orientation_target"] == "not parallel"
            angle = (np.pi / 2 if upright else 0.0) + rng.normal(0, 0.15)
            lesion_mask, window, alpha = lesion_shape(
                c, cx, cy, lesion["long_px"], lesion["short_px"], angle, lesion["shape"],
                lesion["margin"])
            if region == "heart":  # a thrombus lies inside the LV cavity, against the wall
                lesion_mask &= organ
            if not lesion_mask.any():
                lesion_mask[cy, cx] = True
        _paint_lesion(c, region, lesion_type, lesion, lesion_mask, window, alpha)
    attributes: dict[str, Any] = {"organ": ORGANS[region], "lesion_present": lesion is not None,
                                  "lesion_type": lesion_type or "none"}
    if lesion is not None:
        for key in ("shape", "margin", "echogenicity", "posterior", "composition",
                    "echogenic_foci"):
            if key in lesion:
                attributes[key] = lesion[key]
    attributes.update(c.extra)
    keypoints: dict[str, tuple[float, float]] = {}
    if region == "heart":
        cols = np.flatnonzero(organ.any(0))
        x = int((cols[0] + cols[-1]) // 2)
        rows = np.flatnonzero(organ[:, x])
        keypoints = {"lv_diameter_start": (float(x), float(rows[0])),
                     "lv_diameter_end": (float(x), float(rows[-1]))}
        attributes["lv_diameter_mm"] = round(float(rows[-1] - rows[0]) * spacing, 1)
    return Scene(region, view.probe, spacing, c.echo, organ & geom.fov, lesion_mask,
                 c.interfaces, c.posterior, attributes, keypoints)
