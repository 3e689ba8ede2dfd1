"""B-mode image formation for the synthetic ultrasound phantom (vectorised numpy).

A scene is a map of mean backscatter ("echogenicity", float, 1.0 = reference parenchyma) on an
``(S, S)`` pixel grid with square pixels of ``spacing`` mm; depth grows downwards from the
transducer face at the top row.  :func:`render` turns it into an 8-bit B-mode image:

1. **specular interfaces**: boundaries that face the beam (changes along the beam direction)
   of the masks listed as interfaces become bright lines (capsules, walls, diaphragm);
2. **posterior features**: behind an object, along each beam line, the intensity is multiplied
   by a gain ``< 1`` (acoustic shadow: stones, calcifications, bone, gas) or ``> 1`` decaying
   with depth (enhancement behind fluid);
3. **speckle**: multiplicative, fully developed (Rayleigh amplitude): the magnitude of a
   complex Gaussian field generated on the *beam grid* (lateral beam x axial sample) and
   smoothed by a small point-spread function, then scan-converted to pixels, so grains are
   wider laterally than axially and widen with depth in a sector;
4. **attenuation and time-gain compensation**: ``exp(-2 alpha depth)`` compensated by a TGC
   that is not perfect (a small residual slope and a near-field bump);
5. **log compression** over a dynamic range in dB to ``uint8``; pixels outside the probe's
   field of view are 0.

Probes (:func:`beam_geometry`): ``linear`` (rectangular field, vertical beams), ``convex``
(sector from a virtual apex above the image, curved face) and ``phased`` (narrow-apex sector).
Geometry arrays are cached per ``(probe, size)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

PROBES = ("linear", "convex", "phased")


@dataclass(frozen=True)
class BeamGeometry:
    """Per-pixel beam coordinates of one probe on an ``(S, S)`` grid (read-only arrays).

    Attributes:
        probe: ``linear`` | ``convex`` | ``phased``.
        size: ``S`` in pixels.
        fov: ``(S, S)`` bool, pixels inside the field of view.
        depth: ``(S, S)`` float32, distance along the beam from the transducer face, in pixels.
        beam: ``(S, S)`` int32, index of the beam line through the pixel (``0..S-1``).
        speckle_index: ``(S, S)`` int64 flat index into the ``(n_beams, n_samples)`` speckle
            grid.
        n_beams, n_samples: shape of the speckle grid.
    """

    probe: str
    size: int
    fov: np.ndarray
    depth: np.ndarray
    beam: np.ndarray
    speckle_index: np.ndarray
    n_beams: int
    n_samples: int


@lru_cache(maxsize=32)
def grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates ``(yy, xx)``, each ``(S, S)`` float32 (read-only)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    yy.flags.writeable = False
    xx.flags.writeable = False
    return yy, xx


@lru_cache(maxsize=32)
def beam_geometry(probe: str, size: int) -> BeamGeometry:
    """Beam coordinates of ``probe`` on an ``(size, size)`` image (cached)."""
    if probe not in PROBES:
        raise ValueError(f"unknown probe {probe!r}; valid: {', '.join(PROBES)}")
    yy, xx = grid(size)
    s = float(size)
    if probe == "linear":
        fov = np.ones((size, size), bool)
        depth = yy.copy()
        lateral = xx / s  # 0..1
        n_beams = int(s * 0.7)
    else:
        if probe == "convex":
            radius, half_angle = 0.4 * s, np.deg2rad(30.0)
        else:
            radius, half_angle = 0.03 * s, np.deg2rad(38.0)
        apex_y = -radius + 0.5
        dx, dy = xx - (s - 1) / 2, yy - apex_y
        r = np.hypot(dx, dy)
        theta = np.arctan2(dx, dy)
        depth = (r - radius).astype(np.float32)
        fov = (np.abs(theta) <= half_angle) & (depth >= 0) & (depth <= s - 0.5)
        lateral = (theta / half_angle + 1) / 2
        n_beams = int(s * (0.6 if probe == "convex" else 0.5))
    lateral = np.clip(lateral, 0, 1 - 1e-6)
    beam = (lateral * size).astype(np.int32)
    n_samples = size
    d_idx = np.clip(depth, 0, n_samples - 1).astype(np.int64)
    b_idx = (lateral * n_beams).astype(np.int64)
    speckle_index = b_idx * n_samples + d_idx
    arrays = [fov, depth.astype(np.float32), beam, speckle_index]
    for a in arrays:
        a.flags.writeable = False
    return BeamGeometry(probe, size, arrays[0], arrays[1], arrays[2], arrays[3], n_beams,
                        n_samples)


@lru_cache(maxsize=16)
def _upsampler(size: int, coarse: int) -> np.ndarray:
    """``(size, coarse)`` float32 linear-interpolation matrix from a coarse grid to pixels."""
    pos = np.linspace(0, coarse - 1, size)
    lo = np.floor(pos).astype(int).clip(0, coarse - 2)
    frac = pos - lo
    u = np.zeros((size, coarse), np.float32)
    u[np.arange(size), lo] = 1 - frac
    u[np.arange(size), lo + 1] = frac
    u.flags.writeable = False
    return u


def smooth_field(rng: np.random.Generator, size: int, coarse: int = 8) -> np.ndarray:
    """Smooth zero-mean unit-ish Gaussian field, ``(S, S)`` float32 (bilinear upsampling of a
    ``(coarse, coarse)`` white-noise grid); used for tissue texture and heterogeneity."""
    u = _upsampler(size, coarse)
    g = rng.standard_normal((coarse, coarse), dtype=np.float32)
    return u @ g @ u.T


def speckle(rng: np.random.Generator, geom: BeamGeometry, noise: float = 1.0) -> np.ndarray:
    """Multiplicative speckle, ``(S, S)`` float32 with unit mean power.

    The magnitude of a complex circular Gaussian (Rayleigh amplitude), correlated by a 2x3
    axial x lateral PSF on the beam grid; ``noise`` in ``[0, 1]`` mixes it with a constant
    (0: no speckle, 1: fully developed).
    """
    nb, ns = geom.n_beams, geom.n_samples
    g = rng.standard_normal((2, nb + 2, ns + 1), dtype=np.float32)
    re, im = g[0], g[1]
    # PSF: lateral [0.5, 1, 0.5] x axial [1, 0.7]; applied to real and imaginary parts.
    re = re[:-2] * 0.5 + re[1:-1] + re[2:] * 0.5
    im = im[:-2] * 0.5 + im[1:-1] + im[2:] * 0.5
    re = re[:, :-1] + 0.7 * re[:, 1:]
    im = im[:, :-1] + 0.7 * im[:, 1:]
    env = np.sqrt(re * re + im * im)
    env *= np.float32(1.0 / np.sqrt(2 * 1.5 * 1.49))  # unit mean power
    env = env.ravel()[geom.speckle_index]
    if noise >= 1.0:
        return env
    return np.float32(1.0 - noise) + np.float32(noise) * env


def axial_edges(mask: np.ndarray) -> np.ndarray:
    """Pixels where ``mask`` changes along the (vertical) beam direction, ``(S, S)`` bool."""
    edge = np.zeros_like(mask)
    change = mask[1:] != mask[:-1]
    edge[1:] |= change
    edge[:-1] |= change
    return edge


def erode(mask: np.ndarray, steps: int = 1) -> np.ndarray:
    """4-neighbour binary erosion of an ``(H, W)`` bool mask, ``steps`` times (outside the image
    counts as background)."""
    m = mask
    for _ in range(steps):
        e = m.copy()
        e[1:] &= m[:-1]
        e[:-1] &= m[1:]
        e[:, 1:] &= m[:, :-1]
        e[:, :-1] &= m[:, 1:]
        e[0] = e[-1] = False
        e[:, 0] = e[:, -1] = False
        m = e
    return m


def posterior_gain(geom: BeamGeometry, mask: np.ndarray, gain: float,
                   decay_px: float = 0.0) -> np.ndarray:
    """Multiplicative map ``(S, S)`` float32 for the region behind ``mask`` along each beam.

    For every beam line that crosses ``mask``, pixels deeper than the object's far edge get
    ``gain`` (``< 1`` shadow, ``> 1`` enhancement); with ``decay_px > 0`` the effect fades
    as ``exp(-(depth - far) / decay_px)``.  Pixels elsewhere get 1.
    """
    out = np.ones(mask.shape, np.float32)
    if not mask.any():
        return out
    hit = np.full(geom.size, -1.0, np.float32)
    np.maximum.at(hit, geom.beam[mask], geom.depth[mask])
    far = np.where(hit >= 0, hit, np.float32(np.inf))[geom.beam]
    behind = geom.depth > far
    if decay_px > 0:
        excess = np.where(behind, geom.depth - far, np.float32(0))
        out += np.float32(gain - 1.0) * np.exp(excess * np.float32(-1.0 / decay_px)) * behind
    else:
        out[behind] = gain
    return out


def render(
    echo: np.ndarray,
    geom: BeamGeometry,
    rng: np.random.Generator,
    interfaces: list[tuple[np.ndarray, float]] = (),
    posterior: list[tuple[np.ndarray, float, float]] = (),
    noise: float = 1.0,
    attenuation_db_cm_mhz: float = 0.5,
    frequency_mhz: float = 5.0,
    spacing: float = 0.3,
    tgc_residual: float = 0.0,
    dynamic_range_db: float = 50.0,
    gain_db: float = 0.0,
) -> np.ndarray:
    """B-mode image ``(S, S)`` uint8 from a mean-backscatter map.

    Args:
        echo: ``(S, S)`` float32 mean backscatter (>= 0; 1.0 = reference parenchyma).
        geom: the probe's :class:`BeamGeometry`.
        rng: random generator for speckle and electronic noise.
        interfaces: ``(mask, strength)``: beam-facing boundaries of ``mask`` add ``strength``.
        posterior: ``(mask, gain, decay_px)`` posterior shadow / enhancement behind ``mask``.
        noise: speckle strength in ``[0, 1]`` (1 = fully developed Rayleigh speckle).
        attenuation_db_cm_mhz, frequency_mhz: tissue attenuation (round trip is 2x).
        spacing: mm per pixel.
        tgc_residual: fraction of the attenuation that the TGC fails to compensate (can be <0).
        dynamic_range_db: log-compression window.
        gain_db: overall gain.
    """
    tissue = echo.astype(np.float32, copy=True)
    for mask, strength in interfaces:
        tissue += np.float32(strength) * axial_edges(mask)
    for mask, gain, decay in posterior:
        tissue *= posterior_gain(geom, mask, gain, decay)
    intensity = tissue * speckle(rng, geom, noise)
    # Attenuation in dB over depth (round trip), minus what the TGC compensates.
    depth_cm = geom.depth * np.float32(spacing / 10.0)
    att_db = 2 * attenuation_db_cm_mhz * frequency_mhz * depth_cm
    residual_db = tgc_residual * att_db - 2.5 * np.exp(-depth_cm / 0.4) + gain_db
    amplitude_db = 20 * np.log10(intensity + 1e-4) + residual_db
    # Reference tissue (echo 1.0) sits 40 % up the dynamic range (grey ~100).
    scale = np.float32(255.0 / dynamic_range_db)
    img = (amplitude_db + np.float32(0.4 * dynamic_range_db)) * scale
    np.clip(img, 0, 255, out=img)
    img[~geom.fov] = 0
    return img.astype(np.uint8)
