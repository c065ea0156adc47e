"""Turning raw head outputs into pre-NMS candidates (the official `_get_bboxes_single`, batched).

Written with traceable tensor ops only, so the same function runs in PyTorch, in the portable ONNX
graph and before Ascend's in-graph NMS.
"""

from __future__ import annotations

import torch

from gfocal_pipeline.constants import CLS_OUT_CHANNELS, NMS_PRE, REG_MAX, STRIDES
from gfocal_pipeline.nets.levels import level_sizes


def candidates_per_image(height: int, width: int, nms_pre: int = NMS_PRE) -> int:
    """How many candidates `decode_candidates` keeps per image (3267 for 800x1216)."""
    return sum(min(h * w, nms_pre) for h, w in level_sizes(height, width))


def anchor_centers(h: int, w: int, stride: int, device: torch.device | None = None) -> torch.Tensor:
    """(h*w, 2) centers (j*stride, i*stride), row-major, x fastest; no half-pixel offset."""
    ys = torch.arange(h, dtype=torch.float32, device=device) * stride
    xs = torch.arange(w, dtype=torch.float32, device=device) * stride
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=-1)


def integral(bbox_pred: torch.Tensor, project: torch.Tensor) -> torch.Tensor:
    """(..., 68) distribution logits -> (..., 4) expected distances (l, t, r, b) in stride units."""
    shape = bbox_pred.shape[:-1]
    prob = torch.softmax(bbox_pred.reshape(*shape, 4, REG_MAX + 1), dim=-1)
    return torch.nn.functional.linear(prob, project.view(1, -1)).squeeze(-1)


def distance2bbox(points: torch.Tensor, distance: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Centers (K,2) and distances (N,K,4) -> boxes (N,K,4), clamped to the input canvas."""
    x1 = (points[..., 0] - distance[..., 0]).clamp(0, width)
    y1 = (points[..., 1] - distance[..., 1]).clamp(0, height)
    x2 = (points[..., 0] + distance[..., 2]).clamp(0, width)
    y2 = (points[..., 1] + distance[..., 3]).clamp(0, height)
    return torch.stack([x1, y1, x2, y2], dim=-1)


def decode_candidates(
    cls_scores: list[torch.Tensor],
    bbox_preds: list[torch.Tensor],
    height: int,
    width: int,
    nms_pre: int = NMS_PRE,
    project: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per level keep the `nms_pre` anchors with the highest max score, decode their boxes.

    Kept anchors stay in raster order within a level. Returns boxes (N, K, 4) in input pixels and
    scores (N, K, 81) (all classifier channels; the 81st is the untrained padding class the
    official code keeps until `bbox2result`).
    """
    if project is None:
        project = torch.linspace(0, REG_MAX, REG_MAX + 1, device=cls_scores[0].device)
    all_boxes, all_scores = [], []
    for cls_score, bbox_pred, stride in zip(cls_scores, bbox_preds, STRIDES, strict=True):
        n, _, h, w = cls_score.shape
        scores = cls_score.permute(0, 2, 3, 1).reshape(n, h * w, CLS_OUT_CHANNELS)
        preds = bbox_pred.permute(0, 2, 3, 1).reshape(n, h * w, 4 * (REG_MAX + 1))
        points = anchor_centers(h, w, stride, cls_score.device)
        if h * w > nms_pre:
            top = scores.max(dim=-1).values.topk(nms_pre, dim=1).indices  # (n, nms_pre)
            # keep anchor order: the candidate order then does not depend on near-tied scores, so
            # PyTorch, ONNX Runtime and the NPU agree element by element
            top = top.sort(dim=1).values
            scores = scores.gather(1, top.unsqueeze(-1).expand(-1, -1, CLS_OUT_CHANNELS))
            preds = preds.gather(1, top.unsqueeze(-1).expand(-1, -1, preds.shape[-1]))
            points = points[top]  # (n, nms_pre, 2)
        distances = integral(preds, project) * stride
        all_boxes.append(distance2bbox(points, distances, height, width))
        all_scores.append(scores)
    return torch.cat(all_boxes, dim=1), torch.cat(all_scores, dim=1)
