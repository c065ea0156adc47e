"""`gfocal_onnxruntime`: the whole chain on the embedded default (ONNX Runtime on CPU, no NPU)."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from airflow.sdk import DAG
from gfocal_factory import PipelineSpec, build_dag

dag: DAG = build_dag(
    PipelineSpec(
        dag_id="gfocal_onnxruntime",
        description="GFocalV2: export -> preprocess -> ONNX Runtime -> COCO eval -> summary",
        family="onnxruntime",
        tags=("onnxruntime",),
    )
)
