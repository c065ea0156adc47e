"""`OnnxExportOperator`: checkpoint -> ONNX (portable or ascend) with the parity check."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseOperator

from gfocal_pipeline.constants import DEFAULT_HEIGHT, DEFAULT_INPUT_NAME, DEFAULT_WIDTH
from gfocal_pipeline.export import DEFAULT_PARITY_THRESHOLD, export_onnx
from operators.params import as_bool, as_int


class OnnxExportOperator(BaseOperator):
    """Export a GFocalV2 checkpoint to ONNX and push a small dict to XCom.

    XCom: `onnx_path`, `onnx_sha256`, `checkpoint_sha256`, `variant`, `input_name`, `input_shape`,
    `output_names`, `opset`, `parity_max_abs_err`, `export_seconds`, `torch_version`.
    """

    template_fields: Sequence[str] = (
        "checkpoint",
        "output_path",
        "variant",
        "height",
        "width",
        "batch",
        "opset",
        "dynamic_batch",
        "normalize_in_graph",
    )
    ui_color = "#e8d5f5"

    def __init__(
        self,
        *,
        checkpoint: str,
        output_path: str,
        variant: str = "portable",
        height: int | str = DEFAULT_HEIGHT,
        width: int | str = DEFAULT_WIDTH,
        batch: int | str = 1,
        opset: int | str | None = None,
        dynamic_batch: bool | str = False,
        normalize_in_graph: bool | str = False,
        input_name: str = DEFAULT_INPUT_NAME,
        parity_threshold: float = DEFAULT_PARITY_THRESHOLD,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.checkpoint = checkpoint
        self.output_path = output_path
        self.variant = variant
        self.height = height
        self.width = width
        self.batch = batch
        self.opset = opset
        self.dynamic_batch = dynamic_batch
        self.normalize_in_graph = normalize_in_graph
        self.input_name = input_name
        self.parity_threshold = parity_threshold

    def execute(self, context: Any) -> dict[str, Any]:
        result = export_onnx(
            checkpoint=self.checkpoint,
            output=self.output_path,
            variant=str(self.variant),
            height=as_int("height", self.height),
            width=as_int("width", self.width),
            batch=as_int("batch", self.batch),
            dynamic_batch=as_bool("dynamic_batch", self.dynamic_batch),
            opset=None if self.opset in (None, "", "None") else as_int("opset", self.opset),
            input_name=self.input_name,
            normalize_in_graph=as_bool("normalize_in_graph", self.normalize_in_graph),
            parity_threshold=float(self.parity_threshold),
        )
        self.log.info(
            "exported %s (sha256 %s), parity max abs err %.3g",
            result.onnx_path,
            result.onnx_sha256[:12],
            result.parity_max_abs_err,
        )
        return result.to_xcom()
