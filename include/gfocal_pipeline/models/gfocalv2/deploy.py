"""The exported forward: GFocalV2 + decode, ending either in candidates (portable) or Ascend NMS."""

from __future__ import annotations

import torch

from gfocal_pipeline.constants import MAX_PER_IMG, MEAN_RGB, NMS_IOU, NUM_CLASSES, SCORE_THR, STD_RGB
from gfocal_pipeline.models.gfocalv2.decode import decode_candidates
from gfocal_pipeline.models.gfocalv2.detector import GFocalV2
from gfocal_pipeline.nets.ascend_nms import ASCEND_OUTPUTS, PORTABLE_OUTPUTS, VARIANTS, BatchMultiClassNMS
from gfocal_pipeline.nets.layers import InputNormalization


class DeployModel(InputNormalization):
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
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
        super().__init__(MEAN_RGB, STD_RGB, normalize_in_graph)
        self.model = model
        self.variant = variant
        self.height = height
        self.width = width
        self.max_per_img = MAX_PER_IMG  # rows of the ascend variant's dets/labels

    @property
    def output_names(self) -> tuple[str, ...]:
        return PORTABLE_OUTPUTS if self.variant == "portable" else ASCEND_OUTPUTS

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cls_scores, bbox_preds = self.model(self.network_input(x))
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
