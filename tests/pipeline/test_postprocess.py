"""pad_dets: final detections as fixed-size kind "dets" rows, read back exactly by from_dets."""

from __future__ import annotations

import numpy as np
import pytest

from gfocal_pipeline.postprocess import Detections, from_dets, multiclass_nms, pad_dets


def test_rows_round_trip_and_padding_is_dropped() -> None:
    found = Detections(
        np.array([[1.5, 2.0, 30.0, 40.25], [5.0, 6.0, 7.0, 8.0]], np.float32),
        np.array([0.9, 0.06], np.float32),
        np.array([79, 0], np.int64),
    )
    dets, labels = pad_dets(found, max_per_img=4)
    assert dets.shape == (4, 5) and dets.dtype == np.float32
    assert labels.tolist() == [79, 0, -1, -1]
    np.testing.assert_array_equal(dets[2:], 0)
    back = from_dets(dets, labels)
    for name in ("boxes", "scores", "labels"):
        np.testing.assert_array_equal(getattr(back, name), getattr(found, name))
        assert getattr(back, name).dtype == getattr(found, name).dtype


def test_no_detections_give_only_padding() -> None:
    dets, labels = pad_dets(Detections.empty(), max_per_img=3)
    assert (labels == -1).all() and not dets.any()
    assert len(from_dets(dets, labels)) == 0


def test_more_detections_than_rows_is_an_error() -> None:
    found = Detections(np.zeros((3, 4), np.float32), np.full(3, 0.5, np.float32), np.zeros(3, np.int64))
    with pytest.raises(ValueError, match="3 detections do not fit in 2 rows"):
        pad_dets(found, max_per_img=2)


def test_host_nms_output_survives_the_rows() -> None:
    """Two overlapping boxes of one class and one far box: NMS keeps two, the rows carry exactly those."""
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]], np.float32)
    scores = np.zeros((3, 80), np.float32)
    scores[:, 4] = [0.8, 0.7, 0.3]
    found = multiclass_nms(boxes, scores, max_per_img=5)
    assert found.labels.tolist() == [4, 4] and found.scores.tolist() == pytest.approx([0.8, 0.3])
    back = from_dets(*pad_dets(found, max_per_img=5))
    np.testing.assert_array_equal(back.boxes, boxes[[0, 2]])
    assert back.scores.tolist() == pytest.approx([0.8, 0.3])
