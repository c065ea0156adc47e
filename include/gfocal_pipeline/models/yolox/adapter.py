"""YOLOX-s behind the model adapter seam (`gfocal_pipeline.adapters`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from gfocal_pipeline.export import ExportResult
from gfocal_pipeline.fileio import sha256_file
from gfocal_pipeline.model_spec import ModelSpec
from gfocal_pipeline.models.yolox import weights
from gfocal_pipeline.models.yolox.checkpoint import load_yolox
from gfocal_pipeline.models.yolox.deploy import YoloxDeploy
from gfocal_pipeline.models.yolox.export import export_yolox
from gfocal_pipeline.models.yolox.spec import SPEC


class YoloxAdapter:
    """YOLOX-s: mmdet's checkpoint layout, one point prior per location, one label per prior."""

    spec: ModelSpec = SPEC

    def load_network(self, path: str | os.PathLike[str], strict: bool = True) -> nn.Module:
        return load_yolox(path, strict)

    def reference_module(self, network: nn.Module, height: int, width: int) -> nn.Module:
        return YoloxDeploy(network, height, width)  # type: ignore[arg-type]

    def export(
        self, path: str | os.PathLike[str], output: str | os.PathLike[str], **options: Any
    ) -> ExportResult:
        model = self.load_network(path)
        return export_yolox(model, output, checkpoint_sha256=sha256_file(path), **options)

    def write_random_checkpoint(self, path: str | os.PathLike[str], seed: int = 0) -> Path:
        return weights.write_random_checkpoint(path, seed)


ADAPTER = YoloxAdapter()
