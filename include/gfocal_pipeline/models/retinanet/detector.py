"""The RetinaNet detector: ResNet-50 + FPN (extra levels from C5) + RetinaHead, raw per-level outputs."""

from __future__ import annotations

import torch
from torch import nn

from gfocal_pipeline.models.retinanet.head import RetinaHead
from gfocal_pipeline.models.retinanet.spec import RETINANET_R50_FPN_1X, RetinaNetSpec
from gfocal_pipeline.nets.fpn import FPN
from gfocal_pipeline.nets.resnet import ResNet50


class RetinaNet(nn.Module):
    """State-dict keys `backbone.*`, `neck.*`, `bbox_head.*` exactly as in mmdet's RetinaNet checkpoint."""

    def __init__(self, spec: RetinaNetSpec = RETINANET_R50_FPN_1X) -> None:
        super().__init__()
        self.spec = spec
        self.backbone = ResNet50()
        self.neck = FPN(extra_source=spec.fpn_extra_source)
        self.bbox_head = RetinaHead(spec)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Backbone + neck: P3..P7."""
        return self.neck(self.backbone(x))

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Normalized NCHW RGB -> per-level class logits (N, A*80, H, W) and deltas (N, A*4, H, W)."""
        return self.bbox_head(self.features(x))


def build_retinanet(spec: RetinaNetSpec = RETINANET_R50_FPN_1X) -> RetinaNet:
    """A RetinaNet in eval mode (frozen BN); weights are uninitialized until loaded."""
    return RetinaNet(spec).eval()
