"""Errors, the load report, and the checked file readers shared by the format loaders.

Every loader returns a :class:`LoadResult`.  A bad record raises a subclass of
:class:`FormatError` whose message names the file and the record (id and/or line number).
With ``strict=False`` the loader catches it, keeps going and lists the record in
:attr:`LoadResult.skipped` -- nothing is dropped silently.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from echomoe.data.pixels import is_dicom, read_grayscale
from echomoe.data.schema import REGIONS, UltrasoundSample, UnknownRegionError


class FormatError(ValueError):
    """A record (or file) that does not follow its format.

    Attributes:
        reason: what is wrong, without the location.
        file: the file the record came from (``None`` until located).
        record: the record's id (or another name for it), if known.
        line: 1-based line number in ``file``, if the format has lines.
    """

    def __init__(
        self,
        reason: str,
        *,
        file: str | Path | None = None,
        record: str | None = None,
        line: int | None = None,
    ) -> None:
        self.reason = reason
        self.file = None if file is None else str(file)
        self.record = record
        self.line = line
        super().__init__(self._message())

    def _message(self) -> str:
        where = self.file or "<unknown file>"
        if self.line is not None:
            where += f":{self.line}"
        if self.record is not None:
            where += f": record {self.record!r}"
        return f"{where}: {self.reason}"

    def locate(
        self, file: str | Path | None, record: str | None = None, line: int | None = None
    ) -> FormatError:
        """Fill in the location fields that are still unknown (returns ``self``)."""
        if self.file is None and file is not None:
            self.file = str(file)
        if self.record is None:
            self.record = record
        if self.line is None:
            self.line = line
        self.args = (self._message(),)
        return self

    def __reduce__(self):
        kwargs = {"file": self.file, "record": self.record, "line": self.line}
        return (_rebuild, (type(self), self.reason, kwargs))


def _rebuild(cls: type[FormatError], reason: str, kwargs: dict[str, Any]) -> FormatError:
    return cls(reason, **kwargs)


class CorruptImageError(FormatError):
    """An image file that cannot be read or decoded."""


class MissingImageError(CorruptImageError):
    """An image path that does not exist."""


class MissingMaskError(FormatError):
    """A mask or annotation file that a record needs but that does not exist."""


class MaskSizeMismatchError(FormatError):
    """A mask whose size differs from its image's."""


class MaskLabelError(FormatError):
    """A label mask with values outside ``0 .. num_classes - 1`` or no annotation in it."""


class ImageTagMismatchError(FormatError):
    """A conversation whose number of ``<image>`` tags differs from its number of images."""


class MissingFieldError(FormatError):
    """A required field, column or key that is absent or empty."""


class UnknownFieldError(FormatError):
    """A key that the format does not define."""


class InvalidValueError(FormatError):
    """A field whose value has the wrong type or cannot be parsed."""


class MalformedRecordError(FormatError):
    """A line or file that is not valid JSON / of the expected structure."""


class DuplicateIdError(FormatError):
    """A record id that already occurred earlier in the same source."""


class RegionError(FormatError, UnknownRegionError):
    """A region that is not in :data:`~echomoe.data.schema.REGIONS` (nor ``"unknown"``).

    Also an :class:`~echomoe.data.schema.UnknownRegionError`, so either can be caught.
    """


@dataclass(frozen=True)
class SkippedRecord:
    """A record that a non-strict load left out, and why."""

    file: str
    record: str | None
    line: int | None
    reason: str
    error: str  # the exception class name, e.g. "MissingMaskError"

    @classmethod
    def from_error(cls, err: FormatError) -> SkippedRecord:
        """The skip entry for a (located) :class:`FormatError`."""
        return cls(err.file or "", err.record, err.line, err.reason, type(err).__name__)

    def __str__(self) -> str:
        where = self.file + (f":{self.line}" if self.line is not None else "")
        if self.record is not None:
            where += f": record {self.record!r}"
        return f"{where}: {self.error}: {self.reason}"


@dataclass
class LoadResult:
    """What a loader returns: the samples, and the records it skipped (``strict=False``).

    Iterating, ``len`` and indexing go over :attr:`samples`.
    """

    samples: list[UltrasoundSample] = field(default_factory=list)
    skipped: list[SkippedRecord] = field(default_factory=list)

    def __iter__(self) -> Iterator[UltrasoundSample]:
        return iter(self.samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i):
        return self.samples[i]

    def warn_if_empty(self, source: str | Path, what: str = "records") -> LoadResult:
        """Warn (naming ``source``) when nothing was loaded or skipped: an empty folder or a
        wrong path is reported, not returned as a silently empty dataset.  Returns ``self``."""
        if not self.samples and not self.skipped:
            import warnings

            warnings.warn(f"{source}: no {what} found", stacklevel=3)
        return self

    def summary(self) -> str:
        """One line per skipped record after a count line."""
        lines = [f"loaded {len(self.samples)} samples, skipped {len(self.skipped)}"]
        lines += [f"  {s}" for s in self.skipped]
        return "\n".join(lines)

    def to_dataset(self):
        """The samples as an HF ``datasets.Dataset`` (see :func:`~echomoe.data.to_hf_dataset`)."""
        from echomoe.data.schema import to_hf_dataset

        return to_hf_dataset(self.samples)

    @contextlib.contextmanager
    def guard(
        self, strict: bool, file: str | Path, record: str | None = None, line: int | None = None
    ) -> Iterator[None]:
        """Run one record's parsing: a :class:`FormatError` inside is located at
        ``file``/``record``/``line``, then re-raised (``strict``) or listed in :attr:`skipped`."""
        try:
            yield
        except FormatError as err:
            err.locate(file, record, line)
            if strict:
                raise
            self.skipped.append(SkippedRecord.from_error(err))


# ---------------------------------------------------------------------------------------------
# checked readers (raise FormatError subclasses without location; LoadResult.guard adds it)

_REGION_ALIASES = {
    "gynecology": "gynaecology",
    "obstetrics": "gynaecology",
    "ob/gyn": "gynaecology",
    "obgyn": "gynaecology",
    "fetal": "gynaecology",
    "cardiac": "heart",
    "vascular": "vessel",
    "renal": "kidney",
    "hepatic": "liver",
}


def csv_rows(reader: Iterator[Any], path: str | Path) -> Iterator[Any]:
    """The rows of a ``csv`` reader, with its failures as :class:`MalformedRecordError` naming
    the file and line: a field over ``csv.field_size_limit()``, a NUL byte, bytes that are not
    UTF-8.  (The rows read before it are kept.)"""
    import csv

    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except (csv.Error, UnicodeDecodeError) as err:
            done = getattr(reader, "line_num", None)  # lines of the records parsed so far
            line = None if done is None else done + 1
            raise MalformedRecordError(f"unreadable CSV ({type(err).__name__}: {err})",
                                       file=path, line=line) from err
        yield row


def check_region(name: Any) -> str:
    """``name`` normalised (case, spaces, a few aliases) and checked against the region list."""
    if name is None:
        return "unknown"
    if not isinstance(name, str):
        raise RegionError(f"region must be a string, got {name!r}")
    norm = name.strip().lower()
    norm = _REGION_ALIASES.get(norm, norm)
    if norm != "unknown" and norm not in REGIONS:
        raise RegionError(f"unknown region {name!r}; valid: {', '.join(REGIONS)} (or 'unknown')")
    return norm


def _absent(path: Path, what: str, error: type[FormatError] = None) -> FormatError:
    """The error for a file that is not there: a broken or looping symlink is named as one."""
    error = error or MissingImageError
    if path.is_symlink():
        return error(f"{what} file {str(path)!r} is a broken or looping symlink")
    return error(f"{what} file {str(path)!r} does not exist")


def _open_error(path: Path, what: str, err: Exception) -> CorruptImageError:
    return CorruptImageError(f"cannot read {what} {str(path)!r} ({type(err).__name__}: {err})")


def verify_image(path: Path, what: str = "image") -> tuple[int, int]:
    """Check that ``path`` exists and decodes completely (any PIL format, or DICOM); return
    its ``(width, height)``.  The pixels are decoded once here, so a file with a valid header
    but corrupt or truncated data fails at load, naming the file, not later in training."""
    from PIL import Image

    if not path.is_file():
        raise _absent(path, what)
    if is_dicom(path):
        return _dicom_size(path, what)
    try:
        with Image.open(path) as im:
            size = im.size
            im.verify()
        with Image.open(path) as im:
            im.load()
    except Exception as err:  # PIL raises OSError, SyntaxError, struct.error, ...
        raise _open_error(path, what, err) from err
    return size


def _dicom_size(path: Path, what: str) -> tuple[int, int]:
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        return int(ds.Columns), int(ds.Rows)
    except Exception as err:  # InvalidDicomError, a missing Rows / Columns, ...
        raise _open_error(path, what, err) from err


def read_image(path: Path, what: str = "image", mode: str = "L") -> np.ndarray:
    """``path`` decoded as a uint8 array (grayscale ``(H, W)`` for ``mode="L"``): any PIL
    format or DICOM (its first frame), deeper pixels rescaled to uint8, never clipped
    (:mod:`echomoe.data.pixels`).  ``mode="label"``: integer label maps keep their values."""
    from PIL import Image

    if not path.is_file():
        raise _absent(path, what)
    try:
        if mode == "label" and not is_dicom(path):
            with Image.open(path) as im:
                if im.mode in ("L", "P", "I", "I;16", "1"):
                    return np.asarray(im).astype(np.int64)
        return read_grayscale(path)
    except FormatError:
        raise
    except Exception as err:  # PIL raises OSError, SyntaxError, struct.error, ...
        raise _open_error(path, what, err) from err


def read_mask(path: Path, shape: tuple[int, int], what: str = "mask") -> np.ndarray:
    """A binary mask file (any non-zero pixel is foreground), checked against ``shape``.

    A mask with transparency (RGBA, LA, or a palette with a transparent entry) whose alpha
    varies is read from its alpha channel (foreground = not fully transparent): annotation
    tools often export the mask as alpha over black, which a gray conversion would read as
    empty.  An opaque one is read from its gray values; a 16- or 32-bit one from its raw
    values (not the rescaled ones of :func:`read_image`)."""
    from PIL import Image

    if not path.is_file():
        raise _absent(path, what, MissingMaskError)
    if is_dicom(path):
        mask = read_image(path, what) > 0
    else:
        try:
            with Image.open(path) as im:
                mask = _pil_mask(im)
        except Exception as err:  # PIL raises OSError, SyntaxError, ...
            raise _open_error(path, what, err) from err
    check_mask_shape(mask.shape, shape, path)
    return mask


def _pil_mask(im) -> np.ndarray:
    """Foreground of an open PIL mask (see :func:`read_mask`): the varying alpha channel of a
    transparent one, the raw non-zero values of a 16 / 32-bit integer one (a label of 1 must
    not be rescaled to 0), else the non-zero gray values."""
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        alpha = np.asarray(im.convert("RGBA"))[..., 3]
        if alpha.min() != alpha.max():
            return alpha > 0
    if im.mode.startswith("I"):
        return np.asarray(im) != 0
    return np.asarray(im.convert("L")) > 0


def check_mask_shape(mask_shape: tuple[int, ...], shape: tuple[int, ...], path: Path) -> None:
    """Raise :class:`MaskSizeMismatchError` unless ``mask_shape == shape`` (both ``(H, W)``)."""
    if tuple(mask_shape) != tuple(shape):
        raise MaskSizeMismatchError(
            f"mask {str(path)!r} is {mask_shape[1]}x{mask_shape[0]} (WxH) but its image is "
            f"{shape[1]}x{shape[0]}"
        )


def check_box(bbox: list[float], size: tuple[int, int], name: str) -> None:
    """Refuse a box ``[x_min, y_min, x_max, y_max]`` (inclusive pixel indices) that leaves the
    ``size = (width, height)`` image: :class:`InvalidValueError` naming ``name``."""
    w, h = size
    if bbox[0] < 0 or bbox[1] < 0 or bbox[2] > w - 1 or bbox[3] > h - 1:
        raise InvalidValueError(f"{name} {list(bbox)} lies outside the {w}x{h} image "
                                f"(inclusive pixel indices 0..{w - 1}, 0..{h - 1})")


def check_point(point: tuple[float, float], size: tuple[int, int], name: str) -> None:
    """Refuse a point ``(x, y)`` in pixels (pixel centres at integers) outside the image."""
    x, y = point
    if not (-0.5 <= x <= size[0] - 0.5 and -0.5 <= y <= size[1] - 0.5):
        raise InvalidValueError(f"{name} ({x}, {y}) lies outside the {size[0]}x{size[1]} image")


def mask_bbox(mask: np.ndarray) -> list[int] | None:
    """``[x_min, y_min, x_max, y_max]`` (inclusive) of an ``(H, W)`` mask; ``None`` if empty."""
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    if ys.size == 0:
        return None
    return [int(xs[0]), int(ys[0]), int(xs[-1]), int(ys[-1])]


def to_float(value: Any, name: str, *, positive: bool = False) -> float:
    """``value`` as a finite float (``positive``: > 0), else :class:`InvalidValueError`."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise InvalidValueError(f"{name} must be a number, got {value!r}") from None
    if isinstance(value, bool) or not np.isfinite(out) or (positive and out <= 0):
        kind = "a positive number" if positive else "a finite number"
        raise InvalidValueError(f"{name} must be {kind}, got {value!r}")
    return out


_POINT_SPLIT = re.compile(r"[,\s;]+")


def parse_point(value: Any, name: str) -> tuple[float, float]:
    """A point from ``"x,y"``, ``"x y"`` or a 2-sequence of numbers."""
    if isinstance(value, str):
        parts = [p for p in _POINT_SPLIT.split(value.strip().strip("()[]")) if p]
    elif isinstance(value, (list, tuple)):
        parts = list(value)
    else:
        parts = []
    if len(parts) != 2:
        raise InvalidValueError(f"{name} must be a point 'x,y', got {value!r}")
    return (to_float(parts[0], f"{name}.x"), to_float(parts[1], f"{name}.y"))
