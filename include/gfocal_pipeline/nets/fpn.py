"""FPN as configured for GFocalV2: start_level 1, extra convs on the P5 output, 5 outputs (P3..P7).

`extra_source="on_input"` (RetinaNet) feeds the first extra conv with C5 instead of the P5 output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gfocal_pipeline.constants import FPN_IN_CHANNELS, FPN_OUT_CHANNELS
from gfocal_pipeline.nets.layers import ConvModule

START_LEVEL = 1
NUM_OUTS = 5
EXTRA_SOURCES = ("on_output", "on_input")


class FPN(nn.Module):
    def __init__(self, extra_source: str = "on_output") -> None:
        super().__init__()
        if extra_source not in EXTRA_SOURCES:
            raise ValueError(
                f"unknown extra_source {extra_source!r}; choose one of {', '.join(EXTRA_SOURCES)}"
            )
        self.extra_source = extra_source
        c = FPN_OUT_CHANNELS
        used = FPN_IN_CHANNELS[START_LEVEL:]
        self.lateral_convs = nn.ModuleList(ConvModule(ch, c, 1) for ch in used)
        convs = [ConvModule(c, c, 3, padding=1) for _ in used]
        # extra levels: stride-2 convs fed by the previous output (the first by C5 with 'on_input'),
        # no ReLU in between
        extra_in = [used[-1] if extra_source == "on_input" else c] + [c] * (NUM_OUTS - len(used) - 1)
        convs += [ConvModule(ch, c, 3, stride=2, padding=1) for ch in extra_in]
        self.fpn_convs = nn.ModuleList(convs)

    def forward(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        laterals = [conv(inputs[i + START_LEVEL]) for i, conv in enumerate(self.lateral_convs)]
        for i in range(len(laterals) - 1, 0, -1):
            size = laterals[i - 1].shape[2:]
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=size, mode="nearest")
        outs = [self.fpn_convs[i](lat) for i, lat in enumerate(laterals)]
        source = inputs[-1] if self.extra_source == "on_input" else outs[-1]
        for conv in self.fpn_convs[len(laterals) :]:
            outs.append(conv(source))
            source = outs[-1]
        return outs
