"""``echomoe.utils.sizes.image_hw`` and the vision-kind helpers every module shares."""

from __future__ import annotations

import numpy as np
import pytest

from echomoe.models.backbone import VISION_KINDS, vision_patch_size
from echomoe.utils.sizes import image_hw


@pytest.mark.parametrize("size, expected", [(64, (64, 64)), ((48, 80), (48, 80)),
                                            ([33, 17], (33, 17)), (np.int64(20), (20, 20)),
                                            ((np.int32(8), 12), (8, 12))])
def test_image_hw_normalises(size, expected):
    assert image_hw(size) == expected
    assert all(type(v) is int for v in image_hw(size))


@pytest.mark.parametrize("size", [0, -3, (0, 8), (8,), (8, 8, 8), "64", 64.0, True, (8.5, 8),
                                  None])
def test_image_hw_refuses_and_names_the_field(size):
    with pytest.raises(ValueError, match="patch_size"):
        image_hw(size, "patch_size")


@pytest.mark.parametrize("spec, patch", [({"kind": "native", "patch_size": 8}, 8),
                                         ({"patch_size": (4, 4)}, 4),
                                         ({"kind": "siglip", "config": {"patch_size": 14}}, 14),
                                         ({"kind": "clip", "config": {"patch_size": 7}}, 7),
                                         ({"kind": "dinov2", "config": {"patch_size": 6}}, 6),
                                         ({"kind": "convnet", "widths": [8, 8, 16]}, 8),
                                         ({"kind": "convnet"}, 16)])
def test_vision_patch_size_reads_every_kind(spec, patch):
    assert vision_patch_size(spec) == patch


def test_vision_kinds_are_checked_in_one_place():
    assert VISION_KINDS == ("native", "convnet", "pretrained", "siglip", "clip", "dinov2",
                            "backbone")
    with pytest.raises(ValueError, match="unknown vision_config kind 'vit'.*native, convnet"):
        vision_patch_size({"kind": "vit"})
    with pytest.raises(ValueError, match="backbone"):
        vision_patch_size({"kind": "backbone"})
