"""The tie-aware candidate comparison on synthetic levels: what counts as a tie, what as an error."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gfocal_pipeline.models.gfocalv2.decode import candidates_per_image, level_sizes
from gfocal_pipeline.parity import (
    LevelParity,
    ParityReport,
    compare_candidates,
    compare_level,
    level_blocks,
)

ANCHORS, KEPT, CLASSES = 1500, 1000, 80


def _level(seed: int = 0, tied: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PyTorch's decode of every anchor of one level: boxes, 80 class scores and the 81-channel key.

    With `tied`, that many anchors around the 1000th share the boundary key exactly, the 81st channel
    deciding the key as with the official padding class.
    """
    rng = np.random.default_rng(seed)
    x = np.arange(ANCHORS, dtype=np.float64) * 8 % 640
    y = np.arange(ANCHORS, dtype=np.float64) * 8 // 640 * 8
    boxes = np.stack([x, y, x + rng.uniform(4, 60, ANCHORS), y + rng.uniform(4, 60, ANCHORS)], axis=1)
    scores = rng.uniform(0, 0.25, (ANCHORS, CLASSES))
    key = rng.permutation(np.linspace(0.05, 0.9, ANCHORS))
    if tied:
        order = np.argsort(-key)
        key[order[KEPT - tied // 2 : KEPT + tied - tied // 2]] = key[order[KEPT - 1]]
    return boxes, scores, np.maximum(key, scores.max(-1))


def _topk(key: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
    """Kept anchors in raster order; with `rng`, exact ties at the boundary are broken at random."""
    jitter = rng.uniform(0, 1, key.shape) if rng is not None else np.arange(key.size)[::-1]
    order = np.lexsort((-jitter, -key))
    return np.sort(order[:KEPT])


def test_identical_candidates_have_no_error() -> None:
    boxes, scores, key = _level()
    kept = _topk(key)
    result = compare_level("P3", boxes[kept], scores[kept], boxes, scores, key, KEPT)
    assert (result.ties, result.unexplained, result.boxes, result.scores) == (0, 0, 0.0, 0.0)
    assert result.boundary_key == pytest.approx(np.sort(key)[::-1][KEPT - 1])


def test_rounding_noise_is_measured_not_unexplained() -> None:
    boxes, scores, key = _level()
    kept = _topk(key)
    result = compare_level("P3", boxes[kept] + 2e-4, scores[kept] - 3e-6, boxes, scores, key, KEPT)
    assert result.unexplained == 0
    assert result.boxes == pytest.approx(2e-4) and result.scores == pytest.approx(3e-6)


@pytest.mark.parametrize("seed", range(5))
def test_exact_ties_broken_differently_are_ties(seed: int) -> None:
    boxes, scores, key = _level(seed, tied=85)
    ours = _topk(key, np.random.default_rng(100 + seed))
    theirs = _topk(key)
    swapped = len(set(ours) - set(theirs))
    assert swapped > 0  # the two "runtimes" really kept different anchors
    result = compare_level("P4", boxes[ours], scores[ours], boxes, scores, key, KEPT)
    assert result.unexplained == 0 and result.ties == swapped


def test_ties_are_decided_on_the_81_channel_key_not_the_80_class_scores() -> None:
    # the 80 class scores of the tied anchors sit well above the level's lowest 80-class score; only
    # the key (81st channel) ties - the case the old check called "unexplained"
    boxes, scores, key = _level(1, tied=40)
    boundary = np.sort(key)[::-1][KEPT - 1]
    tied = np.nonzero(key == boundary)[0]
    scores[tied, 0] = boundary - 0.01
    scores[tied, 1:] = 0.0
    ours = _topk(key, np.random.default_rng(7))
    result = compare_level("P4", boxes[ours], scores[ours], boxes, scores, key, KEPT)
    assert result.ties > 0 and result.unexplained == 0


def test_an_anchor_below_the_boundary_is_extra_and_its_gap_reported() -> None:
    boxes, scores, key = _level(2)
    kept = _topk(key)
    order = np.argsort(-key)
    dropped_best, taken_low = order[0], order[KEPT + 200]  # top anchor out, a clearly lower one in
    wrong = np.sort(np.append(kept[kept != dropped_best], taken_low))
    result = compare_level("P3", boxes[wrong], scores[wrong], boxes, scores, key, KEPT)
    assert (result.missing, result.extra, result.unmatched, result.ties) == (1, 1, 0, 0)
    boundary = key[order[KEPT - 1]]
    assert result.max_gap == pytest.approx(max(key[dropped_best] - boundary, boundary - key[taken_low]))


def test_a_box_off_every_anchor_is_unmatched() -> None:
    boxes, scores, key = _level(3)
    kept = _topk(key)
    shifted = boxes[kept].copy()
    shifted[int(np.searchsorted(kept, np.argmax(key)))] += 30.0  # the best anchor's box
    result = compare_level("P3", shifted, scores[kept], boxes, scores, key, KEPT)
    assert result.unmatched == 1 and result.missing == 1 and result.unexplained == 2


def test_a_duplicated_candidate_is_not_explained_by_the_same_anchor() -> None:
    boxes, scores, key = _level(4)
    kept = _topk(key)
    order = np.argsort(-key)
    dup = kept.copy()
    dup[dup == order[5]] = order[6]  # the graph emits anchor order[6] twice, drops order[5]
    result = compare_level("P3", boxes[dup], scores[dup], boxes, scores, key, KEPT)
    assert result.unmatched == 1 and result.missing == 1


def test_level_that_keeps_every_anchor_has_no_boundary() -> None:
    boxes, scores, key = _level(5)
    part = slice(0, 400)
    result = compare_level("P4", boxes[part], scores[part], boxes[part], scores[part], key[part], 400)
    assert result.boundary_key is None and result.unexplained == 0
    other = compare_level("P4", boxes[part][::-1], scores[part], boxes[part], scores[part], key[part], 400)
    assert other.unexplained > 0


def _full_image(height: int, width: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(all anchors' boxes (1,A,4), scores (1,A,81)) and the kept-candidate index of every level."""
    rng = np.random.default_rng(seed)
    anchors = sum(h * w for h, w in level_sizes(height, width))
    boxes = rng.uniform(0, min(height, width), (1, anchors, 4))
    scores = rng.uniform(0, 0.5, (1, anchors, 81))
    index, start = [], 0
    for count, kept, _ in level_blocks(height, width):
        key = scores[0, start : start + count].max(-1)
        index.append(start + np.sort(np.argsort(-key, kind="stable")[:kept]))
        start += count
    return boxes, scores, np.concatenate(index)


def test_whole_image_report_and_batch() -> None:
    boxes, scores, index = _full_image(256, 320)
    got = (np.repeat(boxes[:, index], 2, axis=0), np.repeat(scores[:, index, :80], 2, axis=0))
    report = compare_candidates(got, (np.repeat(boxes, 2, axis=0), np.repeat(scores, 2, axis=0)), 256, 320)
    assert report.unexplained == 0 and report.numeric_error == 0.0
    assert [lv["level"] for lv in report.per_level()] == ["P3", "P4", "P5", "P6", "P7"]
    assert len(report.levels) == 10  # two images x five levels
    assert sum(lv["kept"] for lv in report.per_level()) == candidates_per_image(256, 320)


def test_wrong_count_is_reported_and_is_no_zero_error() -> None:
    boxes, scores, index = _full_image(256, 320, seed=1)
    short = compare_candidates((boxes[:, index[:-5]], scores[:, index[:-5], :80]), (boxes, scores), 256, 320)
    k = candidates_per_image(256, 320)
    assert f"returned {k - 5} candidates per image, expected {k}" in short.describe()
    assert short.numeric_error == math.inf  # nothing was compared: that is no "0 error"


def _inject(array: np.ndarray, index: tuple, value: float) -> np.ndarray:
    array = array.copy()
    array[index] = value
    return array


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    ("side", "output", "value", "expected"),
    [
        # NaN in ONNX Runtime's scores, in PyTorch's boxes, and +/-Inf; each counted on its own output
        ("onnxruntime", 1, NAN, {"onnxruntime scores": 3}),
        ("pytorch", 0, NAN, {"pytorch boxes": 3}),
        ("onnxruntime", 0, INF, {"onnxruntime boxes": 3}),
        ("pytorch", 1, -INF, {"pytorch scores": 3}),
    ],
)
def test_non_finite_values_are_counted_per_output_never_a_zero_error(
    side: str, output: int, value: float, expected: dict[str, int]
) -> None:
    boxes, scores, index = _full_image(256, 320, seed=1)
    got = [boxes[:, index], scores[:, index, :80]]
    reference = [boxes, scores]
    arrays = got if side == "onnxruntime" else reference
    where = (0, [3, 50, 700], 1)  # three values of the first image
    arrays[output] = _inject(arrays[output], where, value)
    report = compare_candidates(tuple(got), tuple(reference), 256, 320)
    zero = {f"{s} {o}": 0 for s in ("onnxruntime", "pytorch") for o in ("boxes", "scores")}
    assert report.nonfinite == {**zero, **expected} and not report.finite
    # no comparison ran on NaN/Inf: every error reads inf, none 0
    assert report.levels == [] and report.numeric_error == math.inf
    assert report.boxes == math.inf and report.scores == math.inf
    summary = report.summary()
    assert summary["boxes"] == math.inf and summary["scores"] == math.inf
    (name,) = expected
    assert summary[f"nonfinite_{name.replace(' ', '_')}"] == 3
    assert f"non-finite values (NaN/Inf) per output: {report.nonfinite_counts()}" in report.describe()
    assert f"{name} 3" in report.nonfinite_counts()


def test_a_batch_merges_non_finite_counts_per_output() -> None:
    boxes, scores, index = _full_image(256, 320, seed=2)
    clean = compare_candidates((boxes[:, index], scores[:, index, :80]), (boxes, scores), 256, 320)
    assert clean.finite and clean.numeric_error == 0.0
    bad = compare_candidates(
        (boxes[:, index], _inject(scores[:, index, :80], (0, 0, 0), NAN)), (boxes, scores), 256, 320
    )
    clean.merge(bad)
    assert clean.nonfinite["onnxruntime scores"] == 1 and clean.numeric_error == math.inf


def test_compare_level_is_not_fooled_by_nan() -> None:
    """Called directly (no finiteness guard in front), a NaN never reads as a match or as 0 error."""
    boxes, scores, key = _level(6)
    kept = _topk(key)
    cand_boxes, cand_scores = boxes[kept].copy(), scores[kept].copy()
    cand_scores[10, 4] = np.nan
    cand_boxes[20, 0] = np.nan
    result = compare_level("P3", cand_boxes, cand_scores, boxes, scores, key, KEPT)
    assert result.unmatched == 2 and result.unexplained >= 2
    assert math.isfinite(result.boxes) and math.isfinite(result.scores)


def test_a_nan_level_error_makes_the_report_error_infinite() -> None:
    report = ParityReport(levels=[LevelParity("P3", 10, 10, None, boxes=0.1), LevelParity("P4", 4, 4, None)])
    report.levels[1].scores = float("nan")  # as a hand-made or future level error could be
    assert report.scores == math.inf and report.numeric_error == math.inf
    assert report.boxes == pytest.approx(0.1)
