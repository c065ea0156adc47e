"""`<name>_nightly`: one nightly DAG per entry of the models file (`[gfocal] models_file`).

Each entry (`gfocal_pipeline.zoo`, docs/models-file.md) becomes the Ascend nightly of its model:
export and preprocess once, a branch per variant on queue `ascend` and pool `ascend_npu` (with the
entry's priority weight), the reference once, the variant matrix in the summary, one gate and one
alert for all variants. Without a models file this file defines no DAG.

A bad entry does not stop the others: it becomes a placeholder DAG of the same id (or
`models_file_entry_<n>_nightly` when its name is unusable) whose only task fails at once with the
error naming the file, the entry and the field; the DAG's description says the same in the DAG
list. A file that cannot be read at all is an import error of this file (shown by Airflow's UI).
"""

from __future__ import annotations

import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pendulum
from airflow.sdk import DAG
from gfocal_factory import PipelineSpec, build_dag

from gfocal_pipeline.constants import ASCEND_POOL, ASCEND_QUEUE
from gfocal_pipeline.errors import GfocalError
from gfocal_pipeline.sharding import NPU_SECONDS_PER_IMAGE
from gfocal_pipeline.zoo import Entry, EntryError, load_models_file
from operators.alerting import GfocalAlertNotifier
from operators.models_file import ModelsFileErrorOperator
from operators.settings import GfocalSettings, load_settings

log = logging.getLogger(__name__)


def entry_dag(entry: Entry, settings: GfocalSettings) -> DAG:
    """The nightly of one models file entry."""
    return build_dag(
        PipelineSpec(
            dag_id=entry.dag_id,
            description=entry.description
            or f"{entry.name} ({entry.adapter}) on Ascend: variants "
            f"{', '.join(entry.variant_runs())}; reference, COCO AP, fps, gate",
            family="ascend",
            schedule=entry.schedule or settings.nightly_cron,
            reference=True,
            queue=ASCEND_QUEUE,
            pool=ASCEND_POOL,
            device="npu",
            tags=("nightly", "models-file", entry.adapter),
            deadline=settings.nightly_deadline,
            seconds_per_image=NPU_SECONDS_PER_IMAGE,
            doctor=settings.nightly_doctor,
            form_defaults=entry.run_options(),
            variants=entry.variant_runs(),
            expected_failures=dict(entry.expected_failures),
            history_name=entry.name,
            priority_weight=entry.priority_weight,
        )
    )


def error_dag(error: EntryError, settings: GfocalSettings) -> DAG:
    """The placeholder of a bad entry: one task that fails at once with the error (and alerts)."""
    with DAG(
        dag_id=error.dag_id,
        description=f"BROKEN models file entry: {error}"[:1000],
        schedule=settings.nightly_cron,
        start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
        catchup=False,
        tags=["gfocal", "models-file", "models-file-error"],
        default_args={"retries": 0, "on_failure_callback": GfocalAlertNotifier()},
        doc_md=f"**This entry of the models file is invalid.**\n\n```\n{error}\n```\n\nFix the file; "
        "the DAG becomes the entry's nightly at the next parse.",
    ) as dag:
        ModelsFileErrorOperator(task_id="models_file_error", message=str(error))
    return dag


def zoo_dags(settings: GfocalSettings) -> dict[str, DAG]:
    """Every DAG of the models file (none without one), by id."""
    if not settings.models_file:
        return {}
    models = load_models_file(settings.models_file)
    dags = {}
    for entry in models.entries:
        try:
            dags[entry.dag_id] = entry_dag(entry, settings)
        except (GfocalError, ValueError) as exc:  # a value only the DAG itself checks (its schedule)
            dags[entry.dag_id] = error_dag(models.error_of(entry, str(exc)), settings)
    for error in models.errors:
        log.error("%s", error)
        dags.setdefault(error.dag_id, error_dag(error, settings))
    return dags


for _dag_id, _dag in zoo_dags(load_settings()).items():
    globals()[_dag_id] = _dag
