"""One sample schema for every ultrasound source, and its lossless HF ``datasets`` form.

Every loader (synthetic phantom, EchoVLM JSON, BUSI, FM_UIA, HC18, JSONL) produces
:class:`UltrasoundSample`; task builders turn a sample into prompt/target pairs.  Pixel labels
(masks, boxes, keypoints) refer to the first image (``images[0]``), the key frame.

Coordinates are pixels with the origin at the top-left corner, ``x`` to the right, ``y`` down;
boxes are ``(x_min, y_min, x_max, y_max)`` with inclusive pixel indices of the mask's extreme
pixels.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

REGIONS: tuple[str, ...] = (
    "breast",
    "gynaecology",
    "heart",
    "kidney",
    "liver",
    "thyroid",
    "vessel",
)
"""The seven EchoVLM anatomical regions; a region's index is its routing id."""


class UnknownRegionError(ValueError):
    """A region name that is not in the region list in use."""


def region_index(name: str, regions: tuple[str, ...] = REGIONS) -> int:
    """Routing id of region ``name`` (``-1`` for ``"unknown"``); raises on anything else."""
    if name == "unknown":
        return -1
    try:
        return regions.index(name)
    except ValueError:
        raise UnknownRegionError(
            f"unknown region {name!r}; valid: {', '.join(regions)} (or 'unknown')"
        ) from None


@dataclass
class UltrasoundSample:
    """One ultrasound case with every label a task may need.

    Attributes:
        id: unique id within its source.
        images: one or more ``(H, W)`` uint8 arrays, or paths to image files.
        region: one of :data:`REGIONS` or ``"unknown"``.
        pixel_spacing: millimetres per pixel (``None`` if unknown).
        masks: named boolean ``(H, W)`` masks, e.g. ``{"lesion": ..., "organ": ...}``.
        boxes: ``[{"label": str, "bbox": [x_min, y_min, x_max, y_max]}]`` in pixels.
        keypoints: named ``(x, y)`` points in pixels, e.g. caliper endpoints.
        attributes: structured findings (str / int / float / bool values).
        findings: the report's findings section.
        impression: the report's impression section.
        qa: ``[{"question", "answer", "type"}]`` VQA pairs.
        diagnosis: diagnosis label (``None`` if unknown).
        source: dataset the sample came from.
    """

    id: str
    images: list[Any]
    region: str = "unknown"
    pixel_spacing: float | None = None
    masks: dict[str, np.ndarray] = field(default_factory=dict)
    boxes: list[dict[str, Any]] = field(default_factory=list)
    keypoints: dict[str, tuple[float, float]] = field(default_factory=dict)
    attributes: dict[str, Any] = field(default_factory=dict)
    findings: str = ""
    impression: str = ""
    qa: list[dict[str, str]] = field(default_factory=list)
    diagnosis: str | None = None
    source: str = ""

    @property
    def report(self) -> str:
        """``"Findings: ... Impression: ..."`` (sections that exist only)."""
        parts = []
        if self.findings:
            parts.append(f"Findings: {self.findings}")
        if self.impression:
            parts.append(f"Impression: {self.impression}")
        return " ".join(parts)

    @property
    def region_id(self) -> int:
        """Index of :attr:`region` in :data:`REGIONS` (``-1`` for ``"unknown"``)."""
        return region_index(self.region)

    def image_array(self, i: int = 0) -> np.ndarray:
        """Image ``i`` as an ``(H, W)`` uint8 array (loaded from disk if it is a path)."""
        image = self.images[i]
        if isinstance(image, np.ndarray):
            return image
        return load_grayscale(image)


def withhold_images(samples: list[UltrasoundSample], value: int = 0) -> list[UltrasoundSample]:
    """Copies of ``samples`` whose images are all replaced by a constant ``value`` (uint8) of
    the same size; labels, text and region are kept.  A model trained and evaluated on these
    is the *blind* baseline: what it scores comes from the prompt and the label statistics,
    not from the image."""
    if not 0 <= value <= 255:
        raise ValueError(f"value must be in [0, 255], got {value}")
    blind = []
    for sample in samples:
        images = [np.full(sample.image_array(i).shape[:2], value, dtype=np.uint8)
                  for i in range(len(sample.images))]
        blind.append(replace(sample, images=images))
    return blind


def load_grayscale(path: str | Path) -> np.ndarray:
    """Read an image file (any PIL format, or DICOM: its first frame) as ``(H, W)`` uint8,
    deeper pixels rescaled, not clipped (:mod:`echomoe.data.pixels`); the error names the
    file."""
    from echomoe.data.pixels import read_grayscale

    try:
        return read_grayscale(path)
    except (OSError, ValueError, RuntimeError, NotImplementedError) as err:
        raise ValueError(f"{path}: cannot read image ({err})") from err


def _features():
    from datasets import Features, Image, Sequence, Value

    return Features({
        "id": Value("string"),
        "images": Sequence(Image()),
        "region": Value("string"),
        "pixel_spacing": Value("float64"),
        "mask_names": Sequence(Value("string")),
        "masks": Sequence(Image()),
        "boxes": Value("string"),
        "keypoints": Value("string"),
        "attributes": Value("string"),
        "findings": Value("string"),
        "impression": Value("string"),
        "qa": Value("string"),
        "diagnosis": Value("string"),
        "source": Value("string"),
    })


def _to_pil(array: np.ndarray):
    from PIL import Image

    if array.dtype == bool:
        return Image.fromarray(array.astype(np.uint8) * 255, mode="L")
    return Image.fromarray(array.astype(np.uint8), mode="L")


def sample_to_record(sample: UltrasoundSample) -> dict[str, Any]:
    """A row of the HF dataset (images and masks as PIL; structured fields as JSON)."""
    images = [
        _to_pil(im) if isinstance(im, np.ndarray) else {"path": str(im), "bytes": None}
        for im in sample.images
    ]
    return {
        "id": sample.id,
        "images": images,
        "region": sample.region,
        "pixel_spacing": sample.pixel_spacing,
        "mask_names": list(sample.masks),
        "masks": [_to_pil(np.asarray(m, dtype=bool)) for m in sample.masks.values()],
        "boxes": json.dumps(sample.boxes),
        "keypoints": json.dumps({k: list(v) for k, v in sample.keypoints.items()}),
        "attributes": json.dumps(sample.attributes),
        "findings": sample.findings,
        "impression": sample.impression,
        "qa": json.dumps(sample.qa),
        "diagnosis": sample.diagnosis,
        "source": sample.source,
    }


def record_to_sample(record: dict[str, Any]) -> UltrasoundSample:
    """Inverse of :func:`sample_to_record` (decoded HF row -> sample)."""
    images = [np.asarray(im.convert("L"), dtype=np.uint8) for im in record["images"]]
    masks = {
        name: np.asarray(m.convert("L")) > 127
        for name, m in zip(record["mask_names"], record["masks"], strict=True)
    }
    return UltrasoundSample(
        id=record["id"],
        images=images,
        region=record["region"],
        pixel_spacing=record["pixel_spacing"],
        masks=masks,
        boxes=json.loads(record["boxes"]),
        keypoints={k: tuple(v) for k, v in json.loads(record["keypoints"]).items()},
        attributes=json.loads(record["attributes"]),
        findings=record["findings"],
        impression=record["impression"],
        qa=json.loads(record["qa"]),
        diagnosis=record["diagnosis"],
        source=record["source"],
    )


def to_hf_dataset(samples: list[UltrasoundSample]):
    """A ``datasets.Dataset`` with ``Image`` features; lossless (see :func:`from_hf_dataset`).
    An empty list gives an empty dataset with the same features (so it saves and loads)."""
    from datasets import Dataset

    features = _features()
    if not samples:
        return Dataset.from_dict({name: [] for name in features}, features=features)
    return Dataset.from_list([sample_to_record(s) for s in samples], features=features)


def from_hf_dataset(dataset) -> list[UltrasoundSample]:
    """Samples back from a dataset made by :func:`to_hf_dataset`."""
    return [record_to_sample(row) for row in dataset]
