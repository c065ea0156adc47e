"""Helpers the tests import by name (`from support import ...`): the checkout root and real-Airflow
DAG loading. A module of its own, since `conftest` is not a unique module name across test folders."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
EMULATORS = ROOT / "tests" / "emulators"


def load_dag_file(source: Path, name: str | None = None) -> Any:
    """Copy a DAG file into the test DAG bundle and import it; returns the module."""
    target = Path(os.environ["AIRFLOW__CORE__DAGS_FOLDER"]) / (name or source.name)
    shutil.copyfile(source, target)
    spec = importlib.util.spec_from_file_location(target.stem, target)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[target.stem] = module
    spec.loader.exec_module(module)
    return module


def xcoms(dag_id: str, run_id: str, key: str = "return_value") -> dict[str, Any]:
    """{task_id or task_id[map_index]: value} of one DAG run's XComs under `key`."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        rows = (
            session.query(XComModel)
            .filter(XComModel.dag_id == dag_id, XComModel.run_id == run_id, XComModel.key == key)
            .all()
        )
        return {(r.task_id if r.map_index < 0 else f"{r.task_id}[{r.map_index}]"): r.value for r in rows}
