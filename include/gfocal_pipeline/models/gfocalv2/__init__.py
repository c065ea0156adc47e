"""GFocalV2 ResNet-50-FPN in plain PyTorch, with the state_dict layout of the official checkpoint.

The network names below load on first use, so `gfocal_pipeline.models.gfocalv2.spec` (pure data)
imports no torch.
"""

from __future__ import annotations

from gfocal_pipeline.models import lazy_names

_LAZY = {
    "DeployModel": "gfocal_pipeline.models.gfocalv2.deploy",
    "GFocalV2": "gfocal_pipeline.models.gfocalv2.detector",
    "build_model": "gfocal_pipeline.models.gfocalv2.detector",
}
__all__ = sorted(_LAZY)
__getattr__ = lazy_names(__name__, _LAZY)
