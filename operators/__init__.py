"""Thin Airflow operators over `gfocal_pipeline`: validate arguments, call the library, return XCom dicts."""

from operators.ascend import AtcConvertOperator, MsameInferOperator
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
from operators.quality import RecordResultsOperator, RegressionGateOperator

__all__ = [
    "AtcConvertOperator",
    "CocoEvalOperator",
    "CocoPreprocessOperator",
    "InferOperator",
    "MsameInferOperator",
    "OnnxExportOperator",
    "OnnxRuntimeInferOperator",
    "PrepareRunOperator",
    "RecordResultsOperator",
    "RegressionGateOperator",
    "RunSummaryOperator",
    "TorchInferOperator",
]
