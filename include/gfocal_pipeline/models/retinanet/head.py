"""RetinaHead: two towers of 3x3 conv + ReLU, a sigmoid classifier and a delta regressor per anchor."""

from __future__ import annotations

import torch
from torch import nn

from gfocal_pipeline.models.retinanet.spec import RETINANET_R50_FPN_1X, RetinaNetSpec
from gfocal_pipeline.nets.layers import ConvModule, tower


class RetinaHead(nn.Module):
    """Shared over levels; keys `cls_convs.i.conv.*`, `reg_convs.i.conv.*`, `retina_cls.*`, `retina_reg.*`.

    Output channels are anchor-major: channel `a * num_classes + c` is class `c` of base anchor `a`
    (and `a * 4 + k` delta `k`), so `permute(0, 2, 3, 1).reshape(n, -1, num_classes)` lists the
    anchors location by location in the anchor generator's order.
    """

    def __init__(self, spec: RetinaNetSpec = RETINANET_R50_FPN_1X) -> None:
        super().__init__()
        c = spec.feat_channels
        anchors = spec.anchors_per_location
        self.cls_convs = nn.ModuleList(
            ConvModule(c, c, 3, padding=1, relu=True) for _ in range(spec.stacked_convs)
        )
        self.reg_convs = nn.ModuleList(
            ConvModule(c, c, 3, padding=1, relu=True) for _ in range(spec.stacked_convs)
        )
        self.retina_cls = nn.Conv2d(c, anchors * spec.num_classes, 3, padding=1)
        self.retina_reg = nn.Conv2d(c, anchors * 4, 3, padding=1)

    def forward_single(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One level -> (class logits (N, A*80, H, W), deltas (N, A*4, H, W))."""
        cls_feat, reg_feat = tower(self.cls_convs, x), tower(self.reg_convs, x)
        return self.retina_cls(cls_feat), self.retina_reg(reg_feat)

    def forward(self, feats: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        outs = [self.forward_single(x) for x in feats]
        return [o[0] for o in outs], [o[1] for o in outs]
