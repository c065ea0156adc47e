"""The exported forward: GFocalV2 + decode, ending either in candidates (portable) or Ascend NMS."""

from __future__ import annotations

import torch
from torch import nn

from gfocal_pipeline.constants import MAX_PER_IMG, MEAN_RGB, NMS_IOU, NUM_CLASSES, SCORE_THR, STD_RGB
from gfocal_pipeline.decode import decode_candidates
from gfocal_pipeline.model.detector import GFocalV2
from gfocal_pipeline.model.layers import bgr_nhwc_to_normalized

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


class DeployModel(nn.Module):
    """What goes into the ONNX file.

    - input: NCHW float32 normalized RGB, or with `normalize_in_graph` NHWC uint8 BGR (the layout of
      a cv2 image and of AIPP's RGB888_U8), normalized inside the graph.
    - `portable`: boxes (N,K,4) in input pixels and scores (N,K,80); NMS runs on the host.
    - `ascend`: dets (N,100,5) and labels (N,100) from the in-graph `BatchMultiClassNMS` with the
      seed's fp16 casts.
    """

    def __init__(
        self,
        model: GFocalV2,
        variant: str,
        height: int,
        width: int,
        normalize_in_graph: bool = False,
    ) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
        self.model = model
        self.variant = variant
        self.height = height
        self.width = width
        self.normalize_in_graph = normalize_in_graph
        self.register_buffer("mean", torch.tensor(MEAN_RGB).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(STD_RGB).view(1, 3, 1, 1), persistent=False)

    @property
    def output_names(self) -> tuple[str, ...]:
        return PORTABLE_OUTPUTS if self.variant == "portable" else ASCEND_OUTPUTS

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """NHWC uint8 BGR -> NCHW float32 normalized RGB."""
        return bgr_nhwc_to_normalized(x, self.mean, self.std)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.normalize_in_graph:
            x = self.normalize(x)
        cls_scores, bbox_preds = self.model(x)
        boxes, scores = decode_candidates(
            cls_scores, bbox_preds, self.height, self.width, project=self.model.bbox_head.integral.project
        )
        if self.variant == "portable":
            return boxes, scores[..., :NUM_CLASSES]
        # the seed appends a zero background column (82 classes) and runs NMS in fp16
        scores = torch.cat([scores, torch.zeros_like(scores[..., :1])], dim=-1)
        nmsed_boxes, nmsed_scores, nmsed_classes, _ = BatchMultiClassNMS.apply(
            boxes.unsqueeze(2).half(), scores.half(), SCORE_THR, NMS_IOU, MAX_PER_IMG, MAX_PER_IMG
        )
        dets = torch.cat([nmsed_boxes.float(), nmsed_scores.float().unsqueeze(-1)], dim=-1)
        return dets, nmsed_classes.long()
