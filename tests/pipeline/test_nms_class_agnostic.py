"""Host NMS for a model's own class count and NMS kind: class-agnostic `multiclass_nms` against a
brute-force greedy NMS written here, the padding-class drop at `num_classes`, and `from_dets`."""

from __future__ import annotations

import numpy as np
import pytest

from gfocal_pipeline.postprocess import from_dets, from_dets_rows, multiclass_nms


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two x1y1x2y2 boxes (area = width x height, no +1)."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def brute_force_nms(
    boxes: np.ndarray,
    scores: np.ndarray,
    score_thr: float,
    iou_thr: float,
    max_per_img: int,
    num_classes: int,
    class_aware: bool,
) -> list[tuple[int, int]]:
    """(box index, class) of the kept pairs, best first: every (box, class) pair above `score_thr` in
    one list by score; a pair is kept unless a kept pair (of its class, when class-aware) overlaps it
    with IoU > iou_thr. Class-agnostic, classes >= num_classes never take part; class-aware they take
    part in their own class and are dropped after truncation."""
    pairs = [
        (float(scores[i, c]), i, c)
        for i in range(scores.shape[0])
        for c in range(scores.shape[1])
        if scores[i, c] > score_thr and (class_aware or c < num_classes)
    ]
    pairs.sort(key=lambda p: -p[0])
    kept: list[tuple[int, int]] = []
    for _, i, c in pairs:
        rivals = [(j, d) for j, d in kept if not class_aware or d == c]
        if all(iou(boxes[i].astype(np.float64), boxes[j].astype(np.float64)) <= iou_thr for j, _ in rivals):
            kept.append((i, c))
    return [(i, c) for i, c in kept[:max_per_img] if c < num_classes]


def random_candidates(seed: int, k: int = 60, c: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Clustered boxes (many overlaps) and sparse float32 scores of `c` columns."""
    rng = np.random.default_rng(seed)
    centre = rng.uniform(20, 80, size=(k, 2))
    size = rng.uniform(8, 40, size=(k, 2))
    boxes = np.concatenate([centre - size / 2, centre + size / 2], axis=1).astype(np.float32)
    scores = rng.uniform(0, 1, size=(k, c)).astype(np.float32)
    scores[rng.uniform(size=(k, c)) < 0.6] = 0.0
    return boxes, scores


def test_overlapping_boxes_of_two_classes() -> None:
    """Class-agnostic, the better of two overlapping boxes of different classes suppresses the other;
    class-aware, each class keeps its own."""
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11]], np.float32)  # IoU 81/119 = 0.68 > 0.6
    scores = np.zeros((2, 3), np.float32)
    scores[0, 1] = 0.9
    scores[1, 2] = 0.8
    agnostic = multiclass_nms(boxes, scores, num_classes=3, class_aware=False)
    assert agnostic.labels.tolist() == [1]
    assert agnostic.scores.tolist() == pytest.approx([0.9])
    np.testing.assert_array_equal(agnostic.boxes, boxes[[0]])
    aware = multiclass_nms(boxes, scores, num_classes=3, class_aware=True)
    assert aware.labels.tolist() == [1, 2]
    assert aware.scores.tolist() == pytest.approx([0.9, 0.8])


def test_one_box_above_the_threshold_in_two_classes_keeps_its_best_class_only_when_agnostic() -> None:
    boxes = np.array([[0, 0, 10, 10]], np.float32)
    scores = np.array([[0.0, 0.4, 0.7]], np.float32)
    assert multiclass_nms(boxes, scores, num_classes=3, class_aware=False).labels.tolist() == [2]
    assert multiclass_nms(boxes, scores, num_classes=3).labels.tolist() == [2, 1]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("class_aware", [False, True])
@pytest.mark.parametrize("max_per_img", [7, 100])
def test_matches_a_brute_force_greedy_nms(seed: int, class_aware: bool, max_per_img: int) -> None:
    """Random clustered candidates with a padding column (index 3 of 4, num_classes 3): the same
    pairs, in the same order, with the same boxes and scores as the brute force."""
    boxes, scores = random_candidates(seed)
    score_thr, iou_thr = 0.3, 0.45
    expected = brute_force_nms(boxes, scores, score_thr, iou_thr, max_per_img, 3, class_aware)
    found = multiclass_nms(boxes, scores, score_thr, iou_thr, max_per_img, 3, class_aware)
    assert len(expected) > 3  # the seeds give real work
    assert found.labels.tolist() == [c for _, c in expected]
    np.testing.assert_array_equal(found.boxes, boxes[[i for i, _ in expected]].reshape(-1, 4))
    np.testing.assert_array_equal(found.scores, np.array([scores[i, c] for i, c in expected], np.float32))
    assert found.labels.dtype == np.int64 and found.scores.dtype == np.float32


def test_agnostic_and_aware_differ_on_random_inputs() -> None:
    """The two kinds are not the same NMS (so the brute-force test above checks both)."""
    boxes, scores = random_candidates(0)
    agnostic = multiclass_nms(boxes, scores, 0.3, 0.45, 100, 3, class_aware=False)
    aware = multiclass_nms(boxes, scores, 0.3, 0.45, 100, 3, class_aware=True)
    assert len(agnostic) < len(aware)


def test_a_padding_column_suppresses_nothing_when_agnostic() -> None:
    """A high score in the padding column (index num_classes) overlapping a real box: class-agnostic
    the real box survives and the padding is never a detection."""
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10]], np.float32)
    scores = np.array([[0.0, 0.0, 0.0, 0.95], [0.0, 0.6, 0.0, 0.0]], np.float32)
    found = multiclass_nms(boxes, scores, num_classes=3, class_aware=False)
    assert found.labels.tolist() == [1] and found.scores.tolist() == pytest.approx([0.6])
    assert multiclass_nms(boxes, scores, num_classes=3).labels.tolist() == [1]


def test_defaults_are_coco_class_aware() -> None:
    """Without the new arguments: 80 classes, class-aware (GFocalV2's results unchanged)."""
    rng = np.random.default_rng(3)
    boxes, _ = random_candidates(3, k=40)
    scores = (rng.uniform(size=(40, 81)) * (rng.uniform(size=(40, 81)) < 0.05)).astype(np.float32)
    scores[:5, 80] = 0.9  # GFocalV2's padding channel: takes part, then dropped
    default = multiclass_nms(boxes, scores, 0.05, 0.6, 100)
    explicit = multiclass_nms(boxes, scores, 0.05, 0.6, 100, num_classes=80, class_aware=True)
    expected = brute_force_nms(boxes, scores, 0.05, 0.6, 100, 80, True)
    for found in (default, explicit):
        assert found.labels.tolist() == [c for _, c in expected]
        np.testing.assert_array_equal(found.scores, np.array([scores[i, c] for i, c in expected], np.float32))


def test_from_dets_drops_labels_at_or_beyond_num_classes() -> None:
    dets = np.array([[0, 0, 1, 1, 0.9], [0, 0, 2, 2, 0.8], [0, 0, 3, 3, 0.7], [0, 0, 4, 4, 0.6]], np.float32)
    labels = np.array([2, 3, 0, 79], np.int64)
    three = from_dets(dets, labels, num_classes=3)
    assert three.labels.tolist() == [2, 0]
    np.testing.assert_array_equal(three.boxes, dets[[0, 2], :4])
    assert from_dets(dets, labels).labels.tolist() == [2, 3, 0, 79]  # COCO's 80 by default
    rows, found = from_dets_rows(np.stack([dets, dets]), np.stack([labels, labels[::-1]]), num_classes=3)
    assert rows.tolist() == [0, 0, 1, 1] and found.labels.tolist() == [2, 0, 0, 2]
