"""GFocalV2's checkpoint layout, its strict loader, and deterministic random weights (tests, demo)."""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from pathlib import Path
from typing import cast

import numpy as np
import torch

from gfocal_pipeline.checkpoint import (
    RANDOM_CHECKPOINT_NOTE,
    CheckpointLayout,
    load_with_layout,
    write_checkpoint,
)
from gfocal_pipeline.models.gfocalv2.detector import GFocalV2, build_model

DEMO_CONFIDENT_CLASSES = (0, 2, 56)  # person, car, chair
GFOCALV2_LAYOUT = CheckpointLayout("GFocalV2 R50-FPN", "gfocal_r50_fpn_1x.pth", build_model)


def load_model(path: str | os.PathLike[str], strict: bool = True) -> GFocalV2:
    """GFocalV2 in eval mode with `path`'s weights; strict by default, mismatches listed by key."""
    return cast(GFocalV2, load_with_layout(path, GFOCALV2_LAYOUT, strict))


def random_state_dict(seed: int = 0) -> OrderedDict[str, torch.Tensor]:
    """Deterministic weights in the official layout with activations of sane magnitude.

    Convs: He-normal; frozen BN: mild statistics, the last BN of each block scaled down so residual
    sums stay bounded; head: mmdet's init (std 0.01, classifier prior 0.01).
    """
    generator = torch.Generator().manual_seed(seed)
    model = build_model()
    state = OrderedDict()
    for key, tensor in model.state_dict().items():
        shape = tensor.shape
        if key.endswith("num_batches_tracked"):
            value = torch.zeros((), dtype=torch.int64)
        elif key.endswith("integral.project"):
            value = tensor.clone()
        elif key.endswith("scale"):
            value = torch.tensor(1.0 + 0.1 * torch.rand((), generator=generator).item())
        elif key.endswith("running_mean"):
            value = 0.1 * torch.randn(shape, generator=generator)
        elif key.endswith("running_var"):
            value = 0.5 + torch.rand(shape, generator=generator)
        elif tensor.dim() == 1 and (".bn" in key or "downsample.1" in key or key.startswith("backbone.bn1")):
            gain = 0.2 if (key.rsplit(".", 2)[-2] in ("bn3", "1")) else 1.0
            value = (
                gain * (0.5 + 0.5 * torch.rand(shape, generator=generator))
                if key.endswith("weight")
                else 0.05 * torch.randn(shape, generator=generator)
            )
        elif ".gn." in key:
            value = torch.ones(shape) if key.endswith("weight") else torch.zeros(shape)
        elif key.startswith("bbox_head.") and key.endswith("weight"):
            value = 0.01 * torch.randn(shape, generator=generator)
        elif key == "bbox_head.gfl_cls.bias":
            # mmdet's prior (0.01) for most classes; a few "confident" classes so the demo produces
            # detections and exercises NMS, evaluation and the detection files end to end
            value = torch.full(shape, -math.log((1 - 0.01) / 0.01))
            value[list(DEMO_CONFIDENT_CLASSES)] = -math.log((1 - 0.3) / 0.3)
        elif key.endswith("weight"):
            fan_in = int(np.prod(shape[1:]))
            value = torch.randn(shape, generator=generator) * math.sqrt(2.0 / fan_in)
        else:  # conv biases
            value = 0.01 * torch.randn(shape, generator=generator)
        state[key] = value.to(tensor.dtype).reshape(shape).contiguous()
    return state


def write_random_checkpoint(path: str | os.PathLike[str], seed: int = 0) -> Path:
    """Write an mmcv-style `{'meta', 'state_dict'}` file with random weights (atomically)."""
    meta = {"note": RANDOM_CHECKPOINT_NOTE, "seed": seed, "config": "gfocal_r50_fpn_1x", "random": True}
    return write_checkpoint(path, random_state_dict(seed), meta)
