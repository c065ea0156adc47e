"""`gfocal_ascend_nightly`: the converted model on the Ascend NPU every night, beside the PyTorch model.

export (ascend + portable) -> atc convert -> preprocess -> msame/ais_bench per shard on queue `ascend`
and pool `ascend_npu` -> PyTorch reference on the same inputs -> evaluate both -> summary (AP_pytorch,
AP_npu, AP_delta) -> record -> regression gate.

Schedule and deadline are `[gfocal] nightly_cron` and `nightly_deadline_hours` (`operators.settings`).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from airflow.sdk import DAG
from gfocal_factory import PipelineSpec, build_dag

from gfocal_pipeline.constants import ASCEND_POOL, ASCEND_QUEUE
from gfocal_pipeline.sharding import NPU_SECONDS_PER_IMAGE
from operators.settings import load_settings

settings = load_settings()

dag: DAG = build_dag(
    PipelineSpec(
        dag_id="gfocal_ascend_nightly",
        description="GFocalV2 on Ascend: atc -> msame, PyTorch reference, COCO AP, fps, regression gate",
        family="ascend",
        schedule=settings.nightly_cron,
        reference=True,
        queue=ASCEND_QUEUE,
        pool=ASCEND_POOL,
        device="npu",
        tags=("ascend", "nightly"),
        deadline=settings.nightly_deadline,
        seconds_per_image=NPU_SECONDS_PER_IMAGE,
        doctor=settings.nightly_doctor,
    )
)
