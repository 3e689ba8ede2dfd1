"""Ultrasound data: one sample schema, the synthetic benchmark, real formats, task formatting."""

from echomoe.data.schema import (
    REGIONS,
    UltrasoundSample,
    UnknownRegionError,
    from_hf_dataset,
    region_index,
    to_hf_dataset,
)

__all__ = [
    "REGIONS",
    "UltrasoundSample",
    "UnknownRegionError",
    "from_hf_dataset",
    "region_index",
    "to_hf_dataset",
]
