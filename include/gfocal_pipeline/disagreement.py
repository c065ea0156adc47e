"""Which images the device gets most wrong: per image, confident boxes matched against an expectation.

The expectation is the PyTorch reference's detections of the same run (or, without a reference, the
ground truth). Per image, boxes at or above `score_thr` of both sides are matched greedily, highest
expected score first, to an unmatched device box of the same class with IoU >= `iou_thr`:

- an expected box without a match is **missed**, or **mislocated** when a device box of its class
  overlaps it with `near_iou` <= IoU < `iou_thr`;
- a device box left over is **extra**.

An image's disagreement is the sum of the scores of its missed and mislocated expected boxes and of its
extra device boxes (a ground-truth box scores 1). Images are ranked by disagreement, highest first, then
by image id: the same inputs always give the same ranking.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

DEFAULT_SCORE_THR = 0.3
DEFAULT_IOU_THR = 0.5
NEAR_IOU = 0.1


@dataclass(frozen=True)
class Boxes:
    """Boxes of one side, grouped by image: xywh in original image pixels, class id, score."""

    image_ids: np.ndarray  # (N,) int64
    boxes: np.ndarray  # (N, 4) float64 xywh
    classes: np.ndarray  # (N,) int64 category ids
    scores: np.ndarray  # (N,) float64

    @classmethod
    def from_records(cls, records: Iterable[Mapping], score_thr: float = 0.0) -> Boxes:
        """From COCO result (or annotation) records; those under `score_thr` are left out; records
        without a score (ground truth) score 1."""
        rows = [
            (r["image_id"], *r["bbox"], r["category_id"], r.get("score", 1.0))
            for r in records
            if r.get("score", 1.0) >= score_thr
        ]
        table = np.asarray(rows, dtype=np.float64).reshape(-1, 7)
        return cls(
            table[:, 0].astype(np.int64),
            table[:, 1:5],
            table[:, 5].astype(np.int64),
            table[:, 6],
        )

    def by_image(self) -> dict[int, np.ndarray]:
        """Row indices of each image (in file order within an image)."""
        if not len(self.image_ids):
            return {}
        order = np.argsort(self.image_ids, kind="stable")
        ids = self.image_ids[order]
        starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
        ends = np.r_[starts[1:], len(ids)]
        return {int(ids[s]): order[s:e] for s, e in zip(starts, ends, strict=True)}

    def confident(self, score_thr: float) -> Boxes:
        """The boxes scoring at least `score_thr`."""
        keep = self.scores >= score_thr
        return Boxes(self.image_ids[keep], self.boxes[keep], self.classes[keep], self.scores[keep])

    def of_classes(self, classes: Iterable[int]) -> Boxes:
        """The boxes whose class id is one of `classes`."""
        keep = np.isin(self.classes, np.fromiter(classes, dtype=np.int64))
        return Boxes(self.image_ids[keep], self.boxes[keep], self.classes[keep], self.scores[keep])

    def class_counts(self) -> dict[int, int]:
        values, counts = np.unique(self.classes, return_counts=True)
        return {int(v): int(c) for v, c in zip(values, counts, strict=True)}


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every xywh box of `a` with every one of `b`, (len(a), len(b))."""
    ax2, ay2 = a[:, 0] + a[:, 2], a[:, 1] + a[:, 3]
    bx2, by2 = b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]
    w = np.minimum(ax2[:, None], bx2[None]) - np.maximum(a[:, None, 0], b[None, :, 0])
    h = np.minimum(ay2[:, None], by2[None]) - np.maximum(a[:, None, 1], b[None, :, 1])
    inter = np.clip(w, 0, None) * np.clip(h, 0, None)
    union = (a[:, 2] * a[:, 3])[:, None] + (b[:, 2] * b[:, 3])[None] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


@dataclass(frozen=True)
class ImageDisagreement:
    image_id: int
    score: float
    missed: int
    mislocated: int
    extra: int
    expected: int  # confident expected boxes
    found: int  # confident device boxes

    def as_dict(self) -> dict[str, float | int]:
        return {
            "image_id": self.image_id,
            "disagreement": round(self.score, 6),
            "missed": self.missed,
            "mislocated": self.mislocated,
            "extra": self.extra,
            "expected": self.expected,
            "found": self.found,
        }


def _match(exp: Boxes, e_rows: np.ndarray, dev: Boxes, d_rows: np.ndarray, iou_thr: float) -> tuple:
    """Greedy same-class matching of one image; returns (missed mask, mislocated mask, extra mask)."""
    ious = iou_matrix(exp.boxes[e_rows], dev.boxes[d_rows])
    ious[exp.classes[e_rows][:, None] != dev.classes[d_rows][None]] = 0.0
    # each expected box's candidates (IoU >= iou_thr), best first; most boxes have none or one
    rows, cols = np.nonzero(ious >= iou_thr)
    order = np.lexsort((-ious[rows, cols], rows))
    candidates: dict[int, list[int]] = {}
    for i, j in zip(rows[order].tolist(), cols[order].tolist(), strict=True):
        candidates.setdefault(i, []).append(j)
    taken = np.zeros(len(d_rows), bool)
    unmatched = np.ones(len(e_rows), bool)
    for i in np.argsort(-exp.scores[e_rows], kind="stable").tolist():
        for j in candidates.get(i, ()):
            if not taken[j]:
                taken[j], unmatched[i] = True, False
                break
    near = ious.max(axis=1, initial=0.0) >= NEAR_IOU
    return unmatched & ~near, unmatched & near, ~taken


def rank_images(
    expected: Boxes,
    device: Boxes,
    image_ids: Iterable[int],
    *,
    iou_thr: float = DEFAULT_IOU_THR,
) -> list[ImageDisagreement]:
    """Every image of `image_ids` with its disagreement, ranked (see the module docstring). Both sides
    are expected to be filtered to confident boxes already."""
    exp_rows, dev_rows = expected.by_image(), device.by_image()
    empty = np.empty(0, np.int64)
    ranked = []
    for image_id in image_ids:
        e_rows, d_rows = exp_rows.get(int(image_id), empty), dev_rows.get(int(image_id), empty)
        missed, misplaced, extra = _match(expected, e_rows, device, d_rows, iou_thr)
        score = float(expected.scores[e_rows][missed | misplaced].sum() + device.scores[d_rows][extra].sum())
        ranked.append(
            ImageDisagreement(
                int(image_id),
                score,
                int(missed.sum()),
                int(misplaced.sum()),
                int(extra.sum()),
                len(e_rows),
                len(d_rows),
            )
        )
    ranked.sort(key=lambda d: (-d.score, d.image_id))
    return ranked
