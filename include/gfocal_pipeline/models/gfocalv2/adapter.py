"""GFocalV2 behind the model adapter seam (`gfocal_pipeline.adapters`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from gfocal_pipeline.export import ExportResult
from gfocal_pipeline.model_spec import ModelSpec
from gfocal_pipeline.models.gfocalv2 import checkpoint
from gfocal_pipeline.models.gfocalv2.deploy import DeployModel
from gfocal_pipeline.models.gfocalv2.export import export_gfocalv2
from gfocal_pipeline.models.gfocalv2.spec import SPEC


class GFocalV2Adapter:
    """GFocalV2 R50-FPN: official checkpoint layout, DGQP head, integral box decode."""

    spec: ModelSpec = SPEC

    def load_network(self, path: str | os.PathLike[str], strict: bool = True) -> nn.Module:
        return checkpoint.load_model(path, strict)

    def reference_module(self, network: nn.Module, height: int, width: int) -> nn.Module:
        return DeployModel(network, "portable", height, width)  # type: ignore[arg-type]

    def export(
        self, path: str | os.PathLike[str], output: str | os.PathLike[str], **options: Any
    ) -> ExportResult:
        return export_gfocalv2(path, output, **options)

    def write_random_checkpoint(self, path: str | os.PathLike[str], seed: int = 0) -> Path:
        return checkpoint.write_random_checkpoint(path, seed)


ADAPTER = GFocalV2Adapter()
