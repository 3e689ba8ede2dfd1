"""UltrasoundSample <-> HF datasets is lossless; region names are validated."""

import numpy as np
import pytest

from echomoe.data import (
    REGIONS,
    UltrasoundSample,
    UnknownRegionError,
    from_hf_dataset,
    region_index,
    to_hf_dataset,
)


def _sample(i: int) -> UltrasoundSample:
    rng = np.random.default_rng(i)
    return UltrasoundSample(
        id=f"case-{i}",
        images=[rng.integers(0, 256, (19, 23), dtype=np.uint8) for _ in range(1 + i % 3)],
        region=REGIONS[i % len(REGIONS)],
        pixel_spacing=0.1 + i / 7,
        masks={"lesion": rng.random((19, 23)) > 0.7, "organ": rng.random((19, 23)) > 0.2},
        boxes=[{"label": "lesion", "bbox": [1, 2, 10, 12]}],
        keypoints={"long_axis_start": (1.5, 2.0), "long_axis_end": (10.0, 11.25)},
        attributes={"size_long_mm": 12.3, "lesion_present": True, "grade": 2, "margin": "angular"},
        findings="A 12.3 x 8.0 mm mass.",
        impression="BI-RADS 4.",
        qa=[{"question": "Is there a lesion?", "answer": "yes", "type": "yes_no"}],
        diagnosis=None if i % 2 else "birads_4",
        source="unit",
    )


def test_round_trip_through_hf_dataset_is_lossless(tmp_path):
    samples = [_sample(i) for i in range(4)]
    dataset = to_hf_dataset(samples)
    dataset.save_to_disk(tmp_path / "ds")
    from datasets import load_from_disk

    back = from_hf_dataset(load_from_disk(tmp_path / "ds"))
    for a, b in zip(samples, back, strict=True):
        assert len(a.images) == len(b.images)
        for x, y in zip(a.images, b.images, strict=True):
            assert x.dtype == y.dtype == np.uint8 and np.array_equal(x, y)
        assert a.masks.keys() == b.masks.keys()
        for name in a.masks:
            assert b.masks[name].dtype == bool and np.array_equal(a.masks[name], b.masks[name])
        for field in ("id", "region", "boxes", "keypoints", "attributes", "findings",
                      "impression", "qa", "diagnosis", "source"):
            assert getattr(a, field) == getattr(b, field), field
        assert b.pixel_spacing == pytest.approx(a.pixel_spacing, abs=0)
    assert back[0].report == "Findings: A 12.3 x 8.0 mm mass. Impression: BI-RADS 4."


def test_region_index():
    assert [region_index(r) for r in REGIONS] == list(range(7))
    assert region_index("unknown") == -1
    with pytest.raises(UnknownRegionError, match="valid: breast"):
        region_index("brain")


def test_withhold_images_keeps_everything_but_the_pixels():
    from echomoe.data.schema import withhold_images

    samples = [_sample(i) for i in range(3)]
    blind = withhold_images(samples, value=7)
    for before, after in zip(samples, blind, strict=True):
        assert len(after.images) == len(before.images)
        for a, b in zip(after.images, before.images, strict=True):
            assert a.shape == b.shape and a.dtype == np.uint8 and (a == 7).all()
        assert after.masks is before.masks and after.qa == before.qa
        assert (after.id, after.region, after.diagnosis) == (before.id, before.region,
                                                             before.diagnosis)
    assert not (samples[0].images[0] == 7).all()  # the originals are untouched
    with pytest.raises(ValueError, match="value"):
        withhold_images(samples, value=300)
