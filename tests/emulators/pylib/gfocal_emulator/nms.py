"""Ascend `BatchMultiClassNMS` in numpy, with the fp16 data types of the NPU op.

Inputs: boxes (B, M, q, 4) with q = 1 (shared by all classes) or q = C, scores (B, M, C), both fp16.
Per image and class: candidates with score > score_threshold, greedy suppression of boxes whose IoU
with a kept box exceeds iou_threshold (no +1 in widths), at most max_size_per_class kept. All classes
are then merged, ordered by score (descending; ties keep class, then candidate order) and cut to
max_total_size. Outputs are zero-padded: boxes (B, T, 4), scores (B, T), classes (B, T) as fp16,
and num (B, 8) int32 holding the count of valid rows.
"""

from __future__ import annotations

import numpy as np


def _greedy(boxes: np.ndarray, iou_threshold: float, limit: int) -> list[int]:
    """Indices (into score-sorted `boxes`) kept by greedy NMS, at most `limit`."""
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    areas = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    alive = np.ones(len(boxes), dtype=bool)
    kept: list[int] = []
    for i in range(len(boxes)):
        if not alive[i]:
            continue
        kept.append(i)
        if len(kept) >= limit:
            break
        rest = np.nonzero(alive[i + 1 :])[0] + i + 1
        if rest.size == 0:
            break
        w = np.clip(np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]), 0, None)
        h = np.clip(np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]), 0, None)
        inter = w * h
        union = areas[i] + areas[rest] - inter
        iou = np.where(union > 0, inter / np.where(union > 0, union, 1), 0)
        alive[rest[iou > iou_threshold]] = False
    return kept


def batch_multiclass_nms(
    boxes: np.ndarray,
    scores: np.ndarray,
    score_threshold: float,
    iou_threshold: float,
    max_size_per_class: int,
    max_total_size: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    boxes = np.asarray(boxes, np.float16)
    scores = np.asarray(scores, np.float16)
    batch, count, classes = scores.shape
    if boxes.ndim != 4 or boxes.shape[:2] != (batch, count) or boxes.shape[2] not in (1, classes):
        raise ValueError(f"boxes {boxes.shape} do not fit scores {scores.shape} (want (B,M,1|C,4))")
    out_boxes = np.zeros((batch, max_total_size, 4), np.float16)
    out_scores = np.zeros((batch, max_total_size), np.float16)
    out_classes = np.zeros((batch, max_total_size), np.float16)
    out_num = np.zeros((batch, 8), np.int32)
    for b in range(batch):
        image_boxes = boxes[b].astype(np.float32)
        image_scores = scores[b].astype(np.float32)
        found_scores, found_classes, found_boxes = [], [], []
        for c in range(classes):
            column = image_scores[:, c]
            candidates = np.nonzero(column > score_threshold)[0]
            if candidates.size == 0:
                continue
            order = candidates[np.argsort(-column[candidates], kind="stable")]
            class_boxes = image_boxes[order, 0 if image_boxes.shape[1] == 1 else c]
            keep = _greedy(class_boxes, iou_threshold, max_size_per_class)
            found_scores.append(column[order[keep]])
            found_classes.append(np.full(len(keep), c))
            found_boxes.append(class_boxes[keep])
        if not found_scores:
            continue
        all_scores = np.concatenate(found_scores)
        top = np.argsort(-all_scores, kind="stable")[:max_total_size]
        n = len(top)
        out_scores[b, :n] = all_scores[top]
        out_classes[b, :n] = np.concatenate(found_classes)[top]
        out_boxes[b, :n] = np.concatenate(found_boxes)[top]
        out_num[b, :] = n
    return out_boxes, out_scores, out_classes, out_num
