"""RetentionOperator through `execute()`: [gfocal] limits, the current run protected, a small XCom."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from airflow.sdk.exceptions import AirflowFailException

from gfocal_pipeline.cache_store import Cache
from operators import RetentionOperator

DAG_ID = "gfocal_onnxruntime"


@pytest.fixture(autouse=True)
def no_gfocal_config(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if k.startswith("AIRFLOW__GFOCAL__")]:
        monkeypatch.delenv(key)


def make_run(work: Path, run_id: str, days_ago: float, *, uses: tuple[str, ...] = ()) -> Path:
    """A finished run `days_ago` old: 50 kB of inputs and an ONNX, its eval results and cache uses."""
    run = work / DAG_ID / run_id
    created = time.time() - days_ago * 86400
    files = {
        "run.json": json.dumps({"dag_id": DAG_ID, "run_id": run_id, "created": created}).encode(),
        "inputs/00000/000000000001.bin": b"\0" * 40_000,
        "model/gfocal_portable.onnx": b"\2" * 10_000,
        "eval/onnxruntime/stats.json": b'{"AP": 0.4}',
        "summary.json": b"{}",
        **{f"uses/{use}": b"{}" for use in uses},
    }
    for relative, data in files.items():
        (run / relative).parent.mkdir(parents=True, exist_ok=True)
        (run / relative).write_bytes(data)
    for path in [run, *run.rglob("*")]:
        os.utime(path, (created, created))
    return run


def cache_entry(work: Path, name: str, size: int) -> str:
    entry = Cache(work).entry("inputs", {"n": name}, verify="crc32")

    def build(tmp: Path) -> None:
        (tmp / "data.bin").write_bytes(b"\1" * size)

    entry.get_or_build(build)
    os.utime(entry.record_path, (time.time() - 86400,) * 2)
    return entry.key


def test_settings_decide_the_limits_and_the_current_run_is_protected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AIRFLOW__GFOCAL__KEEP_RUNS", "1")
    monkeypatch.setenv("AIRFLOW__GFOCAL__CACHE_MAX_GB", "0")
    mine, other = cache_entry(tmp_path, "mine", 30_000), cache_entry(tmp_path, "other", 30_000)
    current = make_run(tmp_path, "manual__current", 3, uses=(f"inputs-{mine}",))  # older than the newest
    newest = make_run(tmp_path, "scheduled__newest", 1)
    old = make_run(tmp_path, "scheduled__old", 5)
    op = RetentionOperator(task_id="retention", work_dir=str(tmp_path), run_dir=str(current))
    xcom = op.execute(context={})

    assert xcom["keep_runs"] == 1 and xcom["cache_max_bytes"] == 0 and xcom["dry_run"] is False
    assert xcom["runs_pruned"] == 1 and xcom["pruned"] == [str(old)]
    assert xcom["entries_evicted"] == 1 and xcom["evicted"] == [f"inputs/{other}"]
    assert xcom["in_use_runs"] == [str(current)] and xcom["cache_entries_in_use"] == 1
    assert xcom["run_bytes_freed"] == 50_000 and xcom["bytes_freed"] > 50_000 + 30_000
    assert (current / "inputs").is_dir() and (newest / "inputs").is_dir() and not (old / "inputs").exists()
    assert [e.key for e in Cache(tmp_path).entries()] == [mine]
    assert len(json.dumps(xcom)) < 4000


def test_arguments_override_settings_and_the_run_dir_comes_from_the_context(tmp_path: Path) -> None:
    runs = [make_run(tmp_path, f"r{n}", 10 - n) for n in range(4)]
    # no run_dir: <work_dir>/<dag_id>/<run_id> of the running task is protected
    context = {"dag": SimpleNamespace(dag_id=DAG_ID), "run_id": "r0"}
    op = RetentionOperator(task_id="retention", work_dir=str(tmp_path), keep_runs=2, cache_max_gb=100)
    xcom = op.execute(context=context)
    assert xcom["keep_runs"] == 2 and xcom["cache_max_bytes"] == 100 * 10**9
    assert xcom["pruned"] == [str(runs[1])] and xcom["in_use_runs"] == [str(runs[0])]


def test_dry_run_and_bad_limits(tmp_path: Path) -> None:
    runs = [make_run(tmp_path, f"r{n}", 10 - n) for n in range(3)]
    op = RetentionOperator(task_id="retention", work_dir=str(tmp_path), keep_runs=1, dry_run=True)
    assert op.execute(context={})["runs_pruned"] == 2
    assert all((run / "inputs").is_dir() and not (run / "pruned.json").exists() for run in runs)
    with pytest.raises(
        AirflowFailException,
        match=r"ConfigError: RetentionOperator\('retention'\) keep_runs: expected an integer",
    ):
        RetentionOperator(task_id="retention", work_dir=str(tmp_path), keep_runs=0).execute(context={})
    with pytest.raises(AirflowFailException, match=r"cache_max_gb: expected a size in GB >= 0"):
        RetentionOperator(task_id="retention", work_dir=str(tmp_path), cache_max_gb=-1).execute(context={})
    with pytest.raises(AirflowFailException, match=r"work_dir 'work': expected an absolute path"):
        RetentionOperator(task_id="retention", work_dir="work", keep_runs=1).execute(context={})
    assert all((run / "inputs").is_dir() for run in runs)
    assert set(RetentionOperator.template_fields) >= {"work_dir", "run_dir", "keep_runs", "cache_max_gb"}
