"""RetinaNet R50-FPN 1x in plain PyTorch, with the state_dict layout of mmdet's checkpoint.

The network names below load on first use, so `gfocal_pipeline.models.retinanet.spec` (pure data)
imports no torch.
"""

from __future__ import annotations

from gfocal_pipeline.models import lazy_names

_LAZY = {
    "RETINANET_R50_FPN_1X": "gfocal_pipeline.models.retinanet.spec",
    "RetinaNetSpec": "gfocal_pipeline.models.retinanet.spec",
    "RetinaNetDeploy": "gfocal_pipeline.models.retinanet.deploy",
    "RetinaNet": "gfocal_pipeline.models.retinanet.detector",
    "build_retinanet": "gfocal_pipeline.models.retinanet.detector",
}
__all__ = sorted(_LAZY)
__getattr__ = lazy_names(__name__, _LAZY)
