"""Thin Airflow operators over `gfocal_pipeline`: validate arguments, call the library, return XCom dicts."""

from operators.export import OnnxExportOperator
from operators.pipeline import (
    CocoEvalOperator,
    CocoPreprocessOperator,
    InferOperator,
    OnnxRuntimeInferOperator,
    PrepareRunOperator,
    RunSummaryOperator,
    TorchInferOperator,
)

__all__ = [
    "CocoEvalOperator",
    "CocoPreprocessOperator",
    "InferOperator",
    "OnnxExportOperator",
    "OnnxRuntimeInferOperator",
    "PrepareRunOperator",
    "RunSummaryOperator",
    "TorchInferOperator",
]
