"""RetinaNet behind the model adapter seam (`gfocal_pipeline.adapters`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from gfocal_pipeline.export import ExportResult
from gfocal_pipeline.fileio import sha256_file
from gfocal_pipeline.model_spec import ModelSpec
from gfocal_pipeline.models.retinanet import weights
from gfocal_pipeline.models.retinanet.checkpoint import load_retinanet
from gfocal_pipeline.models.retinanet.deploy import RetinaNetDeploy
from gfocal_pipeline.models.retinanet.export import export_retinanet
from gfocal_pipeline.models.retinanet.spec import SPEC


class RetinaNetAdapter:
    """RetinaNet R50-FPN 1x: mmdet's checkpoint layout, 9 anchors per location, sigmoid scores."""

    spec: ModelSpec = SPEC

    def load_network(self, path: str | os.PathLike[str], strict: bool = True) -> nn.Module:
        return load_retinanet(path, strict)

    def reference_module(self, network: nn.Module, height: int, width: int) -> nn.Module:
        return RetinaNetDeploy(network, height, width)  # type: ignore[arg-type]

    def export(
        self, path: str | os.PathLike[str], output: str | os.PathLike[str], **options: Any
    ) -> ExportResult:
        model = self.load_network(path)
        return export_retinanet(model, output, checkpoint_sha256=sha256_file(path), **options)

    def write_random_checkpoint(self, path: str | os.PathLike[str], seed: int = 0) -> Path:
        return weights.write_random_checkpoint(path, seed)


ADAPTER = RetinaNetAdapter()
