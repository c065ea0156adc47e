"""Does an exported graph select and decode the same candidates as PyTorch? Tie-aware, per level.

Per FPN level the graph keeps the `nms_pre` anchors with the largest *selection key*: the max over
all 81 classifier channels (the padding class included, as in the official code). Whenever several
anchors share the boundary key exactly - constant letterbox padding, collapsed activations - each
runtime's TopK may keep a different subset of them, and both are right. So the check does not
compare arrays element by element; it works from PyTorch's decode of *every* anchor of the level:

1. the boundary key is PyTorch's `nms_pre`-th largest key; an anchor is a *tie* when its key equals
   the boundary within rounding (`tie_atol + tie_rtol * boundary`);
2. each candidate of the graph is matched to the anchor it decodes (same box within `match_px`
   and same class scores within `match_score`, one candidate per anchor);
3. every anchor above the boundary must be in the graph's output (else *missing*), every candidate
   must be an anchor at or above the boundary (else *extra*, or *unmatched* if it is no anchor at all);
   only boundary ties may differ between the two sides;
4. the numeric error (`boxes`, `scores`) is the largest difference over matched pairs.

A wrong graph - a shifted prior, a wrong stride, a changed feature - moves boxes or scores off
every anchor and shows up as unmatched/missing candidates or as a numeric error; a correct graph
has 0 unexplained candidates whatever the weights.

Non-finite values are never compared (NaN compares false with everything, so a max-difference over
them reads as 0): each output of each side is checked with `np.isfinite` first and its NaN/Inf count
reported (`nonfinite`); a report with any of them, or with nothing compared, has an infinite error.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from gfocal_pipeline.constants import NMS_PRE, STRIDES
from gfocal_pipeline.nets.levels import level_sizes

LEVEL_NAMES = ("P3", "P4", "P5", "P6", "P7")
MATCH_PX = 1.0  # a candidate is an anchor's when its box is within this many pixels ...
MATCH_SCORE = 1e-3  # ... and each class score within this (both far above runtime rounding)
TIE_ATOL = 1e-5  # keys this close to the boundary (plus TIE_RTOL relative) are rounding-level ties
TIE_RTOL = 1e-4
_CHUNK = 64  # candidates per block when searching all anchors of a level
_UNIT_TEXT = {"px": "px", "size": "of stride + box size"}


@dataclass
class LevelParity:
    """One image's one level: how the graph's candidates relate to PyTorch's anchors."""

    level: str
    anchors: int
    kept: int
    boundary_key: float | None  # None when the level keeps every anchor
    ties: int = 0  # candidates the graph kept from a boundary tie that PyTorch did not keep
    missing: int = 0  # anchors above the boundary the graph dropped
    extra: int = 0  # candidates that are anchors below the boundary
    unmatched: int = 0  # candidates that decode to no anchor of PyTorch's
    max_gap: float = 0.0  # largest |key - boundary| among missing/extra
    boxes: float = 0.0  # max abs box error over matched pairs (in `box_unit`)
    scores: float = 0.0  # max abs score error over matched pairs
    box_unit: str = "px"  # pixels, or "size": a fraction of stride + the box's larger side

    @property
    def unexplained(self) -> int:
        return self.missing + self.extra + self.unmatched


@dataclass
class ParityReport:
    """The whole comparison; `summary()` is what the export result and its JSON record."""

    levels: list[LevelParity] = field(default_factory=list)
    nonfinite: dict[str, int] = field(default_factory=dict)  # "<side> <output>" -> NaN/Inf count
    count_mismatch: str = ""

    def merge(self, other: ParityReport) -> None:
        """Add another input's comparison to this report."""
        self.levels += other.levels
        for side, count in other.nonfinite.items():
            self.nonfinite[side] = self.nonfinite.get(side, 0) + count
        self.count_mismatch = self.count_mismatch or other.count_mismatch

    @property
    def finite(self) -> bool:
        """True when no output of either side held NaN or Inf."""
        return not any(self.nonfinite.values())

    @property
    def boxes(self) -> float:
        return self._worst("boxes")

    @property
    def scores(self) -> float:
        return self._worst("scores")

    def _worst(self, name: str) -> float:
        """Largest level error `name`; inf when values were not finite (or an error is NaN)."""
        values = [getattr(lv, name) for lv in self.levels]
        if not self.finite or not all(math.isfinite(v) for v in values):
            return math.inf
        return max(values, default=0.0)

    @property
    def ties(self) -> int:
        return sum(lv.ties for lv in self.levels)

    @property
    def unexplained(self) -> int:
        return sum(lv.unexplained for lv in self.levels)

    @property
    def max_gap(self) -> float:
        return max((lv.max_gap for lv in self.levels), default=0.0)

    @property
    def numeric_error(self) -> float:
        """The largest matched difference (boxes in px or scores); inf when the values are not finite
        or the candidates could not be compared at all (a count mismatch)."""
        if self.count_mismatch:
            return math.inf
        return max(self.boxes, self.scores)

    def nonfinite_counts(self) -> str:
        """'onnxruntime boxes 0, onnxruntime scores 3, ...': the NaN/Inf count of every output."""
        return ", ".join(f"{output} {n}" for output, n in self.nonfinite.items())

    def summary(self) -> dict[str, float | int]:
        return {
            "boxes": self.boxes,
            "scores": self.scores,
            "boundary_ties": self.ties,
            "unexplained": self.unexplained,
            "max_gap": self.max_gap,
            **{f"nonfinite_{output.replace(' ', '_')}": n for output, n in self.nonfinite.items()},
        }

    def per_level(self) -> list[dict[str, object]]:
        """Levels summed over the images of the batch (counts add, errors and gaps take the max)."""
        merged: dict[str, LevelParity] = {}
        for lv in self.levels:
            into = merged.setdefault(
                lv.level, LevelParity(lv.level, lv.anchors, lv.kept, lv.boundary_key, box_unit=lv.box_unit)
            )
            for name in ("ties", "missing", "extra", "unmatched"):
                setattr(into, name, getattr(into, name) + getattr(lv, name))
            for name in ("max_gap", "boxes", "scores"):
                setattr(into, name, max(getattr(into, name), getattr(lv, name)))
        return [{**asdict(lv), "unexplained": lv.unexplained} for lv in merged.values()]

    def describe(self) -> str:
        """One line per level, for the export log and its error message."""
        lines = []
        if self.count_mismatch:
            lines.append(self.count_mismatch)
        if not self.finite:
            lines.append(f"non-finite values (NaN/Inf) per output: {self.nonfinite_counts()}")
        for lv in self.per_level():
            boundary = "all kept" if lv["boundary_key"] is None else f"boundary key {lv['boundary_key']:.6g}"
            lines.append(
                f"{lv['level']}: {lv['kept']} of {lv['anchors']} anchors kept ({boundary}); "
                f"{lv['ties']} tie(s), {lv['unexplained']} unexplained (missing {lv['missing']}, "
                f"extra {lv['extra']}, unmatched {lv['unmatched']}), largest gap {lv['max_gap']:.3g}; "
                f"max error boxes {lv['boxes']:.3g} {_UNIT_TEXT[lv['box_unit']]}, scores {lv['scores']:.3g}"
            )
        return "\n".join(lines)


def level_blocks(
    height: int,
    width: int,
    nms_pre: int = NMS_PRE,
    anchors_per_location: int = 1,
    strides: tuple[int, ...] = STRIDES,
) -> list[tuple[int, int, int]]:
    """Per level: (number of anchors H*W*A, number kept, offset of the level's first kept candidate)."""
    blocks, offset = [], 0
    for h, w in level_sizes(height, width, strides):
        anchors = h * w * anchors_per_location
        kept = min(anchors, nms_pre)
        blocks.append((anchors, kept, offset))
        offset += kept
    return blocks


OUTPUT_NAMES = ("boxes", "scores")


def _nonfinite(array: np.ndarray) -> int:
    """How many values of `array` are NaN or +-Inf."""
    return int(np.size(array) - np.count_nonzero(np.isfinite(array)))


def nonfinite_outputs(side: str, *arrays: np.ndarray) -> dict[str, int]:
    """`{"<side> boxes": n, "<side> scores": n}`: the NaN/Inf count of each output of one side."""
    return {f"{side} {name}": _nonfinite(a) for name, a in zip(OUTPUT_NAMES, arrays, strict=True)}


def _error(value: float) -> float:
    """A measured difference; NaN (from a non-finite value) becomes inf so it can never pass a bound."""
    return value if math.isfinite(value) else math.inf


class _Metric:
    """How one candidate differs from one anchor, in units of the match tolerances (<= 1: a match).

    Boxes: the largest coordinate difference, in pixels or, with `box_unit` "size", as a fraction of
    the anchor's scale (its level's stride + the larger side of PyTorch's box: where a box is decoded
    as exp(log size) * stride, float differences grow with the box). Scores: the largest difference
    over the class columns or, with `one_label`, of the candidate's one label (its argmax column) read
    in PyTorch's scores of every class, plus how far that label is below PyTorch's best class (a
    near-tie of two classes may pick either) and any score outside it (one label per candidate).
    """

    def __init__(self, match_px: float, match_score: float, one_label: bool) -> None:
        self.match_px, self.match_score, self.one_label = match_px, match_score, one_label

    def boxes(self, cand: np.ndarray, ref: np.ndarray, scale: np.ndarray) -> np.ndarray:
        """Box differences of aligned rows (or broadcast pairs) in the box unit."""
        return np.abs(cand - ref).max(-1) / scale

    def scores(self, cand: np.ndarray, ref: np.ndarray) -> np.ndarray:
        """Score differences of aligned rows (n, C) x (n, C)."""
        if not self.one_label:
            return np.abs(cand - ref).max(-1)
        rows = np.arange(len(cand))
        label = cand.argmax(-1)
        outside = cand.copy()
        outside[rows, label] = 0.0
        at_label = ref[rows, label]
        below_best = ref.max(-1) - at_label
        return np.maximum.reduce([np.abs(cand[rows, label] - at_label), below_best, np.abs(outside).max(-1)])

    def pairs(
        self, cand: tuple[np.ndarray, np.ndarray], ref: tuple[np.ndarray, np.ndarray], scale: np.ndarray
    ) -> np.ndarray:
        """The distance of aligned rows in tolerance units: max(box / match_px, score / match_score)."""
        box = self.boxes(cand[0], ref[0], scale) / self.match_px
        return np.maximum(box, self.scores(cand[1], ref[1]) / self.match_score)


def _match(
    cand: tuple[np.ndarray, np.ndarray],
    anchors: tuple[np.ndarray, np.ndarray],
    scale: np.ndarray,
    metric: _Metric,
) -> tuple[np.ndarray, np.ndarray]:
    """For each candidate its nearest anchor (index into the given anchors) and the distance in units
    of the tolerances (<= 1 means matched); -1 / inf where no anchor's box is within `match_px`."""
    cand_boxes, cand_scores = cand
    best = np.full(len(cand_boxes), -1, dtype=np.int64)
    dist = np.full(len(cand_boxes), np.inf)
    limit = metric.match_px * scale  # pixels each anchor's coordinates may be off by
    for start in range(0, len(cand_boxes), _CHUNK):
        stop = min(start + _CHUNK, len(cand_boxes))
        # x1 alone first (cheap), then the whole box of the pairs it leaves
        near = np.abs(cand_boxes[start:stop, None, 0] - anchors[0][None, :, 0]) <= limit[None, :]
        rows, cols = np.nonzero(near)
        box_d = metric.boxes(cand_boxes[start + rows], anchors[0][cols], scale[cols])
        within = box_d <= metric.match_px
        rows, cols, box_d = rows[within], cols[within], box_d[within]
        if rows.size == 0:
            continue
        score_d = metric.scores(cand_scores[start + rows], anchors[1][cols]) / metric.match_score
        pair_d = np.maximum(box_d / metric.match_px, score_d)
        # per candidate row, the pair with the smallest distance
        order = np.lexsort((pair_d, rows))
        first = np.ones(order.size, dtype=bool)
        first[1:] = rows[order][1:] != rows[order][:-1]
        chosen = order[first]
        best[start + rows[chosen]] = cols[chosen]
        dist[start + rows[chosen]] = pair_d[chosen]
    return best, dist


def _boundary(
    keys: np.ndarray, kept: int, tie_atol: float, tie_rtol: float
) -> tuple[np.ndarray, float, float, np.ndarray]:
    """PyTorch's kept mask, the boundary key, the tie tolerance and the anchors a graph may keep."""
    order = np.argsort(-keys, kind="stable")
    ref_kept = np.zeros(len(keys), dtype=bool)
    ref_kept[order[:kept]] = True
    if kept == len(keys):
        return ref_kept, -math.inf, 0.0, np.arange(len(keys))
    boundary = float(keys[order[kept - 1]])
    tol = tie_atol + tie_rtol * abs(boundary)
    return ref_kept, boundary, tol, np.nonzero(keys >= boundary - tol)[0]


def _assign(
    cand: tuple[np.ndarray, np.ndarray],
    ref: tuple[np.ndarray, np.ndarray],
    scale: np.ndarray,
    eligible: np.ndarray,
    metric: _Metric,
) -> tuple[np.ndarray, np.ndarray]:
    """Match candidates to eligible anchors, one candidate per anchor (the nearest wins).

    When the graph keeps every anchor (as many candidates as anchors, all eligible), each candidate is
    first tried against the anchor at its own position (the graph's order is the anchors'); only the
    others are searched among all eligible anchors. Returns (matched mask over candidates, anchor index
    of each candidate or -1)."""
    best = np.full(len(cand[0]), -1, dtype=np.int64)
    dist = np.full(len(cand[0]), np.inf)
    if len(cand[0]) == len(eligible) == len(ref[0]):
        dist = metric.pairs(cand, ref, scale)
        best[dist <= 1.0] = np.nonzero(dist <= 1.0)[0]
    rest = np.nonzero(~(dist <= 1.0))[0]
    if rest.size:
        found, found_d = _match(
            (cand[0][rest], cand[1][rest]), (ref[0][eligible], ref[1][eligible]), scale[eligible], metric
        )
        best[rest] = np.where(found >= 0, eligible[np.maximum(found, 0)], -1)
        dist[rest] = found_d
    matched = dist <= 1.0
    anchor_of = np.where(matched, best, -1)
    taken: set[int] = set()
    for index in np.argsort(dist, kind="stable"):
        if not matched[index]:
            break  # sorted by distance: the rest are unmatched too
        if int(anchor_of[index]) in taken:  # a second candidate on one anchor is not explained by it
            matched[index] = False
        taken.add(int(anchor_of[index]))
    return matched, np.where(matched, anchor_of, -1)


def _loose(
    cand: tuple[np.ndarray, np.ndarray],
    ref: tuple[np.ndarray, np.ndarray],
    scale: np.ndarray,
    eligible: np.ndarray,
    metric: _Metric,
) -> tuple[int, np.ndarray]:
    """Candidates that are no eligible anchor: (how many are no anchor at all, the anchors below the
    boundary the others are). An eligible anchor found here is one a closer candidate already took: a
    duplicate, not an extra."""
    best, dist = _match(cand, ref, scale, metric)
    hits = best[dist <= 1.0]
    below = hits[~np.isin(hits, eligible)]
    return int(len(cand[0]) - below.size), below


def compare_level(
    name: str,
    cand_boxes: np.ndarray,
    cand_scores: np.ndarray,
    ref_boxes: np.ndarray,
    ref_scores: np.ndarray,
    ref_keys: np.ndarray,
    kept: int,
    match_px: float = MATCH_PX,
    match_score: float = MATCH_SCORE,
    tie_atol: float = TIE_ATOL,
    tie_rtol: float = TIE_RTOL,
    box_scale: np.ndarray | None = None,
    one_label: bool = False,
) -> LevelParity:
    """One level of one image: the graph's `kept` candidates against PyTorch's decode of every anchor.

    `ref_scores` holds the same class columns as `cand_scores`; `ref_keys` is the selection key of each
    anchor (max over all classifier channels). `box_scale`: the pixels of one box unit per anchor
    (None: 1, box differences in pixels); `match_px` is in that unit. `one_label`: each candidate keeps
    one label (see `_Metric`).
    """
    anchors = len(ref_keys)
    scale = np.ones(anchors) if box_scale is None else np.asarray(box_scale, np.float64)
    metric = _Metric(match_px, match_score, one_label)
    ref_kept, boundary, tol, eligible = _boundary(ref_keys, kept, tie_atol, tie_rtol)
    result = LevelParity(name, anchors, kept, None if kept == anchors else boundary)
    cand, ref = (cand_boxes, cand_scores), (ref_boxes, ref_scores)
    matched, anchor_of = _assign(cand, ref, scale, eligible, metric)
    pairs = np.nonzero(matched)[0]
    if pairs.size:
        at = anchor_of[pairs]
        result.boxes = _error(float(metric.boxes(cand_boxes[pairs], ref_boxes[at], scale[at]).max()))
        result.scores = _error(float(metric.scores(cand_scores[pairs], ref_scores[at]).max()))
    taken = np.zeros(anchors, dtype=bool)
    taken[anchor_of[pairs]] = True
    result.ties = int(np.sum(taken & ~ref_kept))

    dropped = np.nonzero(ref_kept & ~taken)[0]  # PyTorch kept, the graph did not
    above = dropped[ref_keys[dropped] > boundary + tol]
    result.missing = int(above.size)
    gaps = list(ref_keys[above] - boundary) if kept < anchors else []

    loose = np.nonzero(~matched)[0]  # candidates that are no eligible anchor: which anchor are they?
    if loose.size:
        result.unmatched, below = _loose(
            (cand_boxes[loose], cand_scores[loose]), ref, scale, eligible, metric
        )
        result.extra = int(below.size)
        gaps += list(boundary - ref_keys[below])
    result.max_gap = float(max(gaps, default=0.0))
    return result


BOX_UNITS = ("px", "size")


def box_scales(boxes: np.ndarray, stride: int, unit: str) -> np.ndarray | None:
    """The pixels of one box unit for each anchor of a level: None for "px"; for "size", the level's
    stride + the larger side of PyTorch's box."""
    if unit not in BOX_UNITS:
        raise ValueError(f"unknown box unit {unit!r}; choose one of {', '.join(BOX_UNITS)}")
    if unit == "px":
        return None
    return stride + np.abs(boxes[:, 2:] - boxes[:, :2]).max(-1)


def _count_mismatch(
    gb: np.ndarray, gs: np.ndarray, rb: np.ndarray, blocks: list[tuple[int, int, int]], size: str, per: int
) -> str:
    """Why the candidate counts of the two sides do not fit the levels of `size`, or ""."""
    expected_k = sum(kept for _, kept, _ in blocks)
    expected_a = sum(anchors for anchors, _, _ in blocks)
    if gb.shape[1] == expected_k and gs.shape[1] == expected_k and rb.shape[1] == expected_a:
        return ""
    per_location = f" with {per} anchors per location" if per > 1 else ""
    return (
        f"the graph returned {gb.shape[1]} candidates per image, expected {expected_k} "
        f"for {size}{per_location} (PyTorch decoded {rb.shape[1]} of {expected_a} anchors)"
    )


def compare_candidates(
    got: tuple[np.ndarray, np.ndarray],
    reference: tuple[np.ndarray, np.ndarray],
    height: int,
    width: int,
    nms_pre: int = NMS_PRE,
    anchors_per_location: int = 1,
    strides: tuple[int, ...] = STRIDES,
    *,
    box_unit: str = "px",
    one_label: bool = False,
    **tolerances: float,
) -> ParityReport:
    """The graph's candidates `got` = (boxes (B,K,4) or (B,K,1,4), scores (B,K,C)) against PyTorch's
    decode of every anchor `reference` = (boxes (B,A,4), scores (B,A,81)), cut into levels of
    H*W*`anchors_per_location` anchors; the first C score columns are compared, the key is the max
    over all of `reference`'s columns (the selection key of the deploy graph). Nothing is compared when any
    value of either side is NaN/Inf: the report then only counts them per output.

    A model's facts, as its adapter declares them: `box_unit` ("px", or "size": box differences as a
    fraction of the level's stride + the larger side of PyTorch's box, for boxes decoded as
    exp(log size) * stride), `one_label` (each candidate keeps one label, its argmax, scored in that
    column only: compared against PyTorch's scores of every class, so that a near-tie of two classes
    may pick either), `tolerances` (`compare_level`'s match_px, in the box unit, match_score, tie_atol,
    tie_rtol)."""
    gb, gs = (np.asarray(a, np.float64) for a in got)
    rb, rs = (np.asarray(a, np.float64) for a in reference)
    gb = gb.reshape(gb.shape[0], -1, 4)
    classes = gs.shape[-1]
    report = ParityReport(
        nonfinite={**nonfinite_outputs("onnxruntime", gb, gs), **nonfinite_outputs("pytorch", rb, rs)}
    )
    blocks = level_blocks(height, width, nms_pre, anchors_per_location, strides)
    report.count_mismatch = _count_mismatch(gb, gs, rb, blocks, f"{height}x{width}", anchors_per_location)
    if report.count_mismatch or not report.finite:
        return report
    for b in range(gb.shape[0]):
        anchor_start = 0
        for name, (anchors, kept, offset), stride in zip(
            LEVEL_NAMES[: len(blocks)], blocks, strides, strict=True
        ):
            ref = slice(anchor_start, anchor_start + anchors)
            cand = slice(offset, offset + kept)
            level = compare_level(
                name,
                gb[b, cand],
                gs[b, cand],
                rb[b, ref],
                rs[b, ref, :classes],
                rs[b, ref].max(-1),
                kept,
                box_scale=box_scales(rb[b, ref], stride, box_unit),
                one_label=one_label,
                **tolerances,
            )
            level.box_unit = box_unit
            report.levels.append(level)
            anchor_start += anchors
    return report
