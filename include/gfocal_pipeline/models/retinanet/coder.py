"""DeltaXYWHBBoxCoder decoding: (dx, dy, dw, dh) deltas applied to anchors, clamped to the image."""

from __future__ import annotations

import math

import torch

from gfocal_pipeline.models.retinanet.spec import RETINANET_R50_FPN_1X, RetinaNetSpec


def delta2bbox(
    anchors: torch.Tensor,
    deltas: torch.Tensor,
    height: int,
    width: int,
    spec: RetinaNetSpec = RETINANET_R50_FPN_1X,
) -> torch.Tensor:
    """Anchors (..., 4) x1y1x2y2 and deltas (..., 4) -> boxes (..., 4) clamped to `height` x `width`.

    Centers move by (dx, dy) times the anchor size; sizes scale by exp(dw, dh), with dw/dh clipped to
    |log(wh_ratio_clip)| so no box grows or shrinks by more than 1000/16. Width is x2 - x1 (no +1).
    """
    means = deltas.new_tensor(spec.target_means)
    stds = deltas.new_tensor(spec.target_stds)
    deltas = deltas * stds + means
    limit = abs(math.log(spec.wh_ratio_clip))
    anchor_xy = (anchors[..., :2] + anchors[..., 2:]) * 0.5
    anchor_wh = anchors[..., 2:] - anchors[..., :2]
    xy = anchor_xy + anchor_wh * deltas[..., :2]
    wh = anchor_wh * deltas[..., 2:].clamp(min=-limit, max=limit).exp()
    x1y1, x2y2 = xy - wh * 0.5, xy + wh * 0.5
    x1 = x1y1[..., 0].clamp(0, width)
    y1 = x1y1[..., 1].clamp(0, height)
    x2 = x2y2[..., 0].clamp(0, width)
    y2 = x2y2[..., 1].clamp(0, height)
    return torch.stack([x1, y1, x2, y2], dim=-1)
