"""Pixel depths and files: every image becomes uint8 by *rescaling* its nominal range, never by
clipping, and DICOM files are recognised wherever an image path is read.

The model's input range is uint8 ``[0, 255]``.  Deeper images are mapped linearly from their
nominal range (:func:`to_uint8`):

=========================== ===============================================================
uint8                       unchanged
unsigned ``b``-bit          ``round(v * 255 / (2**b - 1))``; ``b`` is the depth the file
(uint16, uint32)            declares (DICOM ``BitsStored``; 16 for 16-bit PNG / TIFF), so a
                            12-bit scan stored in 16-bit words keeps its full contrast
signed integers             shifted by ``2**(b-1)`` first (DICOM ``PixelRepresentation`` 1)
float, int32 images (PIL    ``(v - min) * 255 / (max - min)`` of the image itself (their
``I`` / ``F`` modes)        nominal range is unknown); a constant image becomes 0
bool                        ``{0, 255}``
=========================== ===============================================================

:func:`read_grayscale` opens any image file PIL reads, and DICOM (by its ``DICM`` preamble,
whatever the extension, through :func:`echomoe.data.formats.dicom.read_dicom`: the first
frame).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["contrast_to_noise", "is_dicom", "read_grayscale", "to_grayscale", "to_uint8"]

# ITU-R BT.601 luma weights: they sum to 1, so a gray pixel (R = G = B) keeps its value, which
# keeps the B-mode intensities of colour ultrasound frames (overlays aside).
_LUMA = np.array([0.299, 0.587, 0.114])


def to_uint8(array: np.ndarray, bits: int | None = None, *, signed: bool = False) -> np.ndarray:
    """``array`` rescaled to uint8 (see the module docstring).

    Args:
        array: integer, float or bool pixels of any shape.
        bits: the nominal depth of integer pixels (default: the dtype's width; 8 for uint8).
        signed: the integers are two's complement ``bits``-bit values (shifted to unsigned).

    Raises:
        ValueError: ``bits`` outside ``1 .. 32``, or a complex / object array.
    """
    a = np.asarray(array)
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * 255
    if a.dtype.kind == "f":
        finite = a[np.isfinite(a)]
        if finite.size == 0:
            return np.zeros(a.shape, np.uint8)
        lo, hi = float(finite.min()), float(finite.max())
        scaled = (np.nan_to_num(a, nan=lo, posinf=hi, neginf=lo) - lo) / max(hi - lo, 1e-12)
        return np.round(np.clip(scaled, 0, 1) * 255).astype(np.uint8)
    if a.dtype.kind not in "iu":
        raise ValueError(f"cannot convert {a.dtype} pixels to uint8")
    bits = a.dtype.itemsize * 8 if bits is None else int(bits)
    if not 1 <= bits <= 32:
        raise ValueError(f"bits must be in 1..32, got {bits}")
    if a.dtype == np.uint8 and bits == 8:
        return a
    v = a.astype(np.int64)
    if signed or a.dtype.kind == "i":
        v = v + (1 << (bits - 1))
    top = (1 << bits) - 1
    return np.round(np.clip(v, 0, top) * (255.0 / top)).astype(np.uint8)


def to_grayscale(array: np.ndarray) -> np.ndarray:
    """``(H, W)`` or ``(H, W, 3|4)`` uint8 -> ``(H, W)`` uint8 (BT.601 luma; alpha ignored)."""
    a = np.asarray(array)
    if a.ndim == 2:
        return a
    if a.ndim == 3 and a.shape[-1] in (3, 4):
        return np.round(a[..., :3].astype(np.float64) @ _LUMA).clip(0, 255).astype(np.uint8)
    raise ValueError(f"expected an (H, W) or (H, W, 3) image, got shape {a.shape}")


def is_dicom(path: str | Path) -> bool:
    """Whether ``path`` is a DICOM file (``DICM`` after the 128-byte preamble)."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


_DEEP_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def _pil_gray(im) -> np.ndarray:
    """An open PIL image as ``(H, W)`` uint8; 16-bit, 32-bit and float modes are rescaled
    (:func:`to_uint8`), never clipped as ``convert("L")`` does."""
    if im.mode in _DEEP_MODES:
        a = np.asarray(im)
        return to_uint8(a.astype(np.uint16), 16) if im.mode.startswith("I;16") \
            else to_uint8(a.astype(np.float64))
    return np.asarray(im.convert("L"), dtype=np.uint8).copy()  # PIL's BT.601 luma


def read_grayscale(path: str | Path) -> np.ndarray:
    """An image file (PNG, JPEG, TIFF, ..., or DICOM) as ``(H, W)`` uint8.

    Raises whatever the decoder raises (callers wrap it with the file's name)."""
    if is_dicom(path):
        from echomoe.data.formats.dicom import read_dicom

        return read_dicom(path, frames=[0]).frames[0]
    from PIL import Image

    with Image.open(path) as im:
        return _pil_gray(im)


def contrast_to_noise(image: np.ndarray, mask: np.ndarray, within: np.ndarray | None = None,
                      margin: int = 3) -> float:
    """How conspicuous the structure ``mask`` is in ``image``: the contrast-to-noise ratio
    ``|mean(inside) - mean(ring)| / std(ring)``, where the ring is the background within
    ``margin`` pixels of the mask (square neighbourhood), restricted to ``within`` (e.g. the
    organ) when given.  About 1: a lesion as bright or dark as one speckle standard deviation;
    NaN when the mask or its ring (fewer than 2 pixels) is empty.

    Args:
        image: ``(H, W)`` grey levels (any numeric type).
        mask: ``(H, W)`` bool, the structure.
        within: optional ``(H, W)`` bool the ring is clipped to.
        margin: the ring's width in pixels (>= 1).
    """
    from scipy import ndimage

    image = np.asarray(image, dtype=np.float64)
    mask = np.asarray(mask)
    if image.ndim != 2 or mask.shape != image.shape:
        raise ValueError(f"image must be (H, W) and mask the same shape, got {image.shape} and "
                         f"{mask.shape}")
    if mask.dtype != bool:
        raise TypeError(f"mask must be bool, got {mask.dtype}")
    if margin < 1:
        raise ValueError(f"margin must be >= 1 pixel, got {margin}")
    ring = ndimage.binary_dilation(mask, np.ones((2 * margin + 1,) * 2, bool)) & ~mask
    if within is not None:
        within = np.asarray(within)
        if within.shape != image.shape or within.dtype != bool:
            raise ValueError(f"within must be a bool (H, W) mask like image, got "
                             f"{within.dtype} {within.shape}")
        ring &= within
    if not mask.any() or ring.sum() < 2:
        return float("nan")
    background = image[ring]
    spread = background.std()
    difference = abs(image[mask].mean() - background.mean())
    return float(difference / spread) if spread > 0 else float("inf") if difference else 0.0
