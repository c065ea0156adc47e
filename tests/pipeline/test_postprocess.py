"""pad_dets: final detections as fixed-size kind "dets" rows, read back exactly by from_dets (one image)
and from_dets_rows (a whole shard)."""

from __future__ import annotations

import numpy as np
import pytest

from gfocal_pipeline.postprocess import Detections, from_dets, from_dets_rows, multiclass_nms, pad_dets


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


def test_a_whole_shard_at_once_keeps_what_image_by_image_keeps() -> None:
    """from_dets_rows == the rows of each image with a class 0..79 and a positive score, concatenated
    image after image: same rows, order, values and dtypes (and from_dets of one image agrees)."""
    rng = np.random.default_rng(0)
    dets = rng.uniform(0, 100, size=(6, 100, 5)).astype(np.float32)
    dets[..., 4] = np.where(rng.uniform(size=(6, 100)) < 0.3, 0.0, dets[..., 4] / 100)  # score-0 rows
    labels = rng.integers(-1, 82, size=(6, 100))  # padding -1, the 81st class 80 and beyond
    labels[4] = -1  # an image without detections
    rows, found = from_dets_rows(dets, labels)
    keep = [(labels[n] >= 0) & (labels[n] < 80) & (dets[n, :, 4] > 0) for n in range(6)]
    assert rows.tolist() == [n for n in range(6) for _ in range(int(keep[n].sum()))]
    np.testing.assert_array_equal(found.boxes, np.concatenate([dets[n][keep[n], :4] for n in range(6)]))
    np.testing.assert_array_equal(found.scores, np.concatenate([dets[n][keep[n], 4] for n in range(6)]))
    np.testing.assert_array_equal(found.labels, np.concatenate([labels[n][keep[n]] for n in range(6)]))
    assert (found.boxes.dtype, found.scores.dtype, found.labels.dtype) == (np.float32, np.float32, np.int64)
    assert 0 < len(found) < 600 and 4 not in rows
    one = from_dets(dets[2], labels[2])
    np.testing.assert_array_equal(one.boxes, found.boxes[rows == 2])


def test_a_shard_without_detections() -> None:
    rows, found = from_dets_rows(np.zeros((2, 100, 5), np.float32), np.full((2, 100), -1))
    assert rows.shape == (0,) and found.boxes.shape == (0, 4) and len(found) == 0
