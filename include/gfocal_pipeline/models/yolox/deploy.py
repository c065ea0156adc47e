"""The exported forward of YOLOX: network + decode of every prior (mmdet's `YOLOXHead.predict_by_feat`).

Outputs are the project's portable candidates (NMS runs on the host): boxes (N, K, 4) x1y1x2y2 in input
pixels (not clamped, as mmdet) and scores (N, K, 80) with K = every prior of the three levels. mmdet
keeps ONE label per prior, the argmax of its sigmoid class scores, scored max class score x sigmoid
objectness; so a row of `scores` holds that score in the argmax column and 0 elsewhere, and the
generic host NMS (every (box, class) pair above score_thr, class-aware) keeps what mmdet keeps.
"""

from __future__ import annotations

import torch

from gfocal_pipeline.models.yolox.detector import YOLOX
from gfocal_pipeline.models.yolox.spec import YOLOX_S, YoloxSpec
from gfocal_pipeline.nets.layers import InputNormalization

OUTPUT_NAMES = ("boxes", "scores")


def level_priors(height: int, width: int, stride: int, offset: float = 0.0) -> torch.Tensor:
    """(height * width, 2) prior points (x, y) of one level in input pixels, row-major (x fastest), as
    mmdet's `MlvlPointGenerator` with offset 0: ((x + offset) * stride, (y + offset) * stride)."""
    ys = (torch.arange(height, dtype=torch.float32) + offset) * stride
    xs = (torch.arange(width, dtype=torch.float32) + offset) * stride
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=-1)


def grid_priors(sizes: list[tuple[int, int]], spec: YoloxSpec = YOLOX_S) -> list[torch.Tensor]:
    """The priors of every level for feature-map `sizes` (height, width) of strides 8, 16, 32."""
    if len(sizes) != len(spec.strides):
        raise ValueError(f"{len(sizes)} feature-map sizes for {len(spec.strides)} prior levels")
    return [level_priors(h, w, s, spec.center_offset) for (h, w), s in zip(sizes, spec.strides, strict=True)]


def decode_candidates(
    cls_scores: list[torch.Tensor],
    bbox_preds: list[torch.Tensor],
    objectnesses: list[torch.Tensor],
    spec: YoloxSpec = YOLOX_S,
    priors: list[torch.Tensor] | None = None,
    one_label: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode every prior: boxes (N, K, 4) and one-label scores (N, K, 80) (see the module docstring);
    with `one_label` False, every class's score x objectness (what the parity check compares the
    graph's one label with: a near-tie of two classes may pick either). None: the spec's
    `one_label_per_box`.

    `priors` (one (H*W, 2) tensor per level) are generated from the feature shapes when not given; an
    export passes them precomputed so that they become constants of the graph.
    """
    if priors is None:
        priors = grid_priors([(c.shape[2], c.shape[3]) for c in cls_scores], spec)
    one_label = spec.one_label_per_box if one_label is None else one_label
    all_boxes, all_scores = [], []
    for cls_score, bbox_pred, objectness, points, stride in zip(
        cls_scores, bbox_preds, objectnesses, priors, spec.strides, strict=True
    ):
        n = cls_score.shape[0]
        classes = cls_score.permute(0, 2, 3, 1).reshape(n, -1, spec.num_classes).sigmoid()
        deltas = bbox_pred.permute(0, 2, 3, 1).reshape(n, -1, 4)
        obj = objectness.permute(0, 2, 3, 1).reshape(n, -1).sigmoid()
        xy = deltas[..., :2] * stride + points.to(deltas.device)  # mmdet: no offset, no clamp
        wh = deltas[..., 2:].exp() * stride
        all_boxes.append(torch.cat([xy - wh / 2, xy + wh / 2], dim=-1))
        if not one_label:
            all_scores.append(classes * obj.unsqueeze(-1))
            continue
        best, label = classes.max(dim=-1)
        columns = torch.arange(spec.num_classes, device=classes.device)
        in_label = (columns == label.unsqueeze(-1)).to(classes.dtype)
        all_scores.append(in_label * (best * obj).unsqueeze(-1))
    return torch.cat(all_boxes, dim=1), torch.cat(all_scores, dim=1)


class YoloxDeploy(InputNormalization):
    """What goes into a portable ONNX file for YOLOX.

    Input: NCHW float32 BGR 0..255 (no mean/std) of `height` x `width`, or with `normalize_in_graph`
    NHWC uint8 BGR (a cv2 image), only permuted and cast inside the graph.
    """

    output_names = OUTPUT_NAMES

    def __init__(self, model: YOLOX, height: int, width: int, normalize_in_graph: bool = False) -> None:
        super().__init__(None, None, normalize_in_graph, channel_order="bgr")
        self.model = model
        self.spec = model.spec
        self.height = height
        self.width = width

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return decode_candidates(*self.model(self.network_input(x)), self.spec)
