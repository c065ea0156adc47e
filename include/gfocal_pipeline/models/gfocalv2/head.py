"""GFocalV2 head: GN towers, 81-channel classifier, distribution regression and the DGQP quality branch."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from gfocal_pipeline.constants import (
    CLS_OUT_CHANNELS,
    FPN_OUT_CHANNELS,
    GN_GROUPS,
    REG_CHANNELS,
    REG_MAX,
    REG_TOPK,
    STRIDES,
)
from gfocal_pipeline.nets.layers import ConvModule, Scale, tower

STACKED_CONVS = 4


class Integral(nn.Module):
    """Expected value of a discrete distribution over 0..reg_max; keeps the `project` buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("project", torch.linspace(0, REG_MAX, REG_MAX + 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., 4 * (reg_max + 1)) logits -> (..., 4) distances in stride units."""
        shape = x.shape[:-1]
        prob = F.softmax(x.reshape(*shape, 4, REG_MAX + 1), dim=-1)
        # a 2-D weight (as in the Ascend export patch) lowers to MatMul on every backend
        return F.linear(prob, self.project.view(1, -1)).squeeze(-1)


def full_precision(x: torch.Tensor) -> contextlib.AbstractContextManager[object]:
    """Autocast off while inside an autocast region of `x`'s device (a no-op otherwise, so the float32
    path, the traced export included, runs exactly the same ops)."""
    kind = x.device.type
    if torch.is_autocast_enabled(kind):
        return torch.autocast(device_type=kind, enabled=False)
    return contextlib.nullcontext()


class GFocalHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        c = FPN_OUT_CHANNELS
        self.cls_convs = nn.ModuleList(
            ConvModule(c, c, 3, padding=1, gn_groups=GN_GROUPS, relu=True) for _ in range(STACKED_CONVS)
        )
        self.reg_convs = nn.ModuleList(
            ConvModule(c, c, 3, padding=1, gn_groups=GN_GROUPS, relu=True) for _ in range(STACKED_CONVS)
        )
        self.gfl_cls = nn.Conv2d(c, CLS_OUT_CHANNELS, 3, padding=1)
        self.gfl_reg = nn.Conv2d(c, 4 * (REG_MAX + 1), 3, padding=1)
        self.scales = nn.ModuleList(Scale(1.0) for _ in STRIDES)
        total_dim = REG_TOPK + 1  # top-k probabilities plus their mean
        self.reg_conf = nn.Sequential(
            nn.Conv2d(4 * total_dim, REG_CHANNELS, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(REG_CHANNELS, 1, 1),
            nn.Sigmoid(),
        )
        self.integral = Integral()

    def forward_single(self, x: torch.Tensor, scale: Scale) -> tuple[torch.Tensor, torch.Tensor]:
        """One level -> (cls_score (N,81,H,W) probabilities, bbox_pred (N,68,H,W) logits)."""
        cls_feat, reg_feat = tower(self.cls_convs, x), tower(self.reg_convs, x)
        bbox_pred = scale(self.gfl_reg(reg_feat)).float()
        n, _, h, w = bbox_pred.shape
        # DGQP statistics; top-k taken on the last axis (Ascend's TopK only supports it) - same numbers
        prob = F.softmax(bbox_pred.reshape(n, 4, REG_MAX + 1, h, w), dim=2).permute(0, 1, 3, 4, 2)
        topk = prob.topk(REG_TOPK, dim=-1).values
        stat = torch.cat([topk, topk.mean(dim=-1, keepdim=True)], dim=-1)  # (n,4,h,w,5)
        stat = stat.permute(0, 1, 4, 2, 3).reshape(n, 4 * (REG_TOPK + 1), h, w)
        # under fp16 autocast the towers and the classifier run in half; the quality branch and
        # sigmoid(logits) x quality (what the ranking is decided on) in float32
        with full_precision(stat):
            quality = self.reg_conf(stat)
        logits = self.gfl_cls(cls_feat)
        if logits.dtype != torch.float32:
            logits = logits.float()
        cls_score = logits.sigmoid() * quality
        return cls_score, bbox_pred

    def forward(self, feats: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        outs = [self.forward_single(x, s) for x, s in zip(feats, self.scales, strict=True)]
        return [o[0] for o in outs], [o[1] for o in outs]
