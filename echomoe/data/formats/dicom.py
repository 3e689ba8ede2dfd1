"""DICOM ultrasound objects -> uint8 frames, physical spacing and :class:`UltrasoundSample`.

::

    from echomoe.data.formats.dicom import load_dicom, read_dicom

    image = read_dicom("scan.dcm")                  # every frame, grayscale uint8 (H, W)
    image.frames, image.pixel_spacing_mm, image.regions
    read_dicom("cine.dcm", frames=[0, 10], grayscale=False, crop_region=True)
    samples = load_dicom("exports/", region="liver", strict=False)   # a LoadResult

Decoding is :mod:`pydicom`'s, with its plugins for compressed transfer syntaxes
(``pylibjpeg`` + ``pylibjpeg-libjpeg`` for JPEG baseline / lossless, ``pylibjpeg-openjpeg``
for JPEG 2000, RLE built in).  Per photometric interpretation:

================== ==========================================================================
MONOCHROME2        the stored values rescaled from ``BitsStored`` to uint8
                   (:func:`echomoe.data.pixels.to_uint8`; signed values shifted first)
MONOCHROME1        the same, inverted (0 is white)
RGB                rescaled per channel
YBR_FULL(_422),    converted to RGB (pydicom's colour-space conversion; JPEG 2000 decoders
YBR_RCT / YBR_ICT  undo the RCT / ICT themselves), then rescaled
PALETTE COLOR      the palette applied (8- or 16-bit entries), rescaled from the entry depth
================== ==========================================================================

``grayscale=True`` (the default) then takes the BT.601 luma of colour frames, which leaves
gray B-mode pixels (R = G = B) unchanged; colour overlays (Doppler, annotations) become gray.
Multi-frame objects (cine loops) give one array per frame, in order.

**Spacing.**  The Sequence of Ultrasound Regions (0018,6011) describes each region of the
frame; the first 2-D region (Region Spatial Format 1) whose Physical Units X and Y are cm gives
:attr:`DicomImage.pixel_spacing_mm` = ``10 * (Physical Delta X, Physical Delta Y)``; without
one, Pixel Spacing (0028,0030) is used (mm, row then column); otherwise ``None``.
``crop_region=True`` crops every frame to that region's bounding box (inclusive Min / Max
coordinates), dropping the scanner's annotations and calipers around the image.

Errors are :class:`~echomoe.data.formats.errors.CorruptImageError` naming the file: not DICOM,
no pixel data (a structured report, a presentation state), a transfer syntax no installed
plugin decodes (the message names the plugins), an unsupported photometric interpretation, or
``crop_region`` without a 2-D region.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from echomoe.data.formats.errors import (
    CorruptImageError,
    FormatError,
    LoadResult,
    MissingImageError,
    SkippedRecord,
    check_region,
)
from echomoe.data.pixels import is_dicom, to_grayscale, to_uint8
from echomoe.data.schema import UltrasoundSample

__all__ = ["DicomImage", "UltrasoundRegion", "find_dicom_files", "load_dicom", "read_dicom"]

_CM = 3  # Physical Units code of centimetres (PS3.3 C.8.5.5.1.15)
_SPATIAL_2D = 1  # Region Spatial Format: 2-D (tissue or flow)
_PLUGINS = ("pylibjpeg, pylibjpeg-libjpeg (JPEG baseline / lossless), pylibjpeg-openjpeg "
            "(JPEG 2000)")


@dataclass(frozen=True)
class UltrasoundRegion:
    """One item of the Sequence of Ultrasound Regions.

    Attributes:
        bbox: ``(x0, y0, x1, y1)`` inclusive pixel bounds (Region Location Min / Max).
        spacing_mm: ``(x, y)`` millimetres per pixel when both physical units are cm, else
            ``None``.
        spatial_format: Region Spatial Format (0 none, 1 2-D, 2 M-mode, 3 spectral, ...).
        data_type: Region Data Type (1 tissue, 2 colour flow, ...).
    """

    bbox: tuple[int, int, int, int]
    spacing_mm: tuple[float, float] | None
    spatial_format: int
    data_type: int


@dataclass
class DicomImage:
    """A decoded DICOM object: uint8 frames plus what locates them physically.

    Attributes:
        path: the file.
        frames: ``(H, W)`` (grayscale) or ``(H, W, 3)`` uint8 arrays, one per selected frame.
        pixel_spacing_mm: ``(x, y)`` millimetres per pixel, or ``None`` (see the module doc).
        regions: every ultrasound region of the object.
        photometric: the file's Photometric Interpretation.
        bits_stored: its Bits Stored.
        num_frames: the object's frame count (before ``frames`` selected some).
        crop: the ``(x0, y0, x1, y1)`` box the frames were cropped to, or ``None``.
    """

    path: str
    frames: list[np.ndarray]
    pixel_spacing_mm: tuple[float, float] | None
    regions: list[UltrasoundRegion] = field(default_factory=list)
    photometric: str = ""
    bits_stored: int = 8
    num_frames: int = 1
    crop: tuple[int, int, int, int] | None = None


def _regions(ds) -> list[UltrasoundRegion]:
    out = []
    for item in ds.get("SequenceOfUltrasoundRegions") or []:
        units = (item.get("PhysicalUnitsXDirection"), item.get("PhysicalUnitsYDirection"))
        dx, dy = item.get("PhysicalDeltaX"), item.get("PhysicalDeltaY")
        spacing = (10.0 * float(dx), 10.0 * float(dy)) if units == (_CM, _CM) and dx and dy \
            and float(dx) > 0 and float(dy) > 0 else None
        bbox = tuple(int(item.get(k, 0)) for k in ("RegionLocationMinX0", "RegionLocationMinY0",
                                                   "RegionLocationMaxX1", "RegionLocationMaxY1"))
        out.append(UltrasoundRegion(bbox, spacing, int(item.get("RegionSpatialFormat", 0)),
                                    int(item.get("RegionDataType", 0))))
    return out


def _tissue_region(regions: Sequence[UltrasoundRegion]) -> UltrasoundRegion | None:
    """The first 2-D region with a physical spacing (the B-mode image), else the first 2-D."""
    two_d = [r for r in regions if r.spatial_format == _SPATIAL_2D]
    return next((r for r in two_d if r.spacing_mm), two_d[0] if two_d else None)


def _spacing(ds, region: UltrasoundRegion | None) -> tuple[float, float] | None:
    if region is not None and region.spacing_mm:
        return region.spacing_mm
    spacing = ds.get("PixelSpacing")
    if spacing is not None and len(spacing) == 2 and all(float(v) > 0 for v in spacing):
        return float(spacing[1]), float(spacing[0])  # (row, column) -> (x, y)
    return None


def _decode(ds, path: Path) -> np.ndarray:
    """All frames as ``(N, H, W)`` or ``(N, H, W, 3)`` stored values (YBR -> RGB)."""
    try:
        array = ds.pixel_array
    except Exception as err:  # pydicom: RuntimeError / NotImplementedError / ValueError
        syntax = ds.file_meta.get("TransferSyntaxUID")
        name = getattr(syntax, "name", str(syntax))
        raise CorruptImageError(f"cannot decode the pixel data of {str(path)!r} "
                                f"(transfer syntax {name}; plugins: {_PLUGINS}): "
                                f"{type(err).__name__}: {err}") from err
    frames = int(ds.get("NumberOfFrames") or 1)
    samples = int(ds.get("SamplesPerPixel") or 1)
    if frames == 1:
        array = array[None]
    if array.ndim != (4 if samples == 3 else 3):
        raise CorruptImageError(f"{str(path)!r}: pixel data of shape {array.shape} does not "
                                f"match {frames} frame(s) of {samples} sample(s) per pixel")
    return array


def _to_uint8(ds, array: np.ndarray, photometric: str, path: Path) -> np.ndarray:
    bits = int(ds.get("BitsStored") or array.dtype.itemsize * 8)
    signed = int(ds.get("PixelRepresentation") or 0) == 1
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        rgb = apply_color_lut(array, ds)
        entry_bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
        return to_uint8(rgb, entry_bits)
    if photometric in ("MONOCHROME1", "MONOCHROME2", "RGB") or photometric.startswith("YBR"):
        out = to_uint8(array, bits, signed=signed)
        return 255 - out if photometric == "MONOCHROME1" else out
    raise CorruptImageError(f"{str(path)!r}: photometric interpretation {photometric!r} is not "
                            "supported (MONOCHROME1/2, RGB, YBR_*, PALETTE COLOR are)")


def read_dicom(path: str | Path, *, grayscale: bool = True,
               frames: Sequence[int] | None = None, crop_region: bool = False) -> DicomImage:
    """Decode a DICOM file (see the module docstring).

    Args:
        path: the ``.dcm`` file (any extension).
        grayscale: ``(H, W)`` frames (BT.601 luma) instead of ``(H, W, 3)`` for colour objects.
        frames: indices of the frames to keep (negative counts from the end); ``None``: all.
        crop_region: crop to the bounding box of the 2-D ultrasound region.

    Raises:
        MissingImageError: ``path`` does not exist.
        CorruptImageError: not DICOM, not an image, not decodable, or nothing to crop to.
        IndexError: a frame index out of range (the message names the file).
    """
    import pydicom

    path = Path(path)
    if not path.is_file():
        kind = "is a broken or looping symlink" if path.is_symlink() else "does not exist"
        raise MissingImageError(f"DICOM file {str(path)!r} {kind}")
    try:
        ds = pydicom.dcmread(path, force=is_dicom(path))
    except Exception as err:
        raise CorruptImageError(f"{str(path)!r} is not a readable DICOM file "
                                f"({type(err).__name__}: {err})") from err
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        sop = ds.get("SOPClassUID")
        raise CorruptImageError(f"{str(path)!r} has no pixel data: it is not an image "
                                f"(SOP class {getattr(sop, 'name', sop)})")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    stored = _decode(ds, path)
    count = len(stored)
    if frames is not None:
        bad = [i for i in frames if not -count <= i < count]
        if bad:
            raise IndexError(f"{str(path)!r} has {count} frame(s); no frame {bad[0]}")
        stored = stored[list(frames)]
    pixels = _to_uint8(ds, stored, photometric, path)
    regions = _regions(ds)
    tissue = _tissue_region(regions)
    crop = None
    if crop_region:
        if tissue is None:
            raise CorruptImageError(f"{str(path)!r}: crop_region=True but the object has no "
                                    "2-D ultrasound region (Sequence of Ultrasound Regions)")
        x0, y0, x1, y1 = tissue.bbox
        h, w = pixels.shape[1:3]
        crop = (max(x0, 0), max(y0, 0), min(x1, w - 1), min(y1, h - 1))
        if crop[0] > crop[2] or crop[1] > crop[3]:
            raise CorruptImageError(f"{str(path)!r}: region box {tissue.bbox} lies outside the "
                                    f"{w}x{h} frame")
        pixels = pixels[:, crop[1]: crop[3] + 1, crop[0]: crop[2] + 1]
    out = [to_grayscale(f) if grayscale else np.ascontiguousarray(f) for f in pixels]
    return DicomImage(str(path), out, _spacing(ds, tissue), regions, photometric,
                      int(ds.get("BitsStored") or 8), count, crop)


def find_dicom_files(root: str | Path) -> list[Path]:
    """``root`` itself if it is a file, else every DICOM file below it (by the ``DICM``
    preamble, any extension) and every broken symlink (so loading reports it), sorted."""
    root = Path(root)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise MissingImageError(f"DICOM source {str(root)!r} does not exist")
    broken = [p for p in root.rglob("*") if p.is_symlink() and not p.exists()]
    return sorted([p for p in root.rglob("*") if p.is_file() and is_dicom(p)] + broken)


def load_dicom(source: str | Path | Sequence[str | Path], *, region: str | None = None,
               diagnosis: str | None = None, crop_region: bool = False,
               strict: bool = True) -> LoadResult:
    """DICOM files -> one :class:`UltrasoundSample` per file (every frame an image).

    Args:
        source: a file, a folder (searched recursively by :func:`find_dicom_files`) or a list
            of files.
        region: the anatomical region of every file (DICOM carries none reliably), checked
            against the region list; ``None``: ``"unknown"``.
        diagnosis: a diagnosis label for every file, or ``None``.
        crop_region: crop to the 2-D ultrasound region (files without one are errors).
        strict: raise the first bad file, or skip it and list it in ``skipped``.

    The sample id is the file's path relative to the folder (or its name); ``pixel_spacing``
    is the horizontal spacing in mm (``None`` when unknown); ``source`` is ``"dicom"``.
    """
    region = check_region(region)
    if isinstance(source, (str, Path)):
        root = Path(source)
        files = find_dicom_files(root)
        base = root if root.is_dir() else root.parent
    else:
        files, base = [Path(p) for p in source], None
    result = LoadResult()
    for path in files:
        name = str(path.relative_to(base)) if base is not None else path.name
        try:
            image = read_dicom(path, crop_region=crop_region)
        except FormatError as err:
            if strict:
                raise
            result.skipped.append(SkippedRecord.from_error(err.locate(path, name)))
            continue
        spacing = image.pixel_spacing_mm[0] if image.pixel_spacing_mm else None
        result.samples.append(UltrasoundSample(
            id=name, images=image.frames, region=region, pixel_spacing=spacing,
            diagnosis=diagnosis, source="dicom"))
    return result.warn_if_empty(source, "DICOM files")
