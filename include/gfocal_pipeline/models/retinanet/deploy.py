"""The exported forward of RetinaNet: network + per-level pre-NMS selection + box decoding.

Outputs are the project's portable candidates (NMS runs on the host): boxes (N, K, 4) in input pixels
and sigmoid scores (N, K, 80). Traceable tensor ops only.
"""

from __future__ import annotations

import torch

from gfocal_pipeline.models.retinanet.anchors import AnchorGenerator
from gfocal_pipeline.models.retinanet.coder import delta2bbox
from gfocal_pipeline.models.retinanet.detector import RetinaNet
from gfocal_pipeline.models.retinanet.spec import RETINANET_R50_FPN_1X, RetinaNetSpec
from gfocal_pipeline.nets.layers import InputNormalization

OUTPUT_NAMES = ("boxes", "scores")


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (N, M, D), index (N, k) -> (N, k, D)."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def decode_candidates(
    cls_scores: list[torch.Tensor],
    bbox_preds: list[torch.Tensor],
    height: int,
    width: int,
    spec: RetinaNetSpec = RETINANET_R50_FPN_1X,
    anchors: list[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per level keep the `nms_pre` anchors with the highest max class score and decode their boxes.

    Kept anchors stay in anchor order within a level (so near-tied scores cannot reorder candidates
    between backends). Returns boxes (N, K, 4) clamped to `height` x `width` and scores (N, K, 80).
    `anchors` (one (H*W*A, 4) tensor per level) are generated from the feature shapes when not given;
    an export passes them precomputed so that they become constants of the graph.
    """
    if anchors is None:
        sizes = [(c.shape[2], c.shape[3]) for c in cls_scores]
        anchors = AnchorGenerator(spec).grid_anchors(sizes, cls_scores[0].device)
    all_boxes, all_scores = [], []
    for cls_score, bbox_pred, level_anchors in zip(cls_scores, bbox_preds, anchors, strict=True):
        n = cls_score.shape[0]
        scores = cls_score.permute(0, 2, 3, 1).reshape(n, -1, spec.num_classes).sigmoid()
        deltas = bbox_pred.permute(0, 2, 3, 1).reshape(n, -1, 4)
        keep_all = level_anchors.shape[0] <= spec.nms_pre
        level_anchors = level_anchors.expand(n, -1, -1)
        if not keep_all:
            top = scores.max(dim=-1).values.topk(spec.nms_pre, dim=1).indices.sort(dim=1).values
            scores, deltas = _gather(scores, top), _gather(deltas, top)
            level_anchors = _gather(level_anchors, top)
        all_boxes.append(delta2bbox(level_anchors, deltas, height, width, spec))
        all_scores.append(scores)
    return torch.cat(all_boxes, dim=1), torch.cat(all_scores, dim=1)


class RetinaNetDeploy(InputNormalization):
    """What goes into a portable ONNX file for RetinaNet.

    Input: NCHW float32 normalized RGB of `height` x `width`, or with `normalize_in_graph` NHWC uint8
    BGR (a cv2 image) normalized inside the graph with the spec's mean/std.
    """

    output_names = OUTPUT_NAMES

    def __init__(self, model: RetinaNet, height: int, width: int, normalize_in_graph: bool = False) -> None:
        super().__init__(model.spec.mean_rgb, model.spec.std_rgb, normalize_in_graph)
        self.model = model
        self.spec = model.spec
        self.height = height
        self.width = width

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cls_scores, bbox_preds = self.model(self.network_input(x))
        return decode_candidates(cls_scores, bbox_preds, self.height, self.width, self.spec)
