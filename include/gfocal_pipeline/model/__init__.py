"""GFocalV2 ResNet-50-FPN in plain PyTorch, with the state_dict layout of the official checkpoint."""

from gfocal_pipeline.model.deploy import DeployModel
from gfocal_pipeline.model.detector import GFocalV2, build_model

__all__ = ["DeployModel", "GFocalV2", "build_model"]
