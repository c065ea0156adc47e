"""A simulated nightly at scale through the real DAG: two nights of `gfocal_bench_nightly` on one work dir.

The DAG is built by the factory like the product DAGs (`build_dag(PipelineSpec(...,
family="onnxruntime", reference=True))`): ONNX Runtime on CPU is the device backend, the PyTorch
reference runs beside it. Each night is one `dag.test(run_conf=...)` against a migrated SQLite
Airflow DB in `<out>/airflow` (tasks run in this process, one at a time), on generated COCO-format
data (`make_demo_coco`, kept in `--data` for reruns) and a random-weight checkpoint. Per night it
prints wall time, time per task (from the TaskInstances), disk added in the run directory and in the
caches, the peak disk of the work dir and the peak RSS of the inference tasks (sampler threads), the
device backend's pure inference time, what the summary says was reused, then PASS/MISS per goal;
everything is also written to `<out>/bench_nightly.json`, the task logs to `<out>/night-<n>.log`.

Timings are from the machine it runs on (CPU only: no figure here is an NPU figure):

    .venv/bin/python benchmarks/bench_nightly.py --images 5000 --nights 2
    .venv/bin/python benchmarks/bench_nightly.py --images 2000 --nights 1 --no-cache
    .venv/bin/python benchmarks/bench_nightly.py --zoo --images 48 --size 320x320 --shard-size 24

`--zoo` runs a three-model night of the models file instead (benchmarks/zoo_night.py).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
DAG_ID = "gfocal_bench_nightly"
DEFAULT_DATA = ROOT / "benchmarks" / "build" / "nightly-data"  # ignored by git (build/)
DEVICE, REFERENCE = "onnxruntime", "torch"
INFER_TASKS = ("infer", "infer_reference")
CACHE_OPTIONS = ("cache_inputs", "cache_onnx", "cache_reference")
WINDOW_IMAGES = 1000  # RSS is compared over the infer tasks that ran the first and the last 1,000 images
RSS_TOLERANCE = 0.05  # "flat": the last window's peak at most 5% above the first's
KB_PER_IMAGE_GOAL = 20.0
WALL_RATIO_GOAL = 1.3
REUSED_TASK_S = 1.0  # a reused step may still cost this much per task instance (Airflow, hashing)
DAG_FILE = f'''"""{DAG_ID}: written by benchmarks/bench_nightly.py (the product DAGs' factory)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from airflow.sdk import DAG
from gfocal_factory import PipelineSpec, build_dag

dag: DAG = build_dag(
    PipelineSpec(
        dag_id="{DAG_ID}",
        description="bench_nightly: export -> preprocess -> ONNX Runtime + PyTorch reference -> eval",
        family="onnxruntime",
        reference=True,
    )
)
'''


# --------------------------------------------------------------------------------------------------
# set-up: arguments, Airflow home, data, DAG


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--shard-size", type=int, default=256)
    parser.add_argument("--nights", type=int, default=2)
    parser.add_argument("--size", default="64x64", help="HxW model input (multiples of 32, >= 64)")
    parser.add_argument("--batch-size", type=int, default=1, help="the device backend's batch (DAG param)")
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="intra-op threads of PyTorch in this process (export parity, reference); 0 = torch's default",
    )
    parser.add_argument("--cache", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--zoo",
        action="store_true",
        help="instead: a three-model night of the models file with two precision-mode variants each, on "
        "the CANN tool emulators (benchmarks/zoo_night.py)",
    )
    parser.add_argument("--out", type=Path, default=None, help="results folder (default: a new temp dir)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="generated data, kept for reruns")
    parser.add_argument("--disk-interval", type=float, default=0.5, help="seconds between work-dir walks")
    parser.add_argument("--rss-interval", type=float, default=0.2, help="seconds between RSS samples")
    return parser.parse_args()


def airflow_environment(out: Path) -> tuple[Path, Path]:
    """Point Airflow at a fresh SQLite home under `out` (before anything imports airflow)."""
    home, work = out / "airflow", out / "work"
    for folder in (home, work):  # both belong to this benchmark: a rerun in `out` starts clean
        shutil.rmtree(folder, ignore_errors=True)
    (home / "dags").mkdir(parents=True)
    work.mkdir(parents=True)
    os.environ.update(
        {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(home / "dags"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
            "GFOCAL_WORK_DIR": str(work),
            "GFOCAL_HISTORY_URL": f"sqlite:///{home / 'history.sqlite'}",
        }
    )
    return home, work


def migrate_db() -> float:
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "airflow", "db", "migrate"], check=True, capture_output=True, env=os.environ
    )
    return time.perf_counter() - started


def prepare_data(data: Path, images: int) -> tuple[Path, Path, float]:
    """(coco_root, checkpoint, seconds): `images` generated demo images + the demo's random checkpoint."""
    from gfocal_pipeline import demo_data
    from gfocal_pipeline.models.gfocalv2.checkpoint import write_random_checkpoint

    started = time.perf_counter()
    # the product caps demo sets at MAX_DEMO_IMAGES (1,000): lifted here, for this process only
    with mock.patch.object(demo_data, "MAX_DEMO_IMAGES", max(images, demo_data.MAX_DEMO_IMAGES)):
        coco = demo_data.make_demo_coco(data / f"coco-{images}", num_images=images, seed=0)
    checkpoint = data / "gfocal_r50_fpn_1x_RANDOM.pth"
    if not checkpoint.is_file():
        write_random_checkpoint(checkpoint, seed=0)
    return coco, checkpoint, time.perf_counter() - started


def load_dag(dags: Path) -> Any:
    """Write the DAG file (and the factory) into the DAGs folder and import it, as Airflow would."""
    shutil.copyfile(ROOT / "dags" / "gfocal_factory.py", dags / "gfocal_factory.py")
    target = dags / f"{DAG_ID}.py"
    target.write_text(DAG_FILE)
    spec = importlib.util.spec_from_file_location(target.stem, target)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[target.stem] = module
    spec.loader.exec_module(module)
    return module.dag


# --------------------------------------------------------------------------------------------------
# sampling: disk of the work dir, RSS of this process


def disk_usage(root: Path) -> dict[str, int]:
    """du-like bytes (allocated blocks, hard links once) of a work dir: cache, run inputs, the rest."""
    usage = {"cache": 0, "inputs": 0, "runs": 0}
    seen: set[tuple[int, int]] = set()
    for folder, _, files in os.walk(root):
        parts = Path(folder).relative_to(root).parts
        bucket = "cache" if parts[:1] == ("cache",) else "inputs" if parts[2:3] == ("inputs",) else "runs"
        for name in files:
            try:
                stat = os.lstat(os.path.join(folder, name))
            except FileNotFoundError:  # deleted while walking (a finished shard's inputs)
                continue
            if (stat.st_dev, stat.st_ino) not in seen:
                seen.add((stat.st_dev, stat.st_ino))
                usage[bucket] += stat.st_blocks * 512
    usage["total"] = sum(usage.values())
    return usage


def allocated(root: Path) -> int:
    """Allocated bytes of the files under `root` (0 when it does not exist)."""
    return sum(p.lstat().st_blocks * 512 for p in root.rglob("*") if p.is_file()) if root.exists() else 0


class Sampler(threading.Thread):
    """Calls `probe()` every `interval` s (at least 4x its own cost) until stopped; keeps the samples."""

    def __init__(self, probe: Any, interval: float) -> None:
        super().__init__(daemon=True)
        self.probe, self.interval = probe, interval
        self.samples: list[tuple[float, Any]] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        while True:
            started = time.perf_counter()
            self.samples.append((time.time(), self.probe()))
            cost = time.perf_counter() - started
            if self._stop_event.wait(max(self.interval, 4 * cost)):
                return

    def stop(self) -> list[tuple[float, Any]]:
        self._stop_event.set()
        self.join()
        return self.samples


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


@contextlib.contextmanager
def output_to(log_path: Path) -> Iterator[None]:
    """Send this process's stdout/stderr (the task logs of dag.test) to `log_path`."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log_path, "ab") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


# --------------------------------------------------------------------------------------------------
# one night


def run_conf(args: argparse.Namespace, work: Path, coco: Path, checkpoint: Path) -> dict[str, Any]:
    height, width = (int(v) for v in args.size.lower().split("x"))
    conf = {
        "work_dir": str(work),
        "coco_root": str(coco),
        "checkpoint": str(checkpoint),
        "height": height,
        "width": width,
        "shard_size": args.shard_size,
        "max_images": args.images,
        "batch_size": args.batch_size,
    }
    return {**conf, **dict.fromkeys(CACHE_OPTIONS, args.cache)}


def run_night(dag: Any, conf: dict[str, Any], work: Path, log_path: Path, args: argparse.Namespace) -> dict:
    """One `dag.test` with the samplers running; the raw facts of the night."""
    before = disk_usage(work)
    disk = Sampler(lambda: disk_usage(work), args.disk_interval)
    rss = Sampler(rss_bytes, args.rss_interval)
    disk.start()
    rss.start()
    started = time.perf_counter()
    with output_to(log_path):
        dag_run = dag.test(run_conf=conf)
    wall = time.perf_counter() - started
    disk_samples, rss_samples = disk.stop(), rss.stop()
    return {
        "run_id": dag_run.run_id,
        "state": str(dag_run.state),
        "wall_s": wall,
        "disk_before": before,
        "disk_after": disk_usage(work),
        "disk_samples": disk_samples,
        "rss_samples": rss_samples,
    }


def task_instances(run_id: str, dag_id: str = DAG_ID) -> list[dict[str, Any]]:
    """Every TaskInstance of the run: id, map index, state, start/end (epoch s) and duration."""
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session

    with create_session() as session:
        rows = session.query(TaskInstance).filter_by(dag_id=dag_id, run_id=run_id).all()
        return [
            {
                "task_id": ti.task_id,
                "map_index": ti.map_index,
                "state": str(ti.state),
                "start": ti.start_date.timestamp() if ti.start_date else None,
                "end": ti.end_date.timestamp() if ti.end_date else None,
                "duration_s": (ti.end_date - ti.start_date).total_seconds()
                if ti.start_date and ti.end_date
                else 0.0,
            }
            for ti in rows
        ]


def xcom_values(run_id: str, key: str = "return_value", dag_id: str = DAG_ID) -> dict[str, Any]:
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        rows = session.query(XComModel).filter_by(dag_id=dag_id, run_id=run_id, key=key).all()
        return {(r.task_id if r.map_index < 0 else f"{r.task_id}[{r.map_index}]"): r.value for r in rows}


# --------------------------------------------------------------------------------------------------
# what a night measured


def per_task(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """{task_id: count, seconds (summed over map indexes), states} in start order."""
    table: dict[str, dict[str, Any]] = {}
    for row in sorted(rows, key=lambda r: (r["start"] or float("inf"), r["map_index"])):
        slot = table.setdefault(row["task_id"], {"count": 0, "seconds": 0.0, "states": set()})
        slot["count"] += 1
        slot["seconds"] += row["duration_s"]
        slot["states"].add(row["state"])
    return {k: {**v, "states": sorted(v["states"])} for k, v in table.items()}


def timing_totals(run_dir: Path, backend: str) -> dict[str, Any]:
    """Sum of the timed batch latencies over every shard of `backend`, and its host NMS time."""
    latency_ms = nms_ms = 0.0
    images = files = 0
    for path in sorted((run_dir / "timing" / backend).glob("*.json")):
        data = json.loads(path.read_text())
        summary = data.get("summary", {})
        latency_ms += sum(data.get("latencies_ms") or [])
        nms_ms += summary.get("host_nms_ms_per_image", 0.0) * summary.get("images", 0)
        images += summary.get("images", 0)
        files += 1
    return {"pure_s": latency_ms / 1000, "host_nms_s": nms_ms / 1000, "images": images, "shards": files}


def shard_images(map_index: int, images: int, shard_size: int) -> int:
    return max(0, min(shard_size, images - map_index * shard_size))


def window(runs: list[dict[str, Any]], images: int, shard_size: int) -> list[dict[str, Any]]:
    """The leading task instances of `runs` that together processed WINDOW_IMAGES images."""
    chosen, count = [], 0
    for row in runs:
        if count >= WINDOW_IMAGES:
            break
        chosen.append(row)
        count += shard_images(row["map_index"], images, shard_size)
    return chosen


def rss_windows(rows: list[dict[str, Any]], samples: list, images: int, shard_size: int) -> dict:
    """Peak RSS over the infer tasks that ran the first and the last WINDOW_IMAGES images of the night
    (in execution order: dag.test runs mapped tasks in no fixed order), per task id."""
    result: dict[str, dict[str, Any]] = {}
    for task_id in INFER_TASKS:
        runs = sorted(
            (r for r in rows if r["task_id"] == task_id and r["start"] is not None and r["end"] is not None),
            key=lambda r: r["start"],
        )
        windows: dict[str, Any] = {"shards": {}}
        for name, chosen in (
            ("first", window(runs, images, shard_size)),
            ("last", window(runs[::-1], images, shard_size)),
        ):
            inside = [v for t, v in samples if any(r["start"] <= t <= r["end"] for r in chosen)]
            windows[name] = max(inside) if inside else None
            windows["shards"][name] = sorted(r["map_index"] for r in chosen)
        result[task_id] = windows
    return result


def rss_timeline(samples: list, points: int = 400) -> list[tuple[float, int]]:
    """Every n-th (time, RSS) sample, for the JSON (n so that about `points` remain)."""
    step = max(1, len(samples) // points)
    return [(round(t, 2), v) for t, v in samples[::step]]


def peak_disk(facts: dict[str, Any]) -> dict[str, int]:
    samples = [usage for _, usage in facts["disk_samples"]] + [facts["disk_after"]]
    before = facts["disk_before"]
    return {
        "peak_total": max(u["total"] for u in samples),
        "peak_added": max(u["total"] for u in samples) - before["total"],
        "peak_inputs": max(u["inputs"] for u in samples),
        "samples": len(samples),
    }


def summarize_night(facts: dict[str, Any], work: Path, args: argparse.Namespace) -> dict[str, Any]:
    from gfocal_pipeline.steps import run_directory

    run_dir = run_directory(work, DAG_ID, facts["run_id"])
    rows = task_instances(facts["run_id"])
    before, after = facts["disk_before"], facts["disk_after"]
    summary_file = run_dir / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    device = timing_totals(run_dir, DEVICE)
    tasks = per_task(rows)
    return {
        "run_id": facts["run_id"],
        "state": facts["state"],
        "run_dir": str(run_dir),
        "wall_s": facts["wall_s"],
        "tasks": tasks,
        "task_instances": rows,
        "task_seconds": sum(t["seconds"] for t in tasks.values()),
        "disk": {
            "run_dir_added": after["runs"] + after["inputs"] - before["runs"] - before["inputs"],
            "cache_added": after["cache"] - before["cache"],
            "model_dir": allocated(run_dir / "model"),  # the graph, when the ONNX cache is off
            **peak_disk(facts),
        },
        "rss": rss_windows(rows, facts["rss_samples"], args.images, args.shard_size),
        "rss_samples": len(facts["rss_samples"]),
        "rss_timeline": rss_timeline(facts["rss_samples"]),
        "device": device,
        "reference": timing_totals(run_dir, REFERENCE),
        "cache_summary": summary.get("cache", {}),
        "cached": cached_flags(facts["run_id"]),
        "gate": gate_verdict(facts["run_id"]),
        "failed_tasks": sorted({r["task_id"] for r in rows if r["state"] != "success"}),
        "images": (summary.get("backends", {}).get("device") or {}).get("images"),
    }


def cached_flags(run_id: str) -> dict[str, Any]:
    """The `cached` facts the tasks pushed: preprocess (key manifest), export, infer_reference[i]."""
    values = xcom_values(run_id)
    manifest = xcom_values(run_id, "manifest").get("preprocess") or {}
    reference = [v.get("cached") for k, v in values.items() if k.startswith("infer_reference[")]
    return {
        "preprocess": manifest.get("cached"),
        "export": (values.get("export") or {}).get("cached"),
        "infer_reference": f"{sum(bool(c) for c in reference)}/{len(reference)}",
        "infer_reference_all": bool(reference) and all(reference),
    }


def _num(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, int | float) else str(value)


def gate_verdict(run_id: str) -> dict[str, Any]:
    """The gate's verdict: passed, and value vs baseline of each check that failed."""
    verdict = xcom_values(run_id, "verdict").get("gate") or {}
    failed = [c for c in verdict.get("checks", []) if not c.get("passed")]
    return {
        "passed": verdict.get("passed"),
        "failed": [f"{c.get('name')}: {_num(c.get('value'))} (limit {_num(c.get('limit'))})" for c in failed],
    }


# --------------------------------------------------------------------------------------------------
# profile of the device branch (measured after the nights, outside their wall time)


def profile_ort(onnx_path: Path, size: str, batch_size: int) -> dict[str, float]:
    """ORT session load (the backend's constructor: sha256 + session) and one warm-up batch, in s."""
    import numpy as np

    from gfocal_pipeline.backends.registry import get_backend

    height, width = (int(v) for v in size.lower().split("x"))
    started = time.perf_counter()
    backend = get_backend(DEVICE, model=onnx_path, batch_size=batch_size)
    loaded = time.perf_counter()
    batch = np.random.default_rng(0).standard_normal((batch_size, 3, height, width), dtype=np.float32)
    backend.run_batch(batch)
    warm = time.perf_counter()
    backend.run_batch(batch)
    return {
        "session_load_s": loaded - started,
        "warmup_s": warm - loaded,
        "steady_s": time.perf_counter() - warm,
    }


def breakdown(night: dict[str, Any], probe: dict[str, float]) -> dict[str, float]:
    """Where the night's wall time goes, from the task table and the device branch's probe."""
    tasks, device = night["tasks"], night["device"]
    infer = tasks.get("infer", {"count": 0, "seconds": 0.0})
    count = infer["count"]
    session = probe["session_load_s"] * count
    warmup = probe["warmup_s"] * count
    other_infer = infer["seconds"] - device["pure_s"] - device["host_nms_s"] - session - warmup
    rest = {k: v["seconds"] for k, v in tasks.items() if k != "infer"}
    return {
        "device pure inference": device["pure_s"],
        "device host NMS": device["host_nms_s"],
        f"ORT session load x{count} (probe)": session,
        f"warm-up batch x{count} (probe)": warmup,
        "infer: other (build/read inputs, write outputs, task start/end)": other_infer,
        **{f"task {k}": v for k, v in rest.items()},
        "Airflow between tasks (wall - sum of tasks)": night["wall_s"] - night["task_seconds"],
    }


# --------------------------------------------------------------------------------------------------
# goals and printing


def goals(nights: list[dict[str, Any]], args: argparse.Namespace, shard_bytes: int) -> list[dict]:
    """[{goal, verdict PASS/MISS/n/a, detail}] for the issue's goals."""
    found = [per_image_goal(nights, args)]
    if args.cache:
        found += [reuse_goal(nights), wall_goal(nights)]
    else:
        found.append(bounded_disk_goal(nights, shard_bytes))
    found.append(rss_goal(nights, args))
    return found


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else "PASS" if ok else "MISS"


def reuse_goal(nights: list[dict[str, Any]]) -> dict[str, Any]:
    goal = "night 2 reuses preprocessing, export and reference (cached, ~0 s of their work)"
    if len(nights) < 2:
        return {"goal": goal, "verdict": "n/a", "detail": "needs --nights 2"}
    first, second = nights[0], nights[1]
    cached = second["cached"]
    flags = cached["preprocess"] is True and cached["export"] is True and cached["infer_reference_all"]
    seconds = {
        t: second["tasks"].get(t, {}).get("seconds", 0.0) for t in ("preprocess", "export", *INFER_TASKS[1:])
    }
    before = {t: first["tasks"].get(t, {}).get("seconds", 0.0) for t in seconds}
    counts = {t: second["tasks"].get(t, {}).get("count", 1) for t in seconds}
    quick = all(seconds[t] <= max(0.1 * before[t], REUSED_TASK_S * counts[t]) for t in seconds)
    detail = (
        f"cached: preprocess {cached['preprocess']}, export {cached['export']}, "
        f"infer_reference {cached['infer_reference']}; night 2 s (night 1 s): "
        + ", ".join(f"{t} {seconds[t]:.1f} ({before[t]:.1f})" for t in seconds)
        + f" [each <= 10% of night 1 or {REUSED_TASK_S:.0f} s per task instance]"
    )
    return {"goal": goal, "verdict": _verdict(bool(flags and quick)), "detail": detail}


def wall_goal(nights: list[dict[str, Any]]) -> dict[str, Any]:
    goal = f"night 2 wall <= {WALL_RATIO_GOAL} x the device backend's pure inference time"
    if len(nights) < 2:
        return {"goal": goal, "verdict": "n/a", "detail": "needs --nights 2"}
    night = nights[1]
    ratio = night["wall_s"] / max(night["device"]["pure_s"], 1e-9)
    detail = f"{night['wall_s']:.1f} s / {night['device']['pure_s']:.1f} s = {ratio:.2f}x"
    return {"goal": goal, "verdict": _verdict(ratio <= WALL_RATIO_GOAL), "detail": detail}


def per_image_goal(nights: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    goal = f"disk added per night outside the caches <= {KB_PER_IMAGE_GOAL:.0f} KB/image"
    # without the ONNX cache the graph itself lives in the run directory: counted apart
    model = [0 if args.cache else n["disk"]["model_dir"] for n in nights]
    values = [
        (n["disk"]["run_dir_added"] - m) / 1000 / args.images for n, m in zip(nights, model, strict=True)
    ]
    detail = ", ".join(f"night {i + 1}: {v:.2f} KB/image" for i, v in enumerate(values))
    if not args.cache:
        detail += f" (without the run's model/ folder, the graph: {max(model) / 1e6:.1f} MB per night)"
    return {"goal": goal, "verdict": _verdict(all(v <= KB_PER_IMAGE_GOAL for v in values)), "detail": detail}


def bounded_disk_goal(nights: list[dict[str, Any]], shard_bytes: int) -> dict[str, Any]:
    goal = "--no-cache: peak input disk <= inputs of (in-flight shards + 1)"
    in_flight = 1  # dag.test runs one task at a time
    limit = (in_flight + 1) * shard_bytes
    peak = max(n["disk"]["peak_inputs"] for n in nights)
    detail = (
        f"peak of <run>/inputs {peak / 1e6:.1f} MB vs {in_flight + 1} shards x {shard_bytes / 1e6:.1f} MB "
        f"= {limit / 1e6:.1f} MB (peak work-dir growth, model and results included: "
        f"{max(n['disk']['peak_added'] for n in nights) / 1e6:.1f} MB)"
    )
    return {"goal": goal, "verdict": _verdict(peak <= limit), "detail": detail}


def rss_goal(nights: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    goal = f"peak RSS flat from the first to the last {WINDOW_IMAGES} images (<= +{RSS_TOLERANCE:.0%})"
    if args.images < 2 * WINDOW_IMAGES:
        return {"goal": goal, "verdict": "n/a", "detail": f"needs --images >= {2 * WINDOW_IMAGES}"}
    checks, parts = [], []
    for i, night in enumerate(nights):
        for task_id, window in night["rss"].items():
            if window["first"] is None or window["last"] is None:
                continue
            checks.append(window["last"] <= window["first"] * (1 + RSS_TOLERANCE))
            parts.append(
                f"night {i + 1} {task_id}: {window['first'] / 2**20:.0f} -> {window['last'] / 2**20:.0f} MiB"
            )
    return {"goal": goal, "verdict": _verdict(bool(checks) and all(checks)), "detail": "; ".join(parts)}


def mb(value: float) -> str:
    return f"{value / 1e6:9.1f} MB"


def line(label: str, value: str) -> None:
    print(f"{label:46s} {value}")


def print_night(index: int, night: dict[str, Any], parts: dict[str, float], args: argparse.Namespace) -> None:
    print(f"\n=== night {index} ({night['state']}): {night['run_id']}")
    line("wall time", f"{night['wall_s']:9.1f} s")
    for task_id, task in night["tasks"].items():
        name = task_id if task["count"] == 1 else f"{task_id} x{task['count']}"
        bad = "" if task["states"] == ["success"] else f"  {task['states']}"
        line(f"  {name}", f"{task['seconds']:9.1f} s{bad}")
    line("  (Airflow between tasks)", f"{night['wall_s'] - night['task_seconds']:9.1f} s")
    print_measures(night, args)
    print("  where the time goes:")
    for name, seconds in parts.items():
        print(f"    {name:60s} {seconds:8.1f} s")


def print_measures(night: dict[str, Any], args: argparse.Namespace) -> None:
    disk, device = night["disk"], night["device"]
    line("disk added, run directory", mb(disk["run_dir_added"]))
    line("disk added, caches", mb(disk["cache_added"]))
    line("peak disk of the work dir (growth)", f"{mb(disk['peak_added'])}  ({disk['samples']} walks)")
    line("peak of the per-task input shards", mb(disk["peak_inputs"]))
    for task_id, window in night["rss"].items():
        first, last = (window[k] / 2**20 if window[k] else float("nan") for k in ("first", "last"))
        line(f"peak RSS {task_id}, first/last {WINDOW_IMAGES} img", f"{first:6.0f} / {last:6.0f} MiB")
    line("device (onnxruntime, CPU) pure inference", f"{device['pure_s']:9.1f} s  ({device['images']} img)")
    line("wall / pure inference", f"{night['wall_s'] / max(device['pure_s'], 1e-9):9.2f} x")
    per_image = f"{disk['run_dir_added'] / 1000 / args.images:9.2f} KB"
    if disk["model_dir"]:  # the ONNX cache is off: the graph is in the run directory
        per_image += (
            f"  ({(disk['run_dir_added'] - disk['model_dir']) / 1000 / args.images:.2f} KB without model/)"
        )
    line("disk added per image outside the caches", per_image)
    reused = [f"{k} {v['reused']} reused / {v['built']} built" for k, v in night["cache_summary"].items()]
    line("summary cache block", ", ".join(reused) or "-")
    flags = {k: v for k, v in night["cached"].items() if k != "infer_reference_all"}
    line("XCom cached", json.dumps(flags))
    gate = night["gate"]
    verdict = {True: "passed", None: "not run"}.get(gate["passed"], f"FAILED: {'; '.join(gate['failed'])}")
    line("regression gate", verdict)


def machine() -> dict[str, Any]:
    with open("/proc/cpuinfo") as cpuinfo:
        names = [text.split(":", 1)[1].strip() for text in cpuinfo if text.startswith("model name")]
    model = names[0] if names else platform.processor()
    with open("/proc/meminfo") as meminfo:
        total_kb = int(next(t for t in meminfo if t.startswith("MemTotal")).split()[1])
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "ram_gib": round(total_kb / 2**20, 1),
        "load_avg_at_start": os.getloadavg(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
    }


# --------------------------------------------------------------------------------------------------


def set_up(args: argparse.Namespace, out: Path) -> tuple[Any, Path, dict[str, Any], dict[str, float]]:
    """(dag, work dir, run conf, setup seconds): Airflow home + DB, data, DAG, torch threads."""
    home, work = airflow_environment(out)
    setup = {"migrate_s": migrate_db()}
    coco, checkpoint, setup["data_s"] = prepare_data(args.data.resolve(), args.images)
    if args.torch_threads > 0:
        import torch

        torch.set_num_threads(args.torch_threads)
    dag = load_dag(home / "dags")
    return dag, work, run_conf(args, work, coco, checkpoint), setup


def report(args: argparse.Namespace, nights: list[dict[str, Any]], results: dict[str, Any]) -> None:
    """Print each night's table and the goals; add the profile and verdicts to `results`."""
    onnx_path = onnx_of(nights[-1])
    probe = {"session_load_s": 0.0, "warmup_s": 0.0}
    if onnx_path:
        probe = profile_ort(onnx_path, args.size, args.batch_size)
    profiles = [breakdown(night, probe) for night in nights]
    for index, (night, parts) in enumerate(zip(nights, profiles, strict=True), start=1):
        print_night(index, night, parts, args)
    height, width = (int(v) for v in args.size.lower().split("x"))
    verdicts = goals(nights, args, args.shard_size * 3 * height * width * 4)
    host = results["machine"]
    print(f"\nmachine: {host['cpu']}, {host['cores']} cores, {host['ram_gib']} GiB, {host['date']}")
    print(f"ORT probe: {json.dumps({k: round(v, 3) for k, v in probe.items()})}")
    for verdict in verdicts:
        print(f"{verdict['verdict']:4s}  {verdict['goal']}: {verdict['detail']}")
    results.update(nights=nights, profile=profiles, probe=probe, goals=verdicts)


def main() -> None:
    args = parse_args()
    out = (args.out or Path(tempfile.mkdtemp(prefix="bench-nightly-"))).resolve()
    out.mkdir(parents=True, exist_ok=True)
    print(f"results: {out}")
    started = time.perf_counter()
    results: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "machine": machine()}
    if args.zoo:
        from zoo_night import run_zoo

        zoo = run_zoo(args, out)
        host = results["machine"]
        print(f"machine: {host['cpu']}, {host['cores']} cores, {host['ram_gib']} GiB, {host['date']}")
        (out / "bench_nightly.json").write_text(json.dumps({**results, "zoo": zoo}, indent=2, default=str))
        return
    dag, work, conf, setup = set_up(args, out)
    print(f"setup {json.dumps({k: round(v, 1) for k, v in setup.items()})}; conf {json.dumps(conf)}")
    nights = []
    for index in range(1, args.nights + 1):
        facts = run_night(dag, conf, work, out / f"night-{index}.log", args)
        nights.append(summarize_night(facts, work, args))
        print(f"night {index}: {facts['state']} in {facts['wall_s']:.1f} s", flush=True)
    results.update(setup=setup, conf=conf)
    report(args, nights, results)
    results["benchmark_s"] = time.perf_counter() - started
    (out / "bench_nightly.json").write_text(json.dumps(results, indent=2, default=str))
    print(f"benchmark {results['benchmark_s']:.0f} s; wrote {out / 'bench_nightly.json'}")
    broken = [t for n in nights for t in n["failed_tasks"] if t != "gate"]  # a gate verdict is a result
    if broken:
        sys.exit(f"task(s) {sorted(set(broken))} failed: see {out}/night-*.log")


def onnx_of(night: dict[str, Any]) -> Path | None:
    path = (xcom_values(night["run_id"]).get("export") or {}).get("onnx_path")
    return Path(path) if path and Path(path).is_file() else None


if __name__ == "__main__":
    main()
