"""Shared fixtures. Airflow is pointed at a throw-away SQLite home before anything imports it."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from support import EMULATORS, ROOT, load_dag_file, xcoms

__all__ = ["EMULATORS", "ROOT", "load_dag_file", "xcoms"]

_AIRFLOW_HOME = Path(tempfile.mkdtemp(prefix="gfocal-airflow-home-"))
_DAGS = _AIRFLOW_HOME / "dags"
_DAGS.mkdir()
os.environ.update(
    {
        "AIRFLOW_HOME": str(_AIRFLOW_HOME),
        "AIRFLOW__CORE__DAGS_FOLDER": str(_DAGS),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{_AIRFLOW_HOME / 'airflow.db'}",
        "GFOCAL_WORK_DIR": str(_AIRFLOW_HOME / "work"),
        "GFOCAL_HISTORY_URL": f"sqlite:///{_AIRFLOW_HOME / 'history.sqlite'}",
    }
)


@pytest.fixture(scope="session")
def random_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The deterministic RANDOM-weight checkpoint in the official layout."""
    from gfocal_pipeline.models.gfocalv2.checkpoint import write_random_checkpoint

    return write_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "gfocal_random.pth", seed=0)


@pytest.fixture(scope="session")
def airflow_db() -> Path:
    """A migrated Airflow metadata DB (SQLite) shared by the tests of one session."""
    subprocess.run(
        [sys.executable, "-m", "airflow", "db", "migrate"], check=True, capture_output=True, env=os.environ
    )
    return _AIRFLOW_HOME


@pytest.fixture(scope="session")
def dags_dir() -> Path:
    return _DAGS


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Counts per suite that CI must show ran (the mmdet reference tests are never to be skipped)."""
    groups = {"reference": "mmdet reference", "airflow": "real Airflow DAG/server"}
    for marker, title in groups.items():
        counts = {}
        for outcome in ("passed", "failed", "skipped", "error"):
            reports = terminalreporter.stats.get(outcome, [])
            counts[outcome] = sum(
                1 for r in reports if getattr(r, "when", "call") in ("call", "setup") and marker in r.keywords
            )
        line = ", ".join(f"{n} {k}" for k, n in counts.items())
        terminalreporter.write_line(f"gfocal {title} tests: {line}")
