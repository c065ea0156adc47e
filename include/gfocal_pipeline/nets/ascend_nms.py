"""The export variants, their output names, and Ascend's `BatchMultiClassNMS` as a traceable op."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

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


def candidates_nms(
    boxes: torch.Tensor, scores: torch.Tensor, score_thr: float, iou_thr: float, max_per_img: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidates (boxes (N,K,4), scores (N,K,C) of sigmoid classes) -> Ascend's in-graph NMS: dets
    (N, max_per_img, 5) and labels (N, max_per_img). As the GFocalV2 ascend variant: a zero background
    column appended to the scores, boxes as (N, K, 1, 4), both cast to fp16 for `BatchMultiClassNMS`."""
    scores = torch.cat([scores, torch.zeros_like(scores[..., :1])], dim=-1)
    nms = BatchMultiClassNMS.apply(
        boxes.unsqueeze(2).half(), scores.half(), score_thr, iou_thr, max_per_img, max_per_img
    )
    return torch.cat([nms[0].float(), nms[1].float().unsqueeze(-1)], dim=-1), nms[2].long()


class CandidatesExport(nn.Module):
    """Base of an adapter's export module for a model with candidate outputs: the variant and the facts
    `export.export_graph` reads (`height`, `width`, `normalize_in_graph`, `max_per_img`,
    `output_names`), per-level constants frozen for the exported size (`freeze_levels`, `levels`), and
    the variant's tail (`finish`: the candidates as they are, or Ascend's NMS with the spec's
    thresholds). `deploy` has `spec` (score_thr, nms_iou, max_per_img, strides), `height`, `width` and
    `normalize_in_graph`."""

    def __init__(self, deploy: Any, variant: str = "portable") -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
        self.deploy = deploy
        self.variant = variant
        self.spec = deploy.spec
        self.height, self.width = deploy.height, deploy.width
        self.normalize_in_graph = deploy.normalize_in_graph
        self.max_per_img = self.spec.max_per_img  # rows of the ascend variant's dets/labels

    @property
    def output_names(self) -> tuple[str, ...]:
        return PORTABLE_OUTPUTS if self.variant == "portable" else ASCEND_OUTPUTS

    def freeze_levels(self, name: str, tensors: list[torch.Tensor]) -> None:
        """Keep one tensor per level as buffers `<name>_<level>` (constants of the traced graph)."""
        for level, tensor in enumerate(tensors):
            self.register_buffer(f"{name}_{level}", tensor, persistent=False)

    def levels(self, name: str) -> list[torch.Tensor]:
        """The per-level tensors frozen as `name`, in level order."""
        return [getattr(self, f"{name}_{level}") for level in range(len(self.spec.strides))]

    def finish(self, boxes: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The variant's outputs of the decoded candidates."""
        if self.variant == "portable":
            return boxes, scores
        spec = self.spec
        return candidates_nms(boxes, scores, spec.score_thr, spec.nms_iou, spec.max_per_img)
