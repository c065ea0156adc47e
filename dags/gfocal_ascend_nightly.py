"""`gfocal_ascend_nightly`: the converted model on the Ascend NPU every night, beside the PyTorch model.

export (ascend + portable) -> atc convert -> preprocess -> msame/ais_bench per shard on queue `ascend`
and pool `ascend_npu` -> PyTorch reference on the same inputs -> evaluate both -> summary (AP_pytorch,
AP_npu, AP_delta) -> record -> regression gate.

Config (`[gfocal]` in airflow.cfg or AIRFLOW__GFOCAL__*): `nightly_cron` (default 02:00 UTC) and
`nightly_deadline_hours` (default 6: alert when a run has not finished that long after it was
queued; 0 disables the deadline).
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from airflow.configuration import conf
from airflow.sdk import DAG
from gfocal_factory import PipelineSpec, ascend_params, build_dag

from gfocal_pipeline.constants import ASCEND_POOL, ASCEND_QUEUE

deadline_hours = float(conf.get("gfocal", "nightly_deadline_hours", fallback="6"))

dag: DAG = build_dag(
    PipelineSpec(
        dag_id="gfocal_ascend_nightly",
        description="GFocalV2 on Ascend: atc -> msame, PyTorch reference, COCO AP, fps, regression gate",
        backend="msame",
        schedule=conf.get("gfocal", "nightly_cron", fallback="0 2 * * *"),
        reference=True,
        queue=ASCEND_QUEUE,
        pool=ASCEND_POOL,
        device="npu",
        tags=("ascend", "nightly"),
        extra_params=ascend_params(),
        deadline=timedelta(hours=deadline_hours) if deadline_hours > 0 else None,
    )
)
