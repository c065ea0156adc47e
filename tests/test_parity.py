"""Candidate comparison: ties at the top-k boundary are tolerated, real differences are not."""

from __future__ import annotations

import numpy as np

from gfocal_pipeline.decode import candidates_per_image, level_sizes
from gfocal_pipeline.parity import candidate_errors

H, W = 256, 320  # level 0 has 1280 anchors -> a 1000-candidate block


def _candidates(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    k = candidates_per_image(H, W)
    boxes = rng.uniform(0, 300, size=(1, k, 4)).astype(np.float32)
    scores = rng.uniform(0, 0.5, size=(1, k, 80)).astype(np.float32)
    return boxes, scores


def test_identical_and_rounding_level_differences() -> None:
    boxes, scores = _candidates()
    assert candidate_errors((boxes, scores), (boxes, scores), H, W) == {
        "boxes": 0.0, "scores": 0.0, "boundary_ties": 0, "unexplained": 0}
    noisy = candidate_errors((boxes + 2e-4, scores), (boxes, scores), H, W)
    assert abs(noisy["boxes"] - 2e-4) < 5e-5 and noisy["unexplained"] == 0


def test_boundary_swap_is_a_tie_not_an_error() -> None:
    boxes, scores = _candidates()
    first = min(h * w for h, w in level_sizes(H, W)[:1])
    assert first > 1000
    # level 0: the lowest kept candidate is replaced by another anchor of (almost) the same score,
    # and the order shifts as it would with anchor-ordered output
    floor = scores[0, :1000].max(-1).min()
    other_b = boxes.copy()
    other_s = scores.copy()
    low = int(np.argmin(scores[0, :1000].max(-1)))
    other_b[0, low:999] = boxes[0, low + 1 : 1000]
    other_s[0, low:999] = scores[0, low + 1 : 1000]
    other_b[0, 999] = [1, 2, 3, 4]
    other_s[0, 999] = 0.0
    other_s[0, 999, 0] = floor + 1e-6
    result = candidate_errors((other_b, other_s), (boxes, scores), H, W)
    assert result["boundary_ties"] == 1 and result["unexplained"] == 0 and result["boxes"] == 0.0


def test_a_wrong_box_is_unexplained() -> None:
    boxes, scores = _candidates()
    wrong = boxes.copy()
    best = int(np.argmax(scores[0, :1000].max(-1)))
    wrong[0, best] += 50.0
    result = candidate_errors((wrong, scores), (boxes, scores), H, W)
    assert result["unexplained"] == 1
