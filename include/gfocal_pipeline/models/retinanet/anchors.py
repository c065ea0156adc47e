"""Grid anchors of RetinaNet, in mmdet's order: location-major (row-major, x fastest), then the
9 base anchors of a location ratio-major (each ratio with its 3 octave scales)."""

from __future__ import annotations

import math

import torch

from gfocal_pipeline.models.retinanet.spec import RETINANET_R50_FPN_1X, RetinaNetSpec


class AnchorGenerator:
    """Anchors x1y1x2y2 in input pixels for the feature-map sizes of each level."""

    def __init__(self, spec: RetinaNetSpec = RETINANET_R50_FPN_1X) -> None:
        self.strides = spec.strides
        self.center_offset = spec.center_offset
        self.scales = [
            spec.octave_base_scale * 2 ** (i / spec.scales_per_octave) for i in range(spec.scales_per_octave)
        ]
        self.ratios = spec.ratios

    def base_anchors(self, level: int) -> torch.Tensor:
        """(A, 4) anchors of one location at the origin; the base size of a level is its stride."""
        size = float(self.strides[level])
        center = self.center_offset * size
        rows = []
        for ratio in self.ratios:
            h_ratio = math.sqrt(ratio)  # ratio = h / w at constant area
            for scale in self.scales:
                w, h = size * scale / h_ratio, size * scale * h_ratio
                rows.append([center - 0.5 * w, center - 0.5 * h, center + 0.5 * w, center + 0.5 * h])
        return torch.tensor(rows, dtype=torch.float32)

    def level_anchors(
        self, level: int, height: int, width: int, device: torch.device | None = None
    ) -> torch.Tensor:
        """(height * width * A, 4) anchors of one level for a `height` x `width` feature map."""
        stride = self.strides[level]
        ys = torch.arange(height, device=device).to(torch.float32) * stride
        xs = torch.arange(width, device=device).to(torch.float32) * stride
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        shifts = torch.stack([xx, yy, xx, yy], dim=-1).reshape(-1, 1, 4)
        return (shifts + self.base_anchors(level).to(device)[None]).reshape(-1, 4)

    def grid_anchors(
        self, sizes: list[tuple[int, int]], device: torch.device | None = None
    ) -> list[torch.Tensor]:
        """Anchors of every level; `sizes` are the (height, width) of P3..P7."""
        if len(sizes) != len(self.strides):
            raise ValueError(f"{len(sizes)} feature-map sizes for {len(self.strides)} anchor levels")
        return [self.level_anchors(i, h, w, device) for i, (h, w) in enumerate(sizes)]
