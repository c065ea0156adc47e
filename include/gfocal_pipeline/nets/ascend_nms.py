"""The export variants, their output names, and Ascend's `BatchMultiClassNMS` as a traceable op."""

from __future__ import annotations

import torch

VARIANTS = ("portable", "ascend")
PORTABLE_OUTPUTS = ("boxes", "scores")
ASCEND_OUTPUTS = ("dets", "labels")
NMS_OP = "BatchMultiClassNMS"


class BatchMultiClassNMS(torch.autograd.Function):
    """Ascend's `BatchMultiClassNMS` custom operator (only meaningful in the exported graph).

    The eager forward returns correctly shaped placeholders so tracing works; the op itself runs on
    the NPU (or in the test emulator), never in PyTorch.
    """

    @staticmethod
    def forward(ctx, boxes, scores, score_thr, iou_thr, max_per_class, max_total):
        n = boxes.shape[0]
        nmsed_boxes = boxes[:, :max_total, 0, :].contiguous()
        nmsed_scores = scores[:, :max_total, 0].contiguous()
        nmsed_classes = torch.zeros_like(nmsed_scores)
        nmsed_num = torch.full((n, 8), max_total, dtype=torch.int32)
        return nmsed_boxes, nmsed_scores, nmsed_classes, nmsed_num

    @staticmethod
    def symbolic(g, boxes, scores, score_thr, iou_thr, max_per_class, max_total):
        return g.op(
            NMS_OP,
            boxes,
            scores,
            score_threshold_f=float(score_thr),
            iou_threshold_f=float(iou_thr),
            max_size_per_class_i=int(max_per_class),
            max_total_size_i=int(max_total),
            outputs=4,
        )
