"""RetinaNet R50-FPN 1x in plain PyTorch, with the state_dict layout of mmdet's checkpoint."""

from gfocal_pipeline.models.retinanet.deploy import RetinaNetDeploy
from gfocal_pipeline.models.retinanet.detector import RetinaNet, build_retinanet
from gfocal_pipeline.models.retinanet.spec import RETINANET_R50_FPN_1X, RetinaNetSpec

__all__ = ["RETINANET_R50_FPN_1X", "RetinaNet", "RetinaNetDeploy", "RetinaNetSpec", "build_retinanet"]
