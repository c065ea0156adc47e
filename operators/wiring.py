"""How tasks find each other: the task ids of a gfocal DAG and the one way to read another task's XCom.

Every module that names a task or pulls its value imports it from here, so the ids are written once.
"""

from __future__ import annotations

from typing import Any

DOCTOR = "doctor"
PREPARE = "prepare"
EXPORT = "export"
EXPORT_PORTABLE = "export_portable"
CONVERT = "convert"
PREPROCESS = "preprocess"
INFER = "infer"
EVALUATE = "evaluate"
INFER_REFERENCE = "infer_reference"
EVALUATE_REFERENCE = "evaluate_reference"
SUMMARY = "summary"
RECORD = "record"
GATE = "gate"
RETENTION = "retention"
VERDICT_KEY = "verdict"  # XCom key of the gate's verdict (read by the failure notifier)
REPORT_KEY = "report"  # XCom key of the regression report's summary (gfocal_pipeline.report)
MANIFEST_KEY = "manifest"  # XCom key of the preprocess task's manifest facts


def pulled(task_id: str, key: str | None = None) -> str:
    """Jinja for `task_id`'s return value (or one `key` of it); rendered as a native object."""
    value = f"ti.xcom_pull(task_ids='{task_id}')"
    return "{{ " + (value if key is None else f"{value}['{key}']") + " }}"


_PREPARED: dict[str, Any] = {}  # task instance id -> the prepare task's value, read once per task


def prepared_values(ti: Any) -> Any:
    """The prepare task's value for the task instance `ti`, read from XCom once per task instance.

    A task renders many `prepared(key)` fields (preprocess: 11); each `ti.xcom_pull` is a call to
    the API server, so the first read is kept for the others (the DAGs' `user_defined_macros`)."""
    key = str(getattr(ti, "id", None) or id(ti))
    if key not in _PREPARED:
        if len(_PREPARED) > 64:  # `dag.test()` runs every task instance in one process
            _PREPARED.clear()
        _PREPARED[key] = ti.xcom_pull(task_ids=PREPARE)
    return _PREPARED[key]


MACROS = {"gfocal_prepared": prepared_values}  # the DAGs' user_defined_macros


def prepared(key: str | None = None) -> str:
    """Jinja for one validated run option (or all of them), as the prepare task pushed it."""
    value = "gfocal_prepared(ti)"
    return "{{ " + (value if key is None else f"{value}['{key}']") + " }}"


def reference_model(portable_task: str = EXPORT_PORTABLE) -> str:
    """Jinja for what the reference branch loads: the checkpoint (torch), or the path of the portable
    graph `portable_task` exported when the run's reference is ONNX Runtime (a bring-your-own graph)."""
    portable = f"ti.xcom_pull(task_ids='{portable_task}')['onnx_path']"
    run = "gfocal_prepared(ti)"
    return (
        "{{ " + f"{portable} if {run}['reference_backend'] == 'onnxruntime' else {run}['checkpoint']" + " }}"
    )


def from_prepare(*names: str, **renamed: str) -> dict[str, str]:
    """Keyword arguments read from the prepare task: `names` as they are, `renamed` as arg=option."""
    return {
        **{name: prepared(name) for name in names},
        **{arg: prepared(key) for arg, key in renamed.items()},
    }


def variant_task(variant: str, task_id: str) -> str:
    """The id of a variant's task: its task group is the variant's name (`fp16.convert`)."""
    return f"{variant}.{task_id}"


def variant_prepared(variant: str, key: str) -> str:
    """Jinja for one validated option of `variant` (the prepare task's `variants[variant]`)."""
    return "{{ gfocal_prepared(ti)['variants']['" + variant + "']['" + key + "'] }}"


def from_variant(variant: str, *names: str, **renamed: str) -> dict[str, str]:
    """`from_prepare` for the options of one variant of a models file entry."""
    return {
        **{name: variant_prepared(variant, name) for name in names},
        **{arg: variant_prepared(variant, key) for arg, key in renamed.items()},
    }
