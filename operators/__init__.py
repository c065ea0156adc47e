"""Thin Airflow operators over `gfocal_pipeline`: validate arguments, call the library, return XCom dicts."""

from operators.export import OnnxExportOperator

__all__ = ["OnnxExportOperator"]
