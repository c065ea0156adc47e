"""Both DAGs deployed as users deploy them: CeleryExecutor on PostgreSQL + Redis, a CPU worker on the
default queue and an "NPU host" worker on queue `ascend` (default prefork pool, emulated CANN toolkit
visible to it only), driven through the REST API with `apache-airflow-client`.

One module fixture drives the whole scenario (the runs are what the tests look at):
1. unpause both DAGs, create the `ascend_npu` pool, trigger `gfocal_onnxruntime`, a nightly whose
   `cann_set_env` does not exist, and a good nightly (it waits: `max_active_runs=1`);
2. with the ascend worker down, the bad nightly's `convert` stays queued;
3. start the ascend worker: the bad `convert` fails naming the missing set_env.sh; that run fails (its
   later tasks upstream_failed), then the good nightly runs; it and the ONNX Runtime run succeed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from emulators.toolkit import Toolkit

from integration.api import apis as _apis
from integration.api import (
    log_text,
    task_instances,
    trigger,
    wait_dags_parsed,
    wait_run_ended,
    wait_runs,
    wait_task_state,
    xcom_value,
)
from integration.cluster import ASCEND_HOST, CPU_HOST, DEADLINE_S, Cluster, Inbox, free_port, tail

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ONNX, NIGHTLY = "gfocal_onnxruntime", "gfocal_ascend_nightly"
GOOD, BAD, ORT = "it-nightly", "it-nightly-no-set-env", "it-onnxruntime"
# no shard_size: the default rule (gfocal_pipeline.sharding) with the cluster's `device_slots` = 2 makes
# 2 shards of 3 images at 128x128 (each image is far below a full task's work): infer[0] 2, infer[1] 1
SMALL = {"height": 128, "width": 128, "max_images": 3}
MISSING_SET_ENV = "/nonexistent/Ascend/ascend-toolkit/set_env.sh"
DEVICE_TASKS = {"convert", "infer"}  # the nightly's tasks on queue `ascend`
RUN_TIMEOUT_S = 420
QUEUED_HOLD_S = 10


@dataclass
class Scenario:
    tis: dict[str, list[Any]] = field(default_factory=dict)  # run id -> task instances
    states: dict[str, str] = field(default_factory=dict)
    queued_while_down: list[Any] = field(default_factory=list)  # convert TI samples, ascend worker down
    bad_convert_log: str = ""
    redis_keys: list[str] = field(default_factory=list)
    runs: dict[str, Any] = field(default_factory=dict)  # run id -> DAGRunResponse
    deadline_mails: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _deadline_mails(inbox: Inbox, run_id: str) -> list[str]:
    return [text for text in inbox.texts() if "deadline" in text.lower() and run_id in text]


@pytest.fixture(scope="module")
def scenario(cluster: Cluster, api: Any, toolkit: Toolkit, inbox: Inbox) -> Scenario:
    import airflow_client.client as client

    from gfocal_pipeline.constants import ASCEND_POOL, ASCEND_QUEUE

    start = time.monotonic()
    apis, result = _apis(api), Scenario()
    wait_dags_parsed(apis, cluster, (ONNX, NIGHTLY))
    apis.pools.post_pool(client.PoolBody(name=ASCEND_POOL, slots=1, description="emulated NPU"))
    for dag_id in (ONNX, NIGHTLY):
        apis.dags.patch_dag(dag_id, client.DAGPatchBody(is_paused=False))
    trigger(apis, ONNX, ORT, SMALL)
    trigger(apis, NIGHTLY, BAD, {**SMALL, "cann_set_env": MISSING_SET_ENV})
    trigger(apis, NIGHTLY, GOOD, SMALL)

    # 2. no worker listens on `ascend`: the device task waits in the queue, until (at least) the
    # nightly's deadline alert has been e-mailed
    wait_task_state(apis, cluster, (NIGHTLY, BAD), "convert", {"queued"})
    hold_until, deadline = time.monotonic() + QUEUED_HOLD_S, time.monotonic() + DEADLINE_S + 150
    while time.monotonic() < hold_until or not _deadline_mails(inbox, BAD):
        assert time.monotonic() < deadline, f"no deadline alert for {BAD}; got: {inbox.texts()}"
        result.queued_while_down += [t for t in task_instances(apis, NIGHTLY, BAD) if t.task_id == "convert"]
        time.sleep(2)
    result.deadline_mails = _deadline_mails(inbox, BAD)

    # 3. the NPU host comes up
    cluster.start_worker(
        "worker-ascend", ASCEND_QUEUE, ASCEND_HOST, concurrency=1, GFOCAL_CANN_SET_ENV=str(toolkit.set_env)
    )
    failed = wait_task_state(apis, cluster, (NIGHTLY, BAD), "convert", {"failed", "success"})
    result.bad_convert_log = log_text(apis, NIGHTLY, BAD, failed)
    result.redis_keys = cluster.redis_keys()
    # the bad run ends on its own (its device tasks upstream_failed): marking it failed through the
    # API raced the scheduler, which could still finish the run as "success" (its leaves skipped)
    wait_run_ended(apis, cluster, (NIGHTLY, BAD))
    result.states = wait_runs(apis, cluster, [(ONNX, ORT), (NIGHTLY, GOOD)])
    result.states[BAD] = apis.runs.get_dag_run(NIGHTLY, BAD).state.value
    for dag_id, run_id in ((ONNX, ORT), (NIGHTLY, GOOD), (NIGHTLY, BAD)):
        result.tis[run_id] = task_instances(apis, dag_id, run_id)
        result.runs[run_id] = apis.runs.get_dag_run(dag_id, run_id)
    result.seconds = time.monotonic() - start
    return result


def test_both_dags_succeed_on_celery_through_the_rest_api(scenario: Scenario) -> None:
    assert scenario.states == {ORT: "success", GOOD: "success", BAD: "failed"}
    for run_id in (ORT, GOOD):
        assert {ti.state.value for ti in scenario.tis[run_id]} == {"success"}, run_id
        assert all(ti.executor in (None, "CeleryExecutor") for ti in scenario.tis[run_id])
    infers = [ti for ti in scenario.tis[GOOD] if ti.task_id == "infer"]
    assert sorted(ti.map_index for ti in infers) == [0, 1]  # mapped over the two shards
    assert scenario.redis_keys, "Celery used no key under this cluster's prefix in its Redis DB"


def test_device_tasks_ran_on_the_ascend_worker_and_nothing_else_did(scenario: Scenario) -> None:
    from gfocal_pipeline.constants import ASCEND_POOL, ASCEND_QUEUE

    nightly = scenario.tis[GOOD]
    device = [ti for ti in nightly if ti.task_id in DEVICE_TASKS]
    assert {ti.task_id for ti in device} == DEVICE_TASKS
    for ti in device:
        assert (ti.queue, ti.hostname, ti.pool) == (ASCEND_QUEUE, ASCEND_HOST, ASCEND_POOL), ti.task_id
    others = [ti for ti in nightly if ti.task_id not in DEVICE_TASKS] + scenario.tis[ORT]
    assert {ti.task_id for ti in others} >= {"prepare", "export", "preprocess", "infer_reference", "gate"}
    for ti in others:
        assert (ti.queue, ti.hostname) == ("default", CPU_HOST), (ti.dag_id, ti.task_id, ti.map_index)


def test_a_device_task_waits_while_no_ascend_worker_runs(scenario: Scenario) -> None:
    assert len(scenario.queued_while_down) >= 3
    for ti in scenario.queued_while_down:
        assert ti.state.value == "queued" and not ti.hostname and ti.queue == "ascend"
    bad = {ti.task_id: ti for ti in scenario.tis[BAD] if ti.map_index < 0}
    assert bad["prepare"].state.value == "success" and bad["prepare"].hostname == CPU_HOST


def test_a_second_manual_nightly_waits_for_the_first(scenario: Scenario) -> None:
    """max_active_runs=1: the good nightly, triggered while the bad one was active, started after it ended."""
    bad, good = scenario.runs[BAD], scenario.runs[GOOD]
    assert bad.end_date is not None and good.start_date is not None
    assert good.start_date >= bad.end_date
    assert scenario.runs[ORT].start_date < bad.end_date  # another DAG is not held back


def test_a_missing_history_database_is_a_clear_error(cluster: Cluster) -> None:
    from gfocal_pipeline.history import HistoryError, HistoryStore

    missing = f"{cluster.history_db}_missing"
    with (
        pytest.raises(HistoryError, match=f'database "{missing}" does not exist'),
        HistoryStore(cluster.pg_url(missing)) as store,
    ):
        store.count()


def test_the_deadline_alert_fires_while_the_device_task_waits(scenario: Scenario) -> None:
    assert scenario.deadline_mails, "no deadline alert e-mailed"
    assert NIGHTLY in scenario.deadline_mails[0]
    assert scenario.queued_while_down[-1].state.value == "queued"  # still waiting when it arrived


def test_missing_set_env_on_the_worker_fails_convert_naming_it(scenario: Scenario, inbox: Inbox) -> None:
    bad = {ti.task_id: ti for ti in scenario.tis[BAD] if ti.map_index < 0}
    assert bad["convert"].state.value == "failed" and bad["convert"].hostname == ASCEND_HOST
    assert MISSING_SET_ENV in scenario.bad_convert_log
    assert "set_env" in scenario.bad_convert_log.lower()
    alerts = [t for t in inbox.texts() if "convert" in t and BAD in t and "deadline" not in t.lower()]
    assert alerts and MISSING_SET_ENV in alerts[0], inbox.texts()  # the failure alert names it too


def test_xcoms_read_through_the_api(api: Any, scenario: Scenario, toolkit: Toolkit) -> None:
    apis = _apis(api)

    def value(dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> Any:
        return xcom_value(apis, dag_id, run_id, task_id, map_index)

    convert = value(NIGHTLY, GOOD, "convert")
    assert Path(convert["om_path"]).is_file() and convert["cann_version"] == toolkit.version
    assert value(NIGHTLY, GOOD, "preprocess") == ["00000", "00001"]
    assert [value(NIGHTLY, GOOD, "infer", i)["images"] for i in (0, 1)] == [2, 1]
    for dag_id, run_id in ((ONNX, ORT), (NIGHTLY, GOOD)):
        prepared = value(dag_id, run_id, "prepare")
        assert Path(prepared["run_dir"]).is_dir() and prepared["height"] == 128
        assert 0 <= value(dag_id, run_id, "evaluate")["stats"]["AP"] <= 1
    assert {call["tool"] for call in toolkit.calls()} >= {"atc", "msame"}


def test_history_rows_landed_in_postgres(cluster: Cluster, scenario: Scenario) -> None:
    engine = sa.create_engine(cluster.pg_url(cluster.history_db))
    try:
        with engine.connect() as conn:
            tables = sa.inspect(conn).get_table_names()
            assert tables, "no history table in the Postgres history database"
            rows = []
            for table in tables:
                columns = {c["name"] for c in sa.inspect(conn).get_columns(table)}
                if {"dag_id", "run_id"} <= columns:
                    query = sa.text(f'SELECT dag_id, run_id FROM "{table}"')  # table names from inspect
                    rows += [tuple(r) for r in conn.execute(query)]
    finally:
        engine.dispose()
    assert (ONNX, ORT) in rows and (NIGHTLY, GOOD) in rows
    assert not [r for r in rows if r[1] == BAD]


def test_trend_api_shows_the_runs(cluster: Cluster, scenario: Scenario) -> None:
    data = cluster.get_json("/gfocal/api/trends", cluster.token())
    run_ids = {run["run_id"] for config in data["configurations"] for run in config["runs"]}
    assert {ORT, GOOD} <= run_ids
    dags = {run["dag_id"] for run in data["recent_runs"]}
    assert {ONNX, NIGHTLY} <= dags


def test_the_api_and_trend_page_refuse_anonymous_requests(cluster: Cluster) -> None:
    import urllib.error

    for path in ("/api/v2/dags", "/gfocal/api/trends"):
        with pytest.raises(urllib.error.HTTPError) as info:
            cluster.get_json(path, None)
        assert info.value.code in (401, 403), path


def test_a_worker_whose_broker_is_unreachable_says_so(cluster: Cluster, scenario: Scenario) -> None:
    """Broker down at start: the worker keeps retrying and its log names the broker it cannot reach."""
    dead = f"redis://127.0.0.1:{free_port()}/0"
    env = cluster.worker_env("gfocal-broken-host", AIRFLOW__CELERY__BROKER_URL=dead)
    args = ("celery", "worker", "--queues", "nothing", "--concurrency", "1")
    service = cluster.start("worker-no-broker", *args, env=env)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and service.alive():
            if "Cannot connect to" in tail(service.log):
                break
            time.sleep(1)
        text = tail(service.log, 20000)
        port = dead.rsplit(":", 1)[1].split("/")[0]
        assert "Cannot connect to redis://" in text and f"127.0.0.1:{port}" in text, text
    finally:
        cluster.stop("worker-no-broker")
