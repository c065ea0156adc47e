"""`bench_nightly.py --zoo`: a three-model night of the models file, on generated data and the emulators.

A models file with three entries (GFocalV2 and RetinaNet with RANDOM weights, and a bring-your-own
ONNX graph: GFocalV2's portable export with its declaration), each with two precision-mode variants,
is parsed by the product's `dags/gfocal_models.py`; each entry's night runs with `dag.test()` (tasks
one at a time in this process, against a migrated SQLite Airflow DB) on the CANN tool emulators of
`tests/emulators` (ONNX Runtime on this CPU behind `atc` / `msame`: no figure here is an NPU figure).

Per model it prints the night's wall time, each task kind's time, and the pure inference time of
every variant (the emulated tool's timed batches) and of the reference; then the whole night against
the sum of the pure inference times: what the pipeline costs around the inference itself.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = [
    {"name": "fp16", "precision_mode": "force_fp16"},
    {"name": "keep", "precision_mode": "must_keep_origin_dtype"},
]


def byo_graph(data: Path, height: int, width: int) -> Path:
    """A bring-your-own graph: GFocalV2's portable export of RANDOM weights (boxes + scores of every
    candidate, host NMS) with its declaration beside it, as a team would bring an MMDeploy graph."""
    from gfocal_pipeline.export import export_onnx
    from gfocal_pipeline.models.gfocalv2.checkpoint import write_random_checkpoint

    graph = data / f"byo_gfocal_{height}x{width}.onnx"
    if not graph.is_file():
        checkpoint = write_random_checkpoint(data / "gfocal_byo_RANDOM.pth", seed=1)
        export_onnx(
            checkpoint=checkpoint,
            output=graph,
            variant="portable",
            height=height,
            width=width,
            dynamic_batch=True,
        )
    declaration = {
        "name": "byo_gfocal",
        "outputs": "candidates",
        "input": {"name": "input.1", "layout": "NCHW", "dtype": "float32"},
        "preprocessing": {"policy": "letterbox", "height": height, "width": width},
        "postprocess": {"score_thr": 0.05, "nms_iou": 0.6, "max_per_img": 100},
    }
    graph.with_suffix(".spec.yaml").write_text(yaml.safe_dump(declaration))
    return graph


def zoo_entries(args: argparse.Namespace, coco: Path, work: Path, set_env: Path) -> list[dict[str, Any]]:
    """Three entries at `--size`: GFocalV2 and RetinaNet (RANDOM weights) and a bring-your-own graph."""
    height, width = (int(v) for v in args.size.lower().split("x"))
    shared = {
        "policy": "letterbox",  # every model at one --size
        "coco_root": str(coco),
        "work_dir": str(work),
        "height": height,
        "width": width,
        "max_images": args.images,
        "shard_size": args.shard_size,
        "cann_set_env": str(set_env),
        "outfmt": "BIN",
    }
    graph = byo_graph(args.data.resolve(), height, width)
    models = {"zoo_gfocal": {"adapter": "gfocalv2"}, "zoo_retina": {"adapter": "retinanet"}}
    models["zoo_byo"] = {"adapter": "onnx", "onnx": str(graph)}
    return [{"name": name, **model, **shared, "variants": VARIANTS} for name, model in models.items()]


def load_zoo(dags: Path, models_file: Path) -> dict[str, Any]:
    """The models file's DAGs, imported from the product's DAG files as the DAG processor would."""
    import importlib.util

    os.environ["GFOCAL_MODELS_FILE"] = str(models_file)
    os.environ["AIRFLOW__GFOCAL__NIGHTLY_DEADLINE_HOURS"] = "0"  # dag.test() cannot run a DeadlineAlert
    os.environ["AIRFLOW__GFOCAL__TASK_RETRIES"] = "0"  # a broken night is reported, not retried
    module = None
    for name in ("gfocal_factory", "gfocal_variants", "gfocal_models"):
        target = dags / f"{name}.py"
        shutil.copyfile(ROOT / "dags" / target.name, target)
        spec = importlib.util.spec_from_file_location(name, target)
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return {key: value for key, value in vars(module).items() if key.endswith("_nightly")}


def pure_inference(run_dir: Path, values: dict[str, Any]) -> dict[str, float]:
    """Seconds of timed inference: each variant's tool in its folder, and the reference."""
    from bench_nightly import timing_totals

    seconds = {}
    for row in values["summary"]["matrix"]:
        folder = run_dir / "variants" / row["variant"]
        seconds[row["variant"]] = timing_totals(folder, row["tool"])["pure_s"]
    reference = values.get("evaluate_reference", {}).get("backend", "torch")
    seconds["reference"] = timing_totals(run_dir, reference)["pure_s"]
    return seconds


def run_model(dag: Any, out: Path) -> dict[str, Any]:
    """One entry's night: wall, per task kind, pure inference, the matrix."""
    from bench_nightly import output_to, per_task, task_instances, xcom_values

    started = time.perf_counter()
    with output_to(out / f"{dag.dag_id}.log"):
        dag_run = dag.test()
    wall = time.perf_counter() - started
    values = xcom_values(dag_run.run_id, dag_id=dag.dag_id)
    if "summary" not in values:
        raise SystemExit(f"{dag.dag_id} failed ({dag_run.state}): see {out / dag.dag_id}.log")
    run_dir = Path(values["prepare"]["run_dir"])
    tasks = per_task(task_instances(dag_run.run_id, dag.dag_id))
    kinds: dict[str, float] = {}
    for task_id, task in tasks.items():
        kind = task_id.split(".")[-1]
        kinds[kind] = kinds.get(kind, 0.0) + task["seconds"]
    pure = pure_inference(run_dir, values)
    return {
        "dag_id": dag.dag_id,
        "state": str(dag_run.state),
        "wall_s": wall,
        "tasks_s": kinds,
        "pure_s": pure,
        "matrix": values.get("summary", {}).get("matrix", []),
    }


def print_model(result: dict[str, Any]) -> None:
    pure = sum(result["pure_s"].values())
    print(f"\n=== {result['dag_id']} ({result['state']}): wall {result['wall_s']:.1f} s")
    for kind, seconds in sorted(result["tasks_s"].items(), key=lambda item: -item[1]):
        print(f"  {kind:28s} {seconds:8.1f} s")
    parts = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in result["pure_s"].items())
    print(
        f"  pure inference: {parts} = {pure:.1f} s; wall / pure = {result['wall_s'] / max(pure, 1e-9):.2f}x"
    )
    for row in result["matrix"]:
        ap, fps = row.get("AP"), row.get("fps")
        print(f"    {row['variant']:6s} {row.get('precision_mode') or '-':24s} AP {ap:.4f}  fps {fps:.2f}")


def run_zoo(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Set up (Airflow home, data, emulators, models file), run the three nights, print the totals."""
    # the checkout first: `operators` is the product's package, not the tests' namespace of that name
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    from bench_nightly import airflow_environment, migrate_db, prepare_data
    from emulators.toolkit import make_toolkit

    home, work = airflow_environment(out)
    migrate_db()
    coco, _, _ = prepare_data(args.data.resolve(), args.images)
    from airflow.models.pool import Pool

    from gfocal_pipeline.constants import ASCEND_POOL

    Pool.create_or_update_pool(ASCEND_POOL, slots=1, description="emulated NPU", include_deferred=False)
    shutil.rmtree(out / "cann", ignore_errors=True)  # a rerun in `out` starts clean
    toolkit = make_toolkit(out / "cann")
    models_file = out / "models.yaml"
    models_file.write_text(yaml.safe_dump({"models": zoo_entries(args, coco, work, toolkit.set_env)}))
    dags = load_zoo(home / "dags", models_file)
    started = time.perf_counter()
    results = [run_model(dag, out) for dag in dags.values()]
    wall = time.perf_counter() - started
    for result in results:
        print_model(result)
    pure = sum(sum(r["pure_s"].values()) for r in results)
    ratio = wall / max(pure, 1e-9)
    print(f"\nthree-model night: wall {wall:.1f} s, pure inference {pure:.1f} s, ratio {ratio:.2f}x")
    summary = {"models": results, "wall_s": wall, "pure_s": pure, "models_file": str(models_file)}
    (out / "bench_zoo_night.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary
