"""Host-side NMS of portable candidates and the fixed-size "dets" rows that carry its result.

`multiclass_nms` reduces one image's candidates to final detections; `pad_dets` stores them as the
rows of kind "dets" (what NMS-in-graph models output too) and `from_dets` reads such rows back
(`from_dets_rows`: a whole shard at once).
Vectorised, no per-box loops."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from gfocal_pipeline.constants import MAX_PER_IMG, NMS_IOU, NUM_CLASSES, SCORE_THR


@dataclass(frozen=True)
class Detections:
    """Kept boxes of one image: `boxes` (k,4) x1y1x2y2, `scores` (k,), `labels` (k,) in 0..num_classes-1."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray

    @classmethod
    def empty(cls) -> Detections:
        return cls(np.zeros((0, 4), np.float32), np.zeros((0,), np.float32), np.zeros((0,), np.int64))

    def __len__(self) -> int:
        return len(self.scores)


def multiclass_nms(
    boxes: np.ndarray,
    scores: np.ndarray,
    score_thr: float = SCORE_THR,
    iou_thr: float = NMS_IOU,
    max_per_img: int = MAX_PER_IMG,
    num_classes: int = NUM_CLASSES,
    class_aware: bool = True,
) -> Detections:
    """NMS of one image's candidates, as the official `multiclass_nms`.

    boxes (K,4) and scores (K,C): every (candidate, class) pair above `score_thr` is a candidate
    detection. Class-aware (default), a pair competes only with pairs of its own class; classes at or
    beyond `num_classes` (a padding channel) take part, as in the official code, and are dropped after.
    Class-agnostic (`class_aware=False`, mmdet's `batched_nms(..., class_agnostic=True)`), the pairs of
    the model's classes all compete in one greedy NMS (a padding channel is left out first, so it
    suppresses nothing). The `max_per_img` best survivors are kept, highest score first.
    """
    cand, cls = np.nonzero(scores > score_thr)
    if not class_aware:
        real = cls < num_classes
        cand, cls = cand[real], cls[real]
    if cand.size == 0:
        return Detections.empty()
    sel_boxes = boxes[cand].astype(np.float64)
    sel_scores = scores[cand, cls].astype(np.float32)
    xywh = np.concatenate([sel_boxes[:, :2], sel_boxes[:, 2:] - sel_boxes[:, :2]], axis=1)
    if class_aware:
        keep = _per_class_nms(xywh, sel_scores, cls, score_thr, iou_thr)
    else:
        keep = _greedy_nms(xywh, sel_scores, score_thr, iou_thr)
    # order by score (descending, stable on ties) before truncating, as the official code does
    keep = keep[np.argsort(-sel_scores[keep], kind="stable")][:max_per_img]
    keep = keep[cls[keep] < num_classes]
    return Detections(sel_boxes[keep].astype(np.float32), sel_scores[keep], cls[keep].astype(np.int64))


def _greedy_nms(xywh: np.ndarray, scores: np.ndarray, score_thr: float, iou_thr: float) -> np.ndarray:
    """Indices kept by one greedy NMS in OpenCV (C++; highest score first, IoU > thr suppresses)."""
    survivors = cv2.dnn.NMSBoxes(xywh, scores, float(score_thr), float(iou_thr))
    return np.asarray(survivors, dtype=np.int64).reshape(-1)


def _per_class_nms(
    xywh: np.ndarray, scores: np.ndarray, cls: np.ndarray, score_thr: float, iou_thr: float
) -> np.ndarray:
    """Indices kept by one greedy NMS per class, class by class: per class the cost is candidates x
    survivors of that class, far below one batched NMS over all classes."""
    order = np.argsort(cls, kind="stable")
    kept = [
        group[_greedy_nms(xywh[group], scores[group], score_thr, iou_thr)]
        for group in np.split(order, np.flatnonzero(np.diff(cls[order])) + 1)
    ]
    return np.concatenate(kept)


def from_dets(dets: np.ndarray, labels: np.ndarray, num_classes: int = NUM_CLASSES) -> Detections:
    """NMS-in-graph outputs (R,5) + (R,) -> Detections, dropping padding rows and labels at or beyond
    `num_classes` (GFocalV2's 81st class)."""
    _, found = from_dets_rows(
        np.asarray(dets).reshape(1, -1, 5), np.asarray(labels).reshape(1, -1), num_classes
    )
    return found


def from_dets_rows(
    dets: np.ndarray, labels: np.ndarray, num_classes: int = NUM_CLASSES
) -> tuple[np.ndarray, Detections]:
    """`from_dets` of many images at once: (N,R,5) dets + (N,R) labels -> (image row 0..N-1 of each
    kept detection, the kept detections), in image order then row order, as image by image."""
    dets = np.asarray(dets, np.float32)
    labels = np.asarray(labels).reshape(dets.shape[:2]).astype(np.int64, copy=False)
    valid = (labels >= 0) & (labels < num_classes) & (dets[..., 4] > 0)
    rows = np.nonzero(valid)[0]
    kept = dets[valid]
    return rows, Detections(kept[:, :4], kept[:, 4], labels[valid])


def pad_dets(found: Detections, max_per_img: int = MAX_PER_IMG) -> tuple[np.ndarray, np.ndarray]:
    """Detections -> `dets` float32 (max_per_img, 5) x1,y1,x2,y2,score and `labels` int64 (max_per_img,).

    Rows past the detections are padding (score 0, label -1), which `from_dets` drops, so the pair
    round-trips exactly. More than `max_per_img` detections is an error (nothing is cut silently).
    """
    if len(found) > max_per_img:
        raise ValueError(
            f"{len(found)} detections do not fit in {max_per_img} rows; pass max_per_img >= {len(found)}"
        )
    dets = np.zeros((max_per_img, 5), np.float32)
    labels = np.full(max_per_img, -1, np.int64)
    dets[: len(found), :4] = found.boxes
    dets[: len(found), 4] = found.scores
    labels[: len(found)] = found.labels
    return dets, labels
