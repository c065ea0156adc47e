"""Thin Airflow operators over `gfocal_pipeline.steps`: each calls one step and returns its XCom dict.

Import rule: importing this package (every DAG file does, at each parse and in every task process)
loads no numerical library. Operators import `gfocal_pipeline.steps` inside `execute`, and the
backend registry names its classes without importing them; `tests/dags/test_dag_imports.py` holds it.
"""

from operators.ascend import AtcConvertOperator
from operators.doctor import DoctorOperator
from operators.export import OnnxExportOperator
from operators.infer import InferOperator, MsameInferOperator
from operators.pipeline import (
    CocoEvalOperator,
    CocoPreprocessOperator,
    PrepareRunOperator,
    RunSummaryOperator,
)
from operators.quality import ModelGateOperator, RecordResultsOperator, RegressionGateOperator
from operators.retention import RetentionOperator

__all__ = [
    "AtcConvertOperator",
    "CocoEvalOperator",
    "CocoPreprocessOperator",
    "DoctorOperator",
    "InferOperator",
    "ModelGateOperator",
    "MsameInferOperator",
    "OnnxExportOperator",
    "PrepareRunOperator",
    "RecordResultsOperator",
    "RegressionGateOperator",
    "RetentionOperator",
    "RunSummaryOperator",
]
