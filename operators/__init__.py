"""Thin Airflow operators over `gfocal_pipeline.steps`: each calls one step and returns its XCom dict."""

from operators.ascend import AtcConvertOperator
from operators.export import OnnxExportOperator
from operators.infer import InferOperator, MsameInferOperator
from operators.pipeline import (
    CocoEvalOperator,
    CocoPreprocessOperator,
    PrepareRunOperator,
    RunSummaryOperator,
)
from operators.quality import RecordResultsOperator, RegressionGateOperator
from operators.retention import RetentionOperator

__all__ = [
    "AtcConvertOperator",
    "CocoEvalOperator",
    "CocoPreprocessOperator",
    "InferOperator",
    "MsameInferOperator",
    "OnnxExportOperator",
    "PrepareRunOperator",
    "RecordResultsOperator",
    "RegressionGateOperator",
    "RetentionOperator",
    "RunSummaryOperator",
]
