"""YOLOX's building blocks with mmcv/mmdet parameter names: conv + BN + Swish, the Darknet bottleneck,
the CSP layer, the Focus stem and the SPP bottleneck (`mmdet/models/layers/csp_layer.py`,
`mmdet/models/backbones/csp_darknet.py`). Inference only: BN uses its running statistics."""

from __future__ import annotations

import torch
from torch import nn

from gfocal_pipeline.nets.layers import FrozenBatchNorm2d


class ConvBNSwish(nn.Module):
    """mmcv `ConvModule` with norm_cfg BN and act_cfg Swish: conv (no bias), BN, x * sigmoid(x);
    keys `conv.weight`, `bn.*`."""

    def __init__(
        self, c_in: int, c_out: int, kernel: int, stride: int = 1, eps: float = 1e-3, momentum: float = 0.03
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride, (kernel - 1) // 2, bias=False)
        self.bn = FrozenBatchNorm2d(c_out, eps=eps, momentum=momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))
        return x * torch.sigmoid(x)  # mmcv's Swish, written out as it is (not F.silu)


class DarknetBottleneck(nn.Module):
    """1x1 then 3x3 conv (expansion 1.0 inside a CSP layer), plus the input when `add_identity`."""

    def __init__(self, channels: int, add_identity: bool, **bn: float) -> None:
        super().__init__()
        self.conv1 = ConvBNSwish(channels, channels, 1, **bn)
        self.conv2 = ConvBNSwish(channels, channels, 3, **bn)
        self.add_identity = add_identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.conv1(x))
        return out + x if self.add_identity else out


class CSPLayer(nn.Module):
    """Cross Stage Partial layer (expand_ratio 0.5, no channel attention): main branch through the
    bottlenecks, short branch a 1x1 conv, concatenated (main first) and fused by `final_conv`."""

    def __init__(self, c_in: int, c_out: int, num_blocks: int, add_identity: bool, **bn: float) -> None:
        super().__init__()
        mid = int(c_out * 0.5)
        self.main_conv = ConvBNSwish(c_in, mid, 1, **bn)
        self.short_conv = ConvBNSwish(c_in, mid, 1, **bn)
        self.final_conv = ConvBNSwish(2 * mid, c_out, 1, **bn)
        self.blocks = nn.Sequential(*(DarknetBottleneck(mid, add_identity, **bn) for _ in range(num_blocks)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        main = self.blocks(self.main_conv(x))
        return self.final_conv(torch.cat((main, self.short_conv(x)), dim=1))


class Focus(nn.Module):
    """Space-to-depth stem: the four pixel phases (top-left, bottom-left, top-right, bottom-right, in
    that channel order) concatenated, then a 3x3 conv."""

    def __init__(self, c_in: int, c_out: int, kernel: int, **bn: float) -> None:
        super().__init__()
        self.conv = ConvBNSwish(4 * c_in, c_out, kernel, **bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        phases = (x[..., ::2, ::2], x[..., 1::2, ::2], x[..., ::2, 1::2], x[..., 1::2, 1::2])
        return self.conv(torch.cat(phases, dim=1))


class SPPBottleneck(nn.Module):
    """1x1 conv to half the channels, the input beside its max-pools (stride 1, same size), 1x1 conv."""

    def __init__(self, c_in: int, c_out: int, kernel_sizes: tuple[int, ...], **bn: float) -> None:
        super().__init__()
        mid = c_in // 2
        self.conv1 = ConvBNSwish(c_in, mid, 1, **bn)
        self.poolings = nn.ModuleList(nn.MaxPool2d(k, stride=1, padding=k // 2) for k in kernel_sizes)
        self.conv2 = ConvBNSwish(mid * (len(kernel_sizes) + 1), c_out, 1, **bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        return self.conv2(torch.cat([x] + [pool(x) for pool in self.poolings], dim=1))
