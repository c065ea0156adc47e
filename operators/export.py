"""`OnnxExportOperator`: checkpoint -> ONNX (portable or ascend) with the parity check."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseOperator

from gfocal_pipeline.constants import (
    DEFAULT_HEIGHT,
    DEFAULT_INPUT_NAME,
    DEFAULT_MAX_UNEXPLAINED,
    DEFAULT_PARITY_THRESHOLD,
    DEFAULT_WIDTH,
)
from operators.base import attributes, project_errors


class OnnxExportOperator(BaseOperator):
    """Export a checkpoint of model adapter `model` (default gfocalv2) to ONNX (through the ONNX cache)
    and check its parity.

    For: the first model step of every DAG (`portable` for ONNX Runtime, `ascend` for atc); `dtype`
    and `batch_size` decide the graph's input and batch axis (see `steps.export_step`). XCom:
    `onnx_path`, `onnx_sha256`, `checkpoint_sha256`, `variant`, `input_name`, `input_shape`,
    `output_names`, `opset`, `parity_max_abs_err`, `parity_ties`, `parity_unexplained`,
    `unexplained_allowed` (True when `max_unexplained` let unexplained candidates through),
    `export_seconds`, `torch_version`, `cached` (reused from the ONNX cache of `work_dir`) and
    `cache_key`. A refused graph fails the task and is kept as `<name>.rejected.onnx` in the run's
    model folder.
    """

    template_fields: Sequence[str] = (
        "run_dir",
        "model",
        "checkpoint",
        "height",
        "width",
        "dtype",
        "batch_size",
        "parity_threshold",
        "max_unexplained",
        "work_dir",
        "cache_onnx",
    )
    ui_color = "#e8d5f5"

    def __init__(
        self,
        *,
        run_dir: str,
        checkpoint: str,
        model: str = "gfocalv2",
        variant: str = "portable",
        height: int = DEFAULT_HEIGHT,
        width: int = DEFAULT_WIDTH,
        dtype: str = "float32",
        batch_size: int = 1,
        parity_threshold: float = DEFAULT_PARITY_THRESHOLD,
        max_unexplained: int = DEFAULT_MAX_UNEXPLAINED,
        opset: int | None = None,
        input_name: str = DEFAULT_INPUT_NAME,
        work_dir: str | None = None,
        cache_onnx: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.run_dir, self.checkpoint, self.variant, self.model = run_dir, checkpoint, variant, model
        self.height, self.width, self.opset = height, width, opset
        self.dtype, self.batch_size = dtype, batch_size
        self.parity_threshold, self.max_unexplained = parity_threshold, max_unexplained
        self.input_name, self.work_dir, self.cache_onnx = input_name, work_dir, cache_onnx

    @project_errors
    def execute(self, context: Any) -> dict[str, Any]:
        from gfocal_pipeline import steps

        names = ("dtype", "batch_size", "height", "width", "opset", "input_name", "parity_threshold")
        options = attributes(self, (*names, "max_unexplained", "work_dir", "cache_onnx", "model"))
        result = steps.export_step(self.run_dir, self.variant, self.checkpoint, **options)
        self.log.info(
            "%s %s (sha256 %s), parity max abs err %.3g",
            "reused cached" if result.get("cached") else "exported",
            result["onnx_path"],
            result["onnx_sha256"][:12],
            result["parity_max_abs_err"],
        )
        return result
