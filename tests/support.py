"""Helpers the tests import by name (`from support import ...`): the checkout root and real-Airflow
DAG loading. A module of its own, since `conftest` is not a unique module name across test folders."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
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


@contextlib.contextmanager
def mounted(target: Path, options: str) -> Iterator[bool]:
    """A tmpfs at `target` (root only); yields False when mounting is not possible here."""
    target.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        yield False
        return
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)], capture_output=True)
    if done.returncode != 0:
        yield False
        return
    try:
        yield True
    finally:
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[None]:
    """`folder` read-only: a tmpfs mounted `ro` as root (root ignores modes), else chmod 0555."""
    with mounted(folder, "ro,size=1m") as ok:
        if not ok:
            if os.geteuid() == 0:
                raise RuntimeError(f"cannot make {folder} read-only: root without permission to mount")
            folder.chmod(0o555)
        try:
            yield
        finally:
            if not ok:
                folder.chmod(0o755)


@contextlib.contextmanager
def read_only_tree(folder: Path) -> Iterator[None]:
    """`folder` and what it holds, read-only in place: as root a read-only bind mount of it over itself
    (root ignores modes; writes fail with EROFS), else every folder chmod 0555 and file 0444."""
    if os.geteuid() == 0:
        bind = subprocess.run(["mount", "--bind", str(folder), str(folder)], capture_output=True)
        if bind.returncode != 0:
            raise RuntimeError(f"cannot make {folder} read-only: {bind.stderr.decode().strip()}")
        try:
            ro = subprocess.run(["mount", "-o", "remount,ro,bind", str(folder)], capture_output=True)
            if ro.returncode != 0:
                raise RuntimeError(f"cannot remount {folder} read-only: {ro.stderr.decode().strip()}")
            yield
        finally:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)
        return
    paths = [folder, *folder.rglob("*")]
    modes = {path: path.stat().st_mode for path in paths}
    for path in reversed(paths):
        path.chmod(0o555 if path.is_dir() else 0o444)
    try:
        yield
    finally:
        for path in paths:
            path.chmod(modes[path])


def run_with_file_size_limit(argv: list[str], limit: int = 1_000_000) -> subprocess.CompletedProcess[str]:
    """`gfocal <argv>` with RLIMIT_FSIZE (SIGXFSZ ignored): writes past `limit` fail with EFBIG, the
    unprivileged stand-in for a full disk."""
    code = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n"
        "from gfocal_pipeline.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    return subprocess.run([sys.executable, "-c", code, *map(str, argv)], capture_output=True, text=True)
