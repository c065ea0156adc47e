"""Deterministic YOLOX weights in mmdet's layout whose detections look like a trained model's.

Random convs alone make the 60-odd stacked conv-BN-Swish blocks collapse or explode. So the BN
statistics are calibrated: each BN's running mean/var are the statistics of its input on the
exporter's two parity pictures (one variance per layer), perturbed at random and rounded (non-trivial
values, the same bytes on every machine). On such pictures every block keeps its scale (a random
network is chaotic: on very different pictures scores may saturate or vanish); the class and
objectness biases put max class score x objectness well above and below score_thr, and the box regressor
makes boxes a few strides wide (neighbours overlap), so NMS and the parity check have real work to do.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from gfocal_pipeline.checkpoint import RANDOM_CHECKPOINT_NOTE, write_checkpoint
from gfocal_pipeline.demo_data import demo_image
from gfocal_pipeline.nets.layers import FrozenBatchNorm2d
from gfocal_pipeline.pixels import pixels_of
from gfocal_pipeline.preprocess import preprocess_image

CLS_BIAS = -3.0
OBJ_BIAS = -2.0
REG_GAIN = 0.3  # box offsets and log sizes of a few tenths around ...
LOG_WH = 2.0  # ... boxes e^2 = 7.4 strides wide: neighbours overlap (IoU > 0.65), so NMS suppresses
STAT_GRID = 1024  # running statistics rounded to multiples of 1/1024
CALIBRATION_SIZE = 320  # the calibration pictures' side (pixels)


def _value(key: str, t: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """The random value of one state-dict entry (BN statistics are calibrated afterwards)."""
    shape = t.shape
    if key.endswith("num_batches_tracked"):
        return torch.zeros((), dtype=torch.int64)
    if key.endswith(("running_mean", "running_var")):
        return torch.zeros(shape) if key.endswith("mean") else torch.ones(shape)
    if key.endswith(".bn.weight"):
        return 0.5 + 0.5 * torch.rand(shape, generator=g)
    if key.endswith(".bn.bias"):
        return 0.1 * torch.randn(shape, generator=g)
    if "multi_level_conv_cls" in key and key.endswith("bias"):
        return CLS_BIAS + 0.2 * torch.randn(shape, generator=g)
    if "multi_level_conv_obj" in key and key.endswith("bias"):
        return OBJ_BIAS + 0.2 * torch.randn(shape, generator=g)
    if "multi_level_conv_reg" in key and key.endswith("bias"):  # (dx, dy, log w, log h) / stride
        return torch.tensor([0.0, 0.0, LOG_WH, LOG_WH]) + 0.1 * torch.randn(shape, generator=g)
    gain = REG_GAIN if "multi_level_conv_reg" in key else 1.0
    if key.endswith("weight"):
        return gain * torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]))
    return 0.01 * gain * torch.randn(shape, generator=g)  # predictor biases


def _calibration_pictures() -> torch.Tensor:
    """(2, 3, S, S) BGR 0..255: the exporter's two parity pictures letterboxed on YOLOX's padding."""
    from gfocal_pipeline.export import PARITY_PICTURES
    from gfocal_pipeline.models.yolox.spec import SPEC

    side, pixels = CALIBRATION_SIZE, pixels_of(SPEC.to_dict())
    arrays = [
        preprocess_image(demo_image(seed, width=w, height=h), "letterbox", "float32", side, side, pixels)[0]
        for seed, (w, h) in enumerate(PARITY_PICTURES)
    ]
    return torch.from_numpy(np.stack(arrays))


def _calibrate(model: torch.nn.Module, g: torch.Generator) -> None:
    """Set each BN's running mean/var from its input on the calibration picture, perturbed, rounded."""

    def calibrate(bn: FrozenBatchNorm2d, args: tuple[torch.Tensor]) -> None:
        x = args[0]
        n = bn.num_features
        # one variance per layer (its channels' mean), so a channel that happens to be flat on the
        # picture is not blown up on another; per-channel spread and mean shifts keep it non-trivial
        var = x.var(dim=(0, 2, 3)).mean() * (0.8 + 0.4 * torch.rand(n, generator=g)) + 1e-3
        mean = x.mean(dim=(0, 2, 3)) + 0.1 * var.sqrt() * torch.randn(n, generator=g)
        bn.running_mean.copy_(torch.round(mean * STAT_GRID) / STAT_GRID)
        bn.running_var.copy_((torch.round(var * STAT_GRID) / STAT_GRID).clamp(min=1.0 / STAT_GRID))

    bns = [m for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    hooks = [bn.register_forward_pre_hook(calibrate) for bn in bns]
    try:
        with torch.no_grad():
            model(_calibration_pictures())
    finally:
        for hook in hooks:
            hook.remove()


def random_state_dict(seed: int = 0) -> OrderedDict[str, torch.Tensor]:
    """Random weights of YOLOX-s with calibrated BN statistics, in mmdet's checkpoint layout."""
    from gfocal_pipeline.models.yolox.detector import build_yolox

    model = build_yolox()
    g = torch.Generator().manual_seed(seed)
    state = {key: _value(key, t, g).to(t.dtype) for key, t in model.state_dict().items()}
    model.load_state_dict(state, strict=True)
    _calibrate(model, g)
    return OrderedDict((key, value.clone()) for key, value in model.state_dict().items())


def randomize(model: torch.nn.Module, seed: int) -> None:
    """`random_state_dict(seed)` loaded strictly: works on mmdet's YOLOX and on ours (same keys)."""
    model.load_state_dict(random_state_dict(seed), strict=True)


def write_random_checkpoint(path: str | os.PathLike[str], seed: int = 0) -> Path:
    """An mmcv-style file of RANDOM YOLOX-s weights (deterministic bytes for a seed; tests, demo)."""
    meta = {"note": RANDOM_CHECKPOINT_NOTE, "seed": seed, "config": "yolox_s_8xb8-300e_coco", "random": True}
    return write_checkpoint(path, random_state_dict(seed), meta)
