from __future__ import annotations

import numpy as np
import pytest

from echomoe.grounding.calipers import (
    CALIPER_NAMES,
    calipers_near,
    mask_calipers,
    nearest_component,
)


def _length(points, a, b):
    return float(np.hypot(*(np.subtract(points[b], points[a]))))


def test_mask_calipers_span_the_outer_pixel_edges():
    bar = np.zeros((9, 12), dtype=bool)
    bar[4, 2:9] = True  # 7 px long, 1 px thick
    cal = mask_calipers(bar)
    assert list(cal) == list(CALIPER_NAMES)
    assert cal["long_axis_start"] == pytest.approx((1.5, 4.0))
    assert cal["long_axis_end"] == pytest.approx((8.5, 4.0))
    assert _length(cal, "short_axis_start", "short_axis_end") == pytest.approx(1.0)
    # a 5 x 3 ellipse-like blob: long axis along x, short axis 3 rows
    blob = np.zeros((11, 13), dtype=bool)
    blob[4:7, 3:10] = True
    blob[[4, 6], 3] = blob[[4, 6], 9] = False
    cal = mask_calipers(blob)
    assert _length(cal, "long_axis_start", "long_axis_end") > 6.5
    assert _length(cal, "short_axis_start", "short_axis_end") == pytest.approx(3.0, abs=0.2)
    with pytest.raises(ValueError, match="non-empty"):
        mask_calipers(np.zeros((4, 4), dtype=bool))


def test_calipers_near_measure_the_component_by_the_points_in_image_pixels():
    mask = np.zeros((16, 16), dtype=bool)
    mask[2, 1:4] = True             # a 3 px blob on the left
    mask[10:12, 8:14] = True        # a 6 x 2 blob on the right (the one asked about)
    assert nearest_component(np.zeros((3, 3), bool), np.array([1.0, 1.0])) is None
    right = nearest_component(mask, np.array([15.0, 15.0]))
    assert right.sum() == 12 and not right[2].any()
    # diagonal neighbours belong to one component (8-connectivity)
    diag = np.eye(4, dtype=bool)
    assert nearest_component(diag, np.array([0.0, 0.0])).sum() == 4
    # the head's points near the right blob, in a 2x larger image: lengths double
    head = np.array([[17.0, 21.0], [27.0, 21.0], [22.0, 20.0], [22.0, 23.0]])
    cal = calipers_near(mask, head, scale=(2.0, 2.0))
    assert cal.shape == (4, 2)
    ref = np.asarray(list(mask_calipers(right).values()))
    assert cal == pytest.approx((ref + 0.5) * 2 - 0.5)  # pixel i spans [i - 0.5, i + 0.5]
    assert _length(cal, 0, 1) == pytest.approx(2 * _length(ref, 0, 1))
    assert calipers_near(np.zeros((16, 16), bool), head) is None
