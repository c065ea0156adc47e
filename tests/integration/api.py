"""Driving a `cluster.Cluster` through its REST API with `apache-airflow-client`: trigger runs, wait for
task and run states, read logs and XComs. Shared by the integration tests and
`benchmarks/bench_deployed.py` (which measures the same deployment)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import Any

from integration.cluster import Cluster, tail

RUN_TIMEOUT_S = 420


def apis(api: Any) -> Any:
    """The client's API groups on one authenticated `ApiClient`."""
    import airflow_client.client as client

    class Apis:
        dags = client.DAGApi(api)
        runs = client.DagRunApi(api)
        tis = client.TaskInstanceApi(api)
        xcom = client.XComApi(api)
        pools = client.PoolApi(api)
        import_errors = client.ImportErrorApi(api)

    return Apis


def task_instances(apis: Any, dag_id: str, run_id: str) -> list[Any]:
    """Every task instance of a run (mapped ones one per map index)."""
    found: list[Any] = []
    while True:
        page = apis.tis.get_task_instances(dag_id, run_id, limit=100, offset=len(found)).task_instances
        found += page
        if len(page) < 100:
            return found


def wait_dags_parsed(apis: Any, cluster: Cluster, dag_ids: Iterable[str], timeout: float = 180) -> None:
    wanted = set(dag_ids)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        cluster.check_alive()
        if wanted <= {dag.dag_id for dag in apis.dags.get_dags(limit=100).dags}:
            return
        time.sleep(2)
    raise AssertionError(f"DAGs not parsed after {timeout}s:\n{tail(cluster.logs / 'dag-processor.log')}")


def wait_task_state(apis: Any, cluster: Cluster, run: tuple[str, str], task_id: str, states: set[str]) -> Any:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        cluster.check_alive()
        for ti in task_instances(apis, *run):
            if ti.task_id == task_id and ti.state is not None and ti.state.value in states:
                return ti
        time.sleep(2)
    raise AssertionError(f"{run} {task_id} never reached {states}: {summary(apis, *run)}")


def summary(apis: Any, dag_id: str, run_id: str) -> str:
    return ", ".join(
        f"{ti.task_id}[{ti.map_index}]={ti.state.value if ti.state else None}@{ti.hostname}"
        for ti in task_instances(apis, dag_id, run_id)
    )


def log_text(apis: Any, dag_id: str, run_id: str, ti: Any) -> str:
    """A task's log through the API, as text: each structured line as JSON (the raw response: the
    client's model keeps only `event` and `timestamp`, not the exception details)."""
    response = apis.tis.get_log_without_preload_content(
        dag_id, run_id, ti.task_id, ti.try_number, map_index=ti.map_index, full_content=True
    )
    content = json.loads(response.data)["content"]
    return "\n".join(line if isinstance(line, str) else json.dumps(line) for line in content)


def failure_logs(apis: Any, dag_id: str, run_id: str) -> str:
    out = []
    for ti in task_instances(apis, dag_id, run_id):
        if ti.state is not None and ti.state.value == "failed":
            out.append(f"--- {ti.task_id}[{ti.map_index}]\n{log_text(apis, dag_id, run_id, ti)[-3000:]}")
    return "\n".join(out)


def wait_run_ended(apis: Any, cluster: Cluster, run: tuple[str, str], timeout: float = RUN_TIMEOUT_S) -> str:
    """Until the run is success or failed (whichever); returns that state."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        cluster.check_alive()
        state = apis.runs.get_dag_run(*run).state.value
        if state in ("success", "failed"):
            return state
        time.sleep(2)
    raise AssertionError(f"{run} did not end in {timeout}s: {summary(apis, *run)}")


def failed_tasks(apis: Any, dag_id: str, run_id: str) -> set[str]:
    return {
        ti.task_id for ti in task_instances(apis, dag_id, run_id) if ti.state and ti.state.value == "failed"
    }


def wait_runs(
    apis: Any,
    cluster: Cluster,
    runs: list[tuple[str, str]],
    timeout: float = RUN_TIMEOUT_S,
    tolerate: frozenset[str] = frozenset(),
) -> dict[str, str]:
    """Until every run ended; each must have succeeded, or failed in `tolerate`d tasks only (e.g. the
    gate of a benchmark's run), else the failed tasks' logs are raised."""
    deadline = time.monotonic() + timeout
    states: dict[str, str] = {}
    while time.monotonic() < deadline and len(states) < len(runs):
        cluster.check_alive()
        for dag_id, run_id in runs:
            state = apis.runs.get_dag_run(dag_id, run_id).state.value
            if state in ("success", "failed"):
                states[run_id] = state
        time.sleep(2)
    for dag_id, run_id in runs:
        state = states.get(run_id)
        if state == "success" or (state == "failed" and failed_tasks(apis, dag_id, run_id) <= tolerate):
            continue
        raise AssertionError(
            f"{dag_id} {run_id}: {state or 'not finished'}: {summary(apis, dag_id, run_id)}\n"
            f"{failure_logs(apis, dag_id, run_id)}"
        )
    return states


def trigger(apis: Any, dag_id: str, run_id: str, conf: dict[str, Any]) -> None:
    import airflow_client.client as client

    apis.runs.trigger_dag_run(dag_id, client.TriggerDAGRunPostBody(dag_run_id=run_id, conf=conf))


def xcom_value(apis: Any, dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> Any:
    """A task's return value (JSON-decoded)."""
    entry = apis.xcom.get_xcom_entry(dag_id, task_id, run_id, "return_value", map_index=map_index)
    data = entry.actual_instance.value if hasattr(entry, "actual_instance") else entry.value
    return json.loads(data) if isinstance(data, str) else data


def xcom_key_value(apis: Any, run: tuple[str, str], task_id: str, key: str, map_index: int = -1) -> Any:
    """A task's XCom under `key` (JSON-decoded), of `run` = (dag_id, run_id)."""
    entry = apis.xcom.get_xcom_entry(run[0], task_id, run[1], key, map_index=map_index)
    data = entry.actual_instance.value if hasattr(entry, "actual_instance") else entry.value
    return json.loads(data) if isinstance(data, str) else data
