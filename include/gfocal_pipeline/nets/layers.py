"""Small building blocks whose parameter names follow mmcv (`conv`, `gn`, `scale`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FrozenBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm that always normalizes with its running statistics (mmdet's `norm_eval=True`).

    Subclassing `nn.BatchNorm2d` keeps the checkpoint keys (`weight`, `bias`, `running_mean`,
    `running_var`, `num_batches_tracked`) exactly as in the official file.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )


class ConvModule(nn.Module):
    """Conv2d, optionally followed by GroupNorm and ReLU; keys `conv.*` and `gn.*` as in mmcv."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        gn_groups: int | None = None,
        relu: bool = False,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=gn_groups is None)
        self.gn = nn.GroupNorm(gn_groups, out_channels) if gn_groups else None
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.gn is not None:
            x = self.gn(x)
        return F.relu(x) if self.relu else x


class Scale(nn.Module):
    """A learnable scalar (mmcv `Scale`): a 0-dim parameter named `scale`."""

    def __init__(self, value: float = 1.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(value, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def bgr_nhwc_to_normalized(
    x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, swap: bool = True
) -> torch.Tensor:
    """NHWC uint8 BGR (a cv2 image) -> NCHW float32 normalized with (1,3,1,1) `mean` and `std`, RGB
    when `swap` (else BGR): the in-graph normalization of an export that takes raw images."""
    x = x.permute(0, 3, 1, 2)
    if swap:
        x = x[:, [2, 1, 0]]
    return (x.float() - mean) / std


class InputNormalization(nn.Module):
    """Base of a deploy module whose input may be raw images: `mean` / `std` (1,3,1,1) buffers (not
    in the state dict; None: 0 / 1) and `network_input`, which normalizes NHWC uint8 BGR in the graph
    when `normalize_in_graph` (into `channel_order`), else passes the normalized NCHW float32 input
    through."""

    def __init__(
        self,
        mean: tuple[float, ...] | None,
        std: tuple[float, ...] | None,
        normalize_in_graph: bool,
        channel_order: str = "rgb",
    ) -> None:
        super().__init__()
        self.normalize_in_graph = normalize_in_graph
        self.swaps_channels = channel_order == "rgb"
        mean, std = mean or (0.0, 0.0, 0.0), std or (1.0, 1.0, 1.0)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """NHWC uint8 BGR -> NCHW float32 normalized, in the network's channel order."""
        return bgr_nhwc_to_normalized(x, self.mean, self.std, self.swaps_channels)

    def network_input(self, x: torch.Tensor) -> torch.Tensor:
        return self.normalize(x) if self.normalize_in_graph else x


def tower(convs: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    """`x` through a head's stacked convs in order (a cls or reg tower)."""
    for conv in convs:
        x = conv(x)
    return x
