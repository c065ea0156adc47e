"""The NPU host is lost mid-shard: every process of the `ascend` Celery worker is SIGKILLed while
msame runs a shard (the emulator hangs in it), the worker comes back, and the nightly heals through
its retries: the run succeeds with the same AP and the same timing files as an uninterrupted run,
no tool process is left behind, and no history row is duplicated.

Runs on the package's cluster after test_celery_deployment (whose uninterrupted nightly it compares
with; it triggers one itself when that module did not run)."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import sqlalchemy as sa
from emulators.toolkit import Toolkit

from integration.api import apis as _apis
from integration.api import summary, task_instances, trigger, wait_runs, wait_task_state, xcom_value
from integration.cluster import ASCEND_HOST, Cluster
from integration.test_celery_deployment import GOOD, NIGHTLY, SMALL

pytestmark = [pytest.mark.integration, pytest.mark.slow]

KILLED = "it-nightly-worker-lost"
BASELINE = GOOD
HANG_TIMEOUT_S = 240


def _msame_processes() -> list[psutil.Process]:
    """Running msame tools (the emulator: `python .../msame --model ...`)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        args = proc.info["cmdline"] or []
        alive = proc.info["status"] != psutil.STATUS_ZOMBIE
        if alive and "--model" in args and any(Path(arg).name == "msame" for arg in args):
            found.append(proc)
    return found


def _kill_tree(pid: int) -> list[int]:
    """SIGKILL a process and all its descendants at once (a host that loses power)."""
    root = psutil.Process(pid)
    procs = [root, *root.children(recursive=True)]
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            os.kill(proc.pid, signal.SIGKILL)
    psutil.wait_procs(procs, timeout=10)
    return [p.pid for p in procs]


def _xcom(apis: Any, run_id: str, task_id: str, map_index: int = -1) -> Any:
    return xcom_value(apis, NIGHTLY, run_id, task_id, map_index)


def _timing_files(apis: Any, run_id: str) -> list[str]:
    run_dir = Path(_xcom(apis, run_id, "prepare")["run_dir"])
    return sorted(str(p.relative_to(run_dir)) for p in (run_dir / "timing").rglob("*.json"))


def _history_rows(cluster: Cluster, run_id: str) -> list[tuple[str, ...]]:
    engine = sa.create_engine(cluster.pg_url(cluster.history_db))
    rows: list[tuple[str, ...]] = []
    try:
        with engine.connect() as conn:
            for table in sa.inspect(conn).get_table_names():
                columns = {c["name"] for c in sa.inspect(conn).get_columns(table)}
                if {"dag_id", "run_id", "backend"} <= columns:
                    query = sa.text(f'SELECT dag_id, run_id, backend FROM "{table}" WHERE run_id = :r')
                    rows += [tuple(r) for r in conn.execute(query, {"r": run_id})]
    finally:
        engine.dispose()
    return rows


def _clear_other_runs(apis: Any) -> None:
    """Delete the nightly's unfinished runs other tests left (the UI form test's full-size runs stay
    queued on a paused DAG): one active run at a time, and none may land on the doomed worker."""
    for run in apis.runs.get_dag_runs(NIGHTLY, limit=100).dag_runs:
        if run.dag_run_id != BASELINE and run.state.value in ("queued", "running"):
            apis.runs.delete_dag_run(NIGHTLY, run.dag_run_id)


def _ensure_baseline(apis: Any, cluster: Cluster) -> None:
    """The uninterrupted nightly to compare with (test_celery_deployment's, else one run now)."""
    import airflow_client.client as client

    try:
        state = apis.runs.get_dag_run(NIGHTLY, BASELINE).state.value
    except client.ApiException:
        trigger(apis, NIGHTLY, BASELINE, SMALL)
        state = None
    if state != "success":
        wait_runs(apis, cluster, [(NIGHTLY, BASELINE)])


@pytest.fixture(scope="module")
def lost_worker(cluster: Cluster, api: Any, toolkit: Toolkit) -> dict[str, Any]:
    import airflow_client.client as client

    from gfocal_pipeline.constants import ASCEND_POOL, ASCEND_QUEUE

    apis = _apis(api)
    with contextlib.suppress(client.ApiException):  # created by test_celery_deployment when it ran
        apis.pools.post_pool(client.PoolBody(name=ASCEND_POOL, slots=1, description="emulated NPU"))
    _clear_other_runs(apis)
    apis.dags.patch_dag(NIGHTLY, client.DAGPatchBody(is_paused=False))
    env = {"GFOCAL_CANN_SET_ENV": str(toolkit.set_env)}
    if "worker-ascend" not in cluster.services:  # test_celery_deployment leaves its worker running
        cluster.start_worker("worker-ascend", ASCEND_QUEUE, ASCEND_HOST, concurrency=1, **env)
    _ensure_baseline(apis, cluster)
    cluster.stop("worker-ascend")

    # the NPU host's worker, whose msame hangs: the first shard is mid-run when the host dies
    doomed = cluster.start_worker(
        "worker-ascend-doomed",
        ASCEND_QUEUE,
        ASCEND_HOST,
        concurrency=1,
        GFOCAL_EMULATOR_FAULT="msame_hang",
        **env,
    )
    trigger(apis, NIGHTLY, KILLED, SMALL)
    wait_task_state(apis, cluster, (NIGHTLY, KILLED), "infer", {"running"})
    deadline = time.monotonic() + HANG_TIMEOUT_S
    while not _msame_processes():
        assert time.monotonic() < deadline, f"msame never started: {summary(apis, NIGHTLY, KILLED)}"
        cluster.check_alive()
        time.sleep(1)
    killed_at = time.monotonic()
    cluster.services.pop("worker-ascend-doomed")
    killed = _kill_tree(doomed.process.pid)
    doomed.process.wait(timeout=10)
    time.sleep(3)
    left = [p.pid for p in _msame_processes()]
    survivors = [pid for pid in killed if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]

    # the host comes back (a healthy msame): the killed attempt is retried there
    cluster.start_worker("worker-ascend", ASCEND_QUEUE, ASCEND_HOST, concurrency=1, **env)
    states = wait_runs(apis, cluster, [(NIGHTLY, KILLED)])
    return {
        "apis": apis,
        "states": states,
        "tis": task_instances(apis, NIGHTLY, KILLED),
        "left_msame": left,
        "survivors": survivors,
        "healed_s": time.monotonic() - killed_at,
    }


def test_the_run_heals_after_the_npu_worker_is_killed_mid_shard(lost_worker: dict[str, Any]) -> None:
    assert lost_worker["states"][KILLED] == "success"
    assert not lost_worker["left_msame"], "msame outlived the worker that ran it"
    assert not lost_worker["survivors"], "processes of the killed worker are still running"
    infers = [ti for ti in lost_worker["tis"] if ti.task_id == "infer"]
    assert max(ti.try_number for ti in infers) >= 2, "no infer attempt was retried"
    assert {ti.state.value for ti in lost_worker["tis"]} == {"success"}


def test_same_ap_and_timing_files_as_an_uninterrupted_run(lost_worker: dict[str, Any]) -> None:
    apis = lost_worker["apis"]
    healed, baseline = _xcom(apis, KILLED, "evaluate"), _xcom(apis, BASELINE, "evaluate")
    assert healed["stats"] == baseline["stats"]
    assert healed["images"] == baseline["images"]
    assert _timing_files(apis, KILLED) == _timing_files(apis, BASELINE)


def test_no_history_row_is_duplicated(cluster: Cluster, lost_worker: dict[str, Any]) -> None:
    rows = _history_rows(cluster, KILLED)
    assert rows, "the healed run recorded nothing"
    assert len(rows) == len(set(rows)), rows
    gate = [ti for ti in lost_worker["tis"] if ti.task_id in ("record", "gate")]
    assert gate and all(ti.try_number == 1 for ti in gate)
