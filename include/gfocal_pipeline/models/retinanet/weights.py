"""Deterministic RetinaNet weights in mmdet's layout whose detections look like a trained model's.

Random He-normal weights alone give collapsed or saturated scores; these keep every stage at a sane
magnitude and put the classifier's scores well above and below score_thr, so that NMS, the nms_pre
selection and the parity checks all have real work to do.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from pathlib import Path

import torch

from gfocal_pipeline.checkpoint import RANDOM_CHECKPOINT_NOTE, write_checkpoint

# classifier bias: a few hundred (anchor, class) pairs per level score > 0.05
CLS_BIAS = -4.6
# output gains of the FPN convs P3..P7: random-noise inputs give ever weaker deep features, and these
# even them out so that P3..P6 all hold confident anchors (P7 none)
NECK_GAINS = (1.0, 1.4, 2.5, 3.6, 0.8)


def _value(key: str, t: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """The random value of one state-dict entry."""
    shape = t.shape
    if key.endswith("num_batches_tracked"):
        return torch.zeros((), dtype=torch.int64)
    if key.endswith("running_mean"):
        return 0.1 * torch.randn(shape, generator=g)
    if key.endswith("running_var"):
        return 0.5 + torch.rand(shape, generator=g)
    if t.dim() == 1 and key.startswith("backbone.") and ("bn" in key or "downsample.1" in key):
        if not key.endswith("weight"):
            return 0.05 * torch.randn(shape, generator=g)
        gain = 0.2 if key.rsplit(".", 2)[-2] in ("bn3", "1") else 1.0  # bounded residual sums
        return gain * (0.5 + 0.5 * torch.rand(shape, generator=g))
    if key == "bbox_head.retina_cls.bias":
        return CLS_BIAS + 0.1 * torch.randn(shape, generator=g)
    if key == "bbox_head.retina_reg.weight":
        return 0.3 * torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]))
    if key.endswith("weight"):
        return torch.randn(shape, generator=g) * math.sqrt(2.0 / math.prod(shape[1:]))
    return 0.01 * torch.randn(shape, generator=g)  # conv biases


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Deterministic weights of sane magnitude: He-normal convs, non-trivial frozen-BN statistics,
    towers that keep their scale, a classifier whose scores spread well above and below score_thr.
    Works on mmdet's RetinaNet and on ours alike (same state-dict keys)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, t in model.state_dict().items():
        value = _value(key, t, g)
        if key.startswith("neck.fpn_convs."):
            value = value * NECK_GAINS[int(key.split(".")[2])]
        state[key] = value.to(t.dtype)
    model.load_state_dict(state, strict=True)


def random_state_dict(seed: int = 0) -> OrderedDict[str, torch.Tensor]:
    """`randomize`d weights of our RetinaNet, in mmdet's checkpoint layout."""
    from gfocal_pipeline.models.retinanet.detector import build_retinanet

    model = build_retinanet()
    randomize(model, seed)
    return OrderedDict((key, value.clone()) for key, value in model.state_dict().items())


def write_random_checkpoint(path: str | os.PathLike[str], seed: int = 0) -> Path:
    """An mmcv-style file of RANDOM RetinaNet weights (deterministic bytes for a seed; tests, demo)."""
    meta = {
        "note": RANDOM_CHECKPOINT_NOTE,
        "seed": seed,
        "config": "retinanet_r50_fpn_1x_coco",
        "random": True,
    }
    return write_checkpoint(path, random_state_dict(seed), meta)
