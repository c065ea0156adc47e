"""YOLOXHead: per level (no sharing) a decoupled head: two 3x3 towers, a 1x1 classifier on the cls
tower, 1x1 box regressor and objectness on the reg tower; mmdet's parameter names."""

from __future__ import annotations

from itertools import pairwise

import torch
from torch import nn

from gfocal_pipeline.models.yolox.layers import ConvBNSwish
from gfocal_pipeline.models.yolox.spec import YOLOX_S, YoloxSpec

Heads = tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]


class YOLOXHead(nn.Module):
    """Keys `multi_level_{cls,reg}_convs.<level>.<i>.*`, `multi_level_conv_{cls,reg,obj}.<level>.*`."""

    def __init__(self, spec: YoloxSpec = YOLOX_S) -> None:
        super().__init__()
        bn = {"eps": spec.bn_eps, "momentum": spec.bn_momentum}
        c, levels = spec.feat_channels, range(len(spec.strides))

        def tower() -> nn.Sequential:
            chans = [spec.neck_out_channels] + [c] * spec.stacked_convs
            return nn.Sequential(*(ConvBNSwish(a, b, 3, **bn) for a, b in pairwise(chans)))

        self.multi_level_cls_convs = nn.ModuleList(tower() for _ in levels)
        self.multi_level_reg_convs = nn.ModuleList(tower() for _ in levels)
        self.multi_level_conv_cls = nn.ModuleList(nn.Conv2d(c, spec.num_classes, 1) for _ in levels)
        self.multi_level_conv_reg = nn.ModuleList(nn.Conv2d(c, 4, 1) for _ in levels)
        self.multi_level_conv_obj = nn.ModuleList(nn.Conv2d(c, 1, 1) for _ in levels)

    def forward(self, feats: list[torch.Tensor]) -> Heads:
        """Per level: class logits (N,80,H,W), box offsets (N,4,H,W), objectness logits (N,1,H,W)."""
        cls_scores, bbox_preds, objectnesses = [], [], []
        for level, x in enumerate(feats):
            cls_feat = self.multi_level_cls_convs[level](x)
            reg_feat = self.multi_level_reg_convs[level](x)
            cls_scores.append(self.multi_level_conv_cls[level](cls_feat))
            bbox_preds.append(self.multi_level_conv_reg[level](reg_feat))
            objectnesses.append(self.multi_level_conv_obj[level](reg_feat))
        return cls_scores, bbox_preds, objectnesses
