"""The YOLOX detector: CSPDarknet + YOLOXPAFPN + YOLOXHead, raw per-level outputs."""

from __future__ import annotations

import torch
from torch import nn

from gfocal_pipeline.models.yolox.darknet import YOLOXPAFPN, CSPDarknet
from gfocal_pipeline.models.yolox.head import Heads, YOLOXHead
from gfocal_pipeline.models.yolox.spec import YOLOX_S, YoloxSpec


class YOLOX(nn.Module):
    """State-dict keys `backbone.*`, `neck.*`, `bbox_head.*` exactly as in mmdet's YOLOX checkpoint."""

    def __init__(self, spec: YoloxSpec = YOLOX_S) -> None:
        super().__init__()
        self.spec = spec
        self.backbone = CSPDarknet(spec)
        self.neck = YOLOXPAFPN(spec)
        self.bbox_head = YOLOXHead(spec)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Backbone + neck: the three levels of strides 8, 16, 32."""
        return self.neck(self.backbone(x))

    def forward(self, x: torch.Tensor) -> Heads:
        """NCHW BGR 0..255 -> per-level class logits, box offsets, objectness logits."""
        return self.bbox_head(self.features(x))


def build_yolox(spec: YoloxSpec = YOLOX_S) -> YOLOX:
    """A YOLOX in eval mode; weights are uninitialized until loaded."""
    return YOLOX(spec).eval()
