"""YOLOX-s in plain PyTorch, with the state_dict layout of mmdet's checkpoint.

The network names below load on first use, so `gfocal_pipeline.models.yolox.spec` (pure data) imports
no torch.
"""

from __future__ import annotations

from gfocal_pipeline.models import lazy_names

_LAZY = {
    "YOLOX_S": "gfocal_pipeline.models.yolox.spec",
    "YoloxSpec": "gfocal_pipeline.models.yolox.spec",
    "YoloxDeploy": "gfocal_pipeline.models.yolox.deploy",
    "YOLOX": "gfocal_pipeline.models.yolox.detector",
    "build_yolox": "gfocal_pipeline.models.yolox.detector",
}
__all__ = sorted(_LAZY)
__getattr__ = lazy_names(__name__, _LAZY)
