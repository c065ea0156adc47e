"""How tasks find each other: the task ids of a gfocal DAG and the one way to read another task's XCom.

Every module that names a task or pulls its value imports it from here, so the ids are written once.
"""

from __future__ import annotations

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
MANIFEST_KEY = "manifest"  # XCom key of the preprocess task's manifest facts


def pulled(task_id: str, key: str | None = None) -> str:
    """Jinja for `task_id`'s return value (or one `key` of it); rendered as a native object."""
    value = f"ti.xcom_pull(task_ids='{task_id}')"
    return "{{ " + (value if key is None else f"{value}['{key}']") + " }}"


def prepared(key: str | None = None) -> str:
    """Jinja for one validated run option (or all of them), as the prepare task pushed it."""
    return pulled(PREPARE, key)


def from_prepare(*names: str, **renamed: str) -> dict[str, str]:
    """Keyword arguments read from the prepare task: `names` as they are, `renamed` as arg=option."""
    return {
        **{name: prepared(name) for name in names},
        **{arg: prepared(key) for arg, key in renamed.items()},
    }
