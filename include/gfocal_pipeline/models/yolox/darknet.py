"""CSPDarknet (arch P5) and YOLOXPAFPN as mmdet builds them for YOLOX, with mmdet's parameter names."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gfocal_pipeline.models.yolox.layers import ConvBNSwish, CSPLayer, Focus, SPPBottleneck
from gfocal_pipeline.models.yolox.spec import YOLOX_S, YoloxSpec

# CSPDarknet.arch_settings['P5']: in, out channels, blocks, add_identity, use_spp (before widening)
ARCH_P5 = (
    (64, 128, 3, True, False),
    (128, 256, 9, True, False),
    (256, 512, 9, True, False),
    (512, 1024, 3, False, True),
)


def _bn(spec: YoloxSpec) -> dict[str, float]:
    return {"eps": spec.bn_eps, "momentum": spec.bn_momentum}


class CSPDarknet(nn.Module):
    """Focus stem + 4 stages (3x3 stride-2 conv, SPP on the last, CSP layer); keys `stem.*`,
    `stage{i}.{j}.*`; returns the outputs of `out_indices` (stem = 0: stages 2-4, strides 8/16/32)."""

    def __init__(self, spec: YoloxSpec = YOLOX_S) -> None:
        super().__init__()
        bn, widen = _bn(spec), spec.widen_factor
        self.out_indices = spec.out_indices
        self.stem = Focus(3, int(ARCH_P5[0][0] * widen), 3, **bn)
        self.layers = ["stem"]
        for i, (c_in, c_out, blocks, add_identity, use_spp) in enumerate(ARCH_P5):
            c_in, c_out = int(c_in * widen), int(c_out * widen)
            blocks = max(round(blocks * spec.deepen_factor), 1)
            stage: list[nn.Module] = [ConvBNSwish(c_in, c_out, 3, stride=2, **bn)]
            if use_spp:
                stage.append(SPPBottleneck(c_out, c_out, spec.spp_kernel_sizes, **bn))
            stage.append(CSPLayer(c_out, c_out, blocks, add_identity, **bn))
            self.add_module(f"stage{i + 1}", nn.Sequential(*stage))
            self.layers.append(f"stage{i + 1}")

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for i, name in enumerate(self.layers):
            x = getattr(self, name)(x)
            if i in self.out_indices:
                outs.append(x)
        return outs


class YOLOXPAFPN(nn.Module):
    """Top-down (1x1 reduce, nearest 2x upsample, CSP) then bottom-up (3x3 stride-2 conv, CSP) paths,
    then a 1x1 conv per level to `neck_out_channels`; keys `reduce_layers`, `top_down_blocks`,
    `downsamples`, `bottom_up_blocks`, `out_convs`."""

    def __init__(self, spec: YoloxSpec = YOLOX_S) -> None:
        super().__init__()
        bn, ch, blocks = _bn(spec), spec.neck_in_channels, spec.neck_csp_blocks
        top = range(len(ch) - 1, 0, -1)
        self.reduce_layers = nn.ModuleList(ConvBNSwish(ch[i], ch[i - 1], 1, **bn) for i in top)
        self.top_down_blocks = nn.ModuleList(
            CSPLayer(ch[i - 1] * 2, ch[i - 1], blocks, False, **bn) for i in top
        )
        bottom = range(len(ch) - 1)
        self.downsamples = nn.ModuleList(ConvBNSwish(ch[i], ch[i], 3, stride=2, **bn) for i in bottom)
        self.bottom_up_blocks = nn.ModuleList(
            CSPLayer(ch[i] * 2, ch[i + 1], blocks, False, **bn) for i in bottom
        )
        self.out_convs = nn.ModuleList(ConvBNSwish(c, spec.neck_out_channels, 1, **bn) for c in ch)

    def forward(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        # inner[0] is the current top; each step replaces it by its reduced form, then prepends
        inner = [inputs[-1]]
        for step, low in enumerate(reversed(inputs[:-1])):
            inner[0] = self.reduce_layers[step](inner[0])
            up = F.interpolate(inner[0], scale_factor=2.0, mode="nearest")
            inner.insert(0, self.top_down_blocks[step](torch.cat([up, low], 1)))
        outs = [inner[0]]
        for i in range(len(inputs) - 1):
            down = self.downsamples[i](outs[-1])
            outs.append(self.bottom_up_blocks[i](torch.cat([down, inner[i + 1]], 1)))
        return [conv(out) for conv, out in zip(self.out_convs, outs, strict=True)]
