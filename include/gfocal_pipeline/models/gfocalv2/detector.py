"""The GFL detector: backbone + neck + head, returning raw per-level head outputs."""

from __future__ import annotations

import torch
from torch import nn

from gfocal_pipeline.models.gfocalv2.head import GFocalHead
from gfocal_pipeline.nets.fpn import FPN
from gfocal_pipeline.nets.resnet import ResNet50


class GFocalV2(nn.Module):
    """State-dict keys: `backbone.*`, `neck.*`, `bbox_head.*` exactly as in `gfocal_r50_fpn_1x.pth`."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = ResNet50()
        self.neck = FPN()
        self.bbox_head = GFocalHead()

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Backbone + neck: P3..P7."""
        return self.neck(self.backbone(x))

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return self.bbox_head(self.features(x))


def build_model() -> GFocalV2:
    """A GFocalV2 in eval mode (frozen BN, no dropout); weights are uninitialized until loaded."""
    return GFocalV2().eval()
