"""The nightly where users run it: a CeleryExecutor deployment on this machine, measured per task.

The deployment is the integration tests' (`tests/integration/cluster.py`): Postgres, Redis, api-server,
scheduler, DAG processor, triggerer, a CPU worker (prefork, 2 slots, default queue) and the NPU host's
worker (prefork, 1 slot, queue `ascend`, the emulated CANN toolkit of `tests/emulators`), pool
`ascend_npu` with 1 slot. Its DAGs folder holds the product's DAG files plus `gfocal_noop_floor`, a no-op
TaskFlow task mapped N times: Airflow's own cost of a task on the same deployment (the floor).

Measured, in this order, in one deployment:
1. `--nights` nights of `gfocal_ascend_nightly` over `--images` generated images at 64x64 with the
   form's default shard size: tasks per night, per device task the overhead (queued -> end minus its
   device latencies), the device phase (first infer task queued -> last one ended) against the sum of
   the device latencies (msame's per-inference times), and the night's wall (queued -> end).
   Goals: device phase <= 1.3 x the device latencies; a warm night's wall <= 1.5 x them.
2. per pair, a warm-up round then `--rounds` rounds of [floor run, gfocal run with one-image shards]
   (64x64): `gfocal_onnxruntime` beside the floor on the CPU worker, and `gfocal_ascend_nightly` beside
   the floor whose tasks run on the NPU worker in the `ascend_npu` pool. Per mapped task: queued -> end
   and, where tasks share the one NPU slot, the slot time (end - max(queued, previous task's end)).
   Goal: median(infer) <= 1.2 x median(no-op).

The emulated msame runs the OM's graph in ONNX Runtime on this CPU: no figure here is an NPU figure.

    .venv/bin/python benchmarks/bench_deployed.py                     # 2,000 images, 2 nights
    .venv/bin/python benchmarks/bench_deployed.py --images 200 --nights 1 --rounds 1   # a quick look
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "benchmarks")]

from bench_nightly import DEFAULT_DATA, prepare_data  # noqa: E402
from common import dump, machine  # noqa: E402

from gfocal_pipeline.constants import ASCEND_POOL, ASCEND_QUEUE  # noqa: E402

FLOOR_DAG_ID, ORT_DAG_ID, NIGHTLY_DAG_ID = "gfocal_noop_floor", "gfocal_onnxruntime", "gfocal_ascend_nightly"
FLOOR_NPU_DAG_ID = "gfocal_noop_floor_npu"
DEVICE_TASK = "infer"
FLOOR_DAG = '''"""{dag_id}: written by benchmarks/bench_deployed.py (no-op mapped tasks: the floor)."""

import pendulum
from airflow.sdk import DAG, task

with DAG(
    dag_id="{dag_id}",
    schedule=None,
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    params={{"tasks": 12}},
) as dag:

    @task
    def items(params=None) -> list[int]:
        return list(range(int(params["tasks"])))

    @task({placement})
    def noop(item: int) -> int:
        return item

    noop.expand(item=items())
'''
GOALS = {"infer_vs_floor": 1.2, "device_phase": 1.3, "warm_night": 1.5}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000, help="images of each nightly")
    parser.add_argument("--nights", type=int, default=2)
    parser.add_argument("--size", type=int, default=64, help="square model input (multiple of 32)")
    parser.add_argument("--shard-size", type=int, default=None, help="default: the form's default")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds of [floor, one-image shards]")
    parser.add_argument("--tasks", type=int, default=12, help="mapped tasks of each floor / ORT run")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default: a temp dir)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="generated data, kept for reruns")
    parser.add_argument(
        "--root",
        type=Path,
        default=ROOT,
        help="the project tree the deployment runs (dags/, plugins/, include/, operators/), e.g. a "
        "`git archive` of an earlier commit for a before/after comparison",
    )
    return parser.parse_args(argv)


def dags_folder(out: Path, root: Path) -> Path:
    """The product's DAG files (linked) plus the floor DAGs."""
    folder = out / "dags"
    folder.mkdir(parents=True, exist_ok=True)
    for path in (root / "dags").glob("*.py"):
        link = folder / path.name
        link.unlink(missing_ok=True)
        link.symlink_to(path)
    (folder / f"{FLOOR_DAG_ID}.py").write_text(FLOOR_DAG.format(dag_id=FLOOR_DAG_ID, placement=""))
    npu = f"queue={ASCEND_QUEUE!r}, pool={ASCEND_POOL!r}"  # beside the device tasks: same worker, same slot
    (folder / f"{FLOOR_NPU_DAG_ID}.py").write_text(FLOOR_DAG.format(dag_id=FLOOR_NPU_DAG_ID, placement=npu))
    return folder


def _epoch(value: Any) -> float | None:
    return value.timestamp() if isinstance(value, dt.datetime) else None


def collect(apis: Any, dag_id: str, run_id: str) -> dict[str, Any]:
    """The run's queued/start/end and every task instance's (epoch seconds)."""
    from integration.api import task_instances

    run = apis.runs.get_dag_run(dag_id, run_id)
    tis = [
        {
            "task_id": ti.task_id,
            "map_index": ti.map_index,
            "state": ti.state.value if ti.state else None,
            "queue": ti.queue,
            "hostname": ti.hostname,
            "try_number": ti.try_number,
            "queued": _epoch(ti.queued_when),
            "start": _epoch(ti.start_date),
            "end": _epoch(ti.end_date),
        }
        for ti in task_instances(apis, dag_id, run_id)
    ]
    return {
        "dag_id": dag_id,
        "run_id": run_id,
        "state": run.state.value,
        "queued": _epoch(run.queued_at),
        "start": _epoch(run.start_date),
        "end": _epoch(run.end_date),
        "tis": tis,
    }


def run_dag(apis: Any, cluster: Any, dag_id: str, run_id: str, conf: dict[str, Any], timeout: float) -> dict:
    from integration.api import trigger, wait_runs

    trigger(apis, dag_id, run_id, conf)
    # a regression verdict is not the benchmark's business (CPU fps is noisy): only the gate may fail
    wait_runs(apis, cluster, [(dag_id, run_id)], timeout=timeout, tolerate=frozenset({"gate"}))
    return collect(apis, dag_id, run_id)


def spans(run: dict[str, Any], task_id: str) -> list[float]:
    """queued -> end (s) of every instance of `task_id` in `run`."""
    return [ti["end"] - ti["queued"] for ti in run["tis"] if ti["task_id"] == task_id and ti["queued"]]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def stats(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "median": statistics.median(values),
        "p90": pct(values, 0.9),
        "max": max(values),
    }


def device_latencies(run_dir: Path, backend: str) -> dict[str, float]:
    """{shard: sum of the tool's per-inference times (s)} from the run's timing files."""
    totals = {}
    for path in sorted((run_dir / "timing" / backend).glob("*.json")):
        data = json.loads(path.read_text())
        totals[path.stem] = sum(data.get("latencies_ms") or []) / 1000
    return totals


def slot_times(run: dict[str, Any], task_id: str) -> list[float]:
    """What each instance of `task_id` held its one slot for, the instances running one at a time (the
    NPU pool): end - max(queued, the previous instance's end)."""
    tis = sorted((ti for ti in run["tis"] if ti["task_id"] == task_id), key=lambda ti: ti["start"])
    times, previous = [], 0.0
    for ti in tis:
        times.append(ti["end"] - max(ti["queued"], previous))
        previous = ti["end"]
    return times


@dataclass(frozen=True)
class Pair:
    """A floor DAG and the gfocal run measured beside it: their mapped tasks are compared."""

    name: str
    floor_dag: str
    dag_id: str
    conf: dict[str, Any]
    serial: bool  # the tasks share one slot (the NPU pool): also compare slot times


def pairs(args: argparse.Namespace, data: dict[str, Any]) -> list[Pair]:
    one_image = {**data, "max_images": args.tasks, "shard_size": 1}
    return [
        Pair("cpu: ONNX Runtime, one-image shards", FLOOR_DAG_ID, ORT_DAG_ID, one_image, serial=False),
        Pair("npu: msame (emulated), one-image shards", FLOOR_NPU_DAG_ID, NIGHTLY_DAG_ID, one_image, True),
    ]


PHASES = ("delivery", "start", "parse", "render", "execute", "finish")
_RECEIVED = re.compile(r"^(\S+)Z .*Task execute_workload\[([0-9a-f-]+)\] received")
_EXECUTING = re.compile(r"^\S+ .*\[([0-9a-f-]+)\] Executing workload in Celery: .*log_path='([^']+)'")


def _stamp(text: str) -> float:
    return dt.datetime.fromisoformat(text.rstrip("Z")).replace(tzinfo=dt.UTC).timestamp()


def received_times(worker_logs: list[Path]) -> dict[str, float]:
    """{task log path (relative): when its worker received the Celery message} from the workers' logs."""
    received: dict[str, float] = {}
    paths: dict[str, str] = {}
    for log in worker_logs:
        for line in log.read_text(errors="replace").splitlines():
            if match := _RECEIVED.match(line):
                received[match[2]] = _stamp(match[1])
            elif match := _EXECUTING.match(line):
                paths[match[1]] = match[2]
    return {path: received[celery_id] for celery_id, path in paths.items() if celery_id in received}


def _task_log_marks(path: Path) -> dict[str, float]:
    """Timestamps of the task runner's landmarks in one task log."""
    marks: dict[str, float] = {}
    for line in path.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        event, stamp = str(entry.get("event", "")), entry.get("timestamp")
        if not stamp:
            continue
        when = _stamp(stamp)
        marks.setdefault("first", when)
        if event.startswith("Worker startup parse complete"):
            marks.setdefault("parsed", when)
        elif event == "::endgroup::" and "parsed" in marks:
            marks.setdefault("rendered", when)
        elif event == "::group::Post Execute":
            marks.setdefault("executed", when)
    return marks


def task_phases(ti: dict[str, Any], logs: Path, received: dict[str, float]) -> dict[str, float] | None:
    """Where one task instance's queued -> end went (see `PHASES`), or None without its logs."""
    mapped = f"map_index={ti['map_index']}/" if ti["map_index"] >= 0 else ""
    task = f"dag_id={ti['dag_id']}/run_id={ti['run_id']}/task_id={ti['task_id']}"
    rel = f"{task}/{mapped}attempt={ti['try_number']}.log"
    marks = _task_log_marks(logs / rel) if (logs / rel).is_file() else {}
    if rel not in received or not {"first", "parsed", "rendered", "executed"} <= set(marks):
        return None
    points = [
        ti["queued"],
        received[rel],
        marks["first"],
        marks["parsed"],
        marks["rendered"],
        marks["executed"],
    ]
    points.append(ti["end"])
    return {phase: max(0.0, b - a) for phase, a, b in zip(PHASES, points[:-1], points[1:], strict=True)}


def phase_medians(runs: list[dict[str, Any]], task_id: str, cluster: Any) -> dict[str, float]:
    """Median seconds per phase over every instance of `task_id` in `runs`."""
    received = received_times(sorted(cluster.logs.glob("worker-*.log")))
    logs = cluster.home / "logs"
    found = [
        phases
        for run in runs
        for ti in run["tis"]
        if ti["task_id"] == task_id and ti["queued"]
        for phases in [task_phases({**ti, "dag_id": run["dag_id"], "run_id": run["run_id"]}, logs, received)]
        if phases
    ]
    if not found:
        return {}
    return {"n": len(found), **{phase: statistics.median(f[phase] for f in found) for phase in PHASES}}


def overhead_rounds(apis: Any, cluster: Any, args: argparse.Namespace, data: dict[str, Any]) -> dict:
    """Round 0 warms the workers up (discarded); then alternating floor / gfocal runs per pair."""
    results: dict[str, Any] = {}
    for pair in pairs(args, data):
        floor: list[float] = []
        infer: list[float] = []
        slots: dict[str, list[float]] = {"floor": [], "infer": []}
        runs = []
        for index in range(args.rounds + 1):
            noop = run_dag(apis, cluster, pair.floor_dag, f"floor-{index}", {"tasks": args.tasks}, 600)
            ours = run_dag(apis, cluster, pair.dag_id, f"one-image-{index}", pair.conf, 900)
            runs += [noop, ours]
            if index == 0:
                continue
            floor += spans(noop, "noop")
            infer += spans(ours, DEVICE_TASK)
            if pair.serial:
                slots["floor"] += slot_times(noop, "noop")
                slots["infer"] += slot_times(ours, DEVICE_TASK)
            print(
                f"{pair.name}, round {index}: queued -> end median: no-op "
                f"{statistics.median(spans(noop, 'noop')):.2f} s, infer "
                f"{statistics.median(spans(ours, DEVICE_TASK)):.2f} s",
                flush=True,
            )
        result = {"floor": stats(floor), "infer": stats(infer), "runs": runs}
        measured = runs[2:]  # not the warm-up round
        result["phases"] = {
            "floor": phase_medians(measured[0::2], "noop", cluster),
            "infer": phase_medians(measured[1::2], DEVICE_TASK, cluster),
        }
        result["ratio"] = result["infer"]["median"] / result["floor"]["median"]
        if pair.serial:
            result["slot"] = {name: stats(values) for name, values in slots.items()}
            result["slot_ratio"] = result["slot"]["infer"]["median"] / result["slot"]["floor"]["median"]
        results[pair.name] = result
    return results


def measure_night(apis: Any, cluster: Any, index: int, conf: dict[str, Any]) -> dict[str, Any]:
    """One nightly: tasks, device phase, device latencies, per device task overhead, wall."""
    from integration.api import xcom_value

    run = run_dag(apis, cluster, NIGHTLY_DAG_ID, f"night-{index}", conf, 3600)
    run_dir = Path(xcom_value(apis, NIGHTLY_DAG_ID, run["run_id"], "prepare")["run_dir"])
    latencies = device_latencies(run_dir, conf.get("tool", "msame"))
    shards = sorted(latencies)
    device = sorted((ti for ti in run["tis"] if ti["task_id"] == DEVICE_TASK), key=lambda ti: ti["map_index"])
    overhead = [ti["end"] - ti["queued"] - latencies[shards[ti["map_index"]]] for ti in device]
    phase = max(ti["end"] for ti in device) - min(ti["queued"] for ti in device)
    device_s = sum(latencies.values())
    night = {
        "run": run,
        "tasks": len(run["tis"]),
        "device_tasks": len(device),
        "images_per_device_task": [len(device) and round(conf["max_images"] / len(device), 1)],
        "device_latency_s": device_s,
        "device_phase_s": phase,
        "device_phase_ratio": phase / device_s,
        "device_task_overhead": stats(overhead),
        "wall_s": run["end"] - run["queued"],
        "wall_ratio": (run["end"] - run["queued"]) / device_s,
        "per_task": per_task(run),
        "device_task_phases": phase_medians([run], DEVICE_TASK, cluster),
    }
    print(
        f"night {index}: {night['tasks']} tasks ({len(device)} device), wall {night['wall_s']:.1f} s, "
        f"device phase {phase:.1f} s vs device latencies {device_s:.1f} s "
        f"({night['device_phase_ratio']:.2f}x), wall/device {night['wall_ratio']:.2f}x",
        flush=True,
    )
    return night


def per_task(run: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{task_id: instances, median queued -> end, summed start -> end} in the order they were queued."""
    table: dict[str, dict[str, Any]] = {}
    for ti in sorted(run["tis"], key=lambda t: t["queued"] or 0):
        if not ti["queued"]:
            continue
        slot = table.setdefault(ti["task_id"], {"n": 0, "spans": [], "run_s": 0.0})
        slot["n"] += 1
        slot["spans"].append(ti["end"] - ti["queued"])
        slot["run_s"] += ti["end"] - ti["start"]
    return {
        task: {"n": v["n"], "median_queued_to_end_s": statistics.median(v["spans"]), "run_s": v["run_s"]}
        for task, v in table.items()
    }


def goals(result: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    for name, pair in result["overhead"].items():
        found.append((f"{name}: infer / no-op task (queued -> end, median)", pair["ratio"], "infer_vs_floor"))
        if "slot_ratio" in pair:
            found.append(
                (f"{name}: infer / no-op task (slot time, median)", pair["slot_ratio"], "infer_vs_floor")
            )
    nights = result["nights"]
    for i, night in enumerate(nights):
        found.append(
            (f"night {i}: device phase / device latencies", night["device_phase_ratio"], "device_phase")
        )
    if len(nights) > 1:
        found.append(("warm night: wall / device latencies", nights[-1]["wall_ratio"], "warm_night"))
    return [
        {"goal": name, "value": value, "limit": GOALS[key], "met": value <= GOALS[key]}
        for name, value, key in found
    ]


def deploy_and_measure(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    import airflow_client.client as client
    from emulators.toolkit import make_toolkit
    from integration.api import apis as api_groups
    from integration.api import wait_dags_parsed
    from integration.cluster import ASCEND_HOST, CPU_HOST, running_cluster

    from gfocal_pipeline.constants import ASCEND_POOL, ASCEND_QUEUE

    coco, checkpoint, _ = prepare_data(args.data, args.images)
    toolkit = make_toolkit(out / "cann")
    data = {"coco_root": str(coco), "checkpoint": str(checkpoint), "height": args.size, "width": args.size}
    root = args.root.resolve()
    with running_cluster(root, out / "deployment", dags_folder=dags_folder(out, root)) as cluster:
        cluster.start_worker("worker-cpu", "default", CPU_HOST, concurrency=2)
        cluster.start_worker(
            "worker-ascend",
            ASCEND_QUEUE,
            ASCEND_HOST,
            concurrency=1,
            GFOCAL_CANN_SET_ENV=str(toolkit.set_env),
        )
        configuration = client.Configuration(host=cluster.base_url, access_token=cluster.token())
        with client.ApiClient(configuration) as api:
            apis = api_groups(api)
            dag_ids = (FLOOR_DAG_ID, FLOOR_NPU_DAG_ID, ORT_DAG_ID, NIGHTLY_DAG_ID)
            wait_dags_parsed(apis, cluster, dag_ids)
            apis.pools.post_pool(client.PoolBody(name=ASCEND_POOL, slots=1, description="emulated NPU"))
            for dag_id in dag_ids:
                apis.dags.patch_dag(dag_id, client.DAGPatchBody(is_paused=False))
            conf = {**data, "max_images": args.images}
            if args.shard_size:
                conf["shard_size"] = args.shard_size
            nights = [measure_night(apis, cluster, i, conf) for i in range(args.nights)]  # night 0: cold
            overhead = overhead_rounds(apis, cluster, args, data)
    return {"overhead": overhead, "nights": nights}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-deployed-"))
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    result = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}}
    result.update(deploy_and_measure(args, out))
    result["goals"] = goals(result)
    result["seconds"] = time.time() - started
    result["machine_after"] = {"load_avg": [round(v, 2) for v in os.getloadavg()]}
    dump(out / "bench_deployed.json", result)
    for name, pair in result["overhead"].items():
        for side in ("floor", "infer"):
            phases = pair["phases"][side]
            text = ", ".join(f"{k} {phases[k]:.2f}" for k in PHASES if k in phases)
            print(f"{name}: {side} task phases (median s, n={phases.get('n', 0)}): {text}")
    for goal in result["goals"]:
        print(
            f"{'PASS' if goal['met'] else 'MISS'}  {goal['goal']}: {goal['value']:.2f} (<= {goal['limit']})"
        )
    print(f"results: {out / 'bench_deployed.json'} ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
