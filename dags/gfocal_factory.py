"""One factory for every gfocal DAG: the ONNX Runtime (embedded) and the Ascend nightly variants.

A `PipelineSpec` says which backend runs the converted model, where it runs (queue, pool), whether a
PyTorch reference runs beside it, and the schedule. Everything a run needs comes from `params`, so a
run triggered from the UI form and a scheduled one take the same path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pendulum
from airflow.sdk import DAG, Param, XComArg

from gfocal_pipeline.config import default_work_dir, demo_paths, validate_run_config
from gfocal_pipeline.constants import DEFAULT_HEIGHT, DEFAULT_WIDTH

PREPARE = "prepare"
RUN = "{{ ti.xcom_pull(task_ids='prepare') }}"


def cfg(key: str) -> str:
    """Jinja for one validated parameter, as pushed by the prepare task."""
    return "{{ ti.xcom_pull(task_ids='" + PREPARE + "')['" + key + "'] }}"


@dataclass(frozen=True)
class PipelineSpec:
    dag_id: str
    description: str
    backend: str  # onnxruntime | msame
    schedule: str | None = None
    reference: bool = False  # also run the PyTorch model on the same inputs
    queue: str | None = None  # Celery queue of the device inference tasks
    pool: str | None = None
    tags: tuple[str, ...] = ()
    extra_params: dict[str, Param] = field(default_factory=dict)
    device: str = "cpu"  # the history's `device` column for the device backend
    deadline: timedelta | None = None  # alert when a run has not finished this long after queueing


def _p(default: Any, title: str, description: str, **schema: Any) -> Param:
    return Param(default, title=title, description=description, **schema)


def common_params() -> dict[str, Param]:
    """Form fields shared by every gfocal DAG (validated by Airflow before a run is created)."""
    demo = demo_paths()
    return {
        "checkpoint": _p(
            str(demo["checkpoint"]),
            "Checkpoint (.pth)",
            "mmcv-style GFocalV2 R50-FPN checkpoint. Default: generated RANDOM weights.",
            type="string",
            minLength=1,
        ),
        "coco_root": _p(
            str(demo["coco_root"]),
            "COCO root",
            "Folder with val2017/ and annotations/instances_val2017.json. Default: the demo set.",
            type="string",
            minLength=1,
        ),
        "work_dir": _p(
            str(default_work_dir()),
            "Work directory",
            "Runs are written to <work_dir>/<dag_id>/<run_id>/; the OM cache lives here too.",
            type="string",
            minLength=1,
        ),
        "policy": _p(
            "letterbox",
            "Resize policy",
            "letterbox: the ModelZoo recipe (into 1216x800, pad bottom-right); "
            "mmdet: the official test pipeline (1333x800 keep-ratio, pad to /32).",
            type="string",
            enum=["letterbox", "mmdet"],
        ),
        "dtype": _p(
            "float32",
            "Input dtype",
            "float32: normalized on the host (the recipe's .bin); uint8: 4x smaller, normalized "
            "in the model (AIPP on Ascend).",
            type="string",
            enum=["float32", "uint8"],
        ),
        "height": _p(
            DEFAULT_HEIGHT,
            "Input height",
            "Model input height in pixels (multiple of 32).",
            type="integer",
            minimum=64,
            maximum=4096,
            multipleOf=32,
        ),
        "width": _p(
            DEFAULT_WIDTH,
            "Input width",
            "Model input width in pixels (multiple of 32).",
            type="integer",
            minimum=64,
            maximum=4096,
            multipleOf=32,
        ),
        "batch_size": _p(
            1, "Batch size", "Images per inference call.", type="integer", minimum=1, maximum=256
        ),
        "shard_size": _p(
            8,
            "Images per shard",
            "Inference is mapped over shards; each shard is one task.",
            type="integer",
            minimum=1,
            maximum=100000,
        ),
        "max_images": _p(
            None,
            "Max images",
            "Use only the first N images by id (empty = all).",
            type=["null", "integer"],
            minimum=1,
        ),
        "engine": _p(
            "faster-coco-eval",
            "COCO evaluator",
            "faster-coco-eval (default) or pycocotools; they give the same numbers.",
            type="string",
            enum=["faster-coco-eval", "pycocotools"],
        ),
        "min_ap": _p(
            None,
            "Minimum AP",
            "Absolute floor, e.g. 0.400. Empty = no floor.",
            type=["null", "number"],
            minimum=0,
            maximum=1,
        ),
        "min_fps": _p(
            None,
            "Minimum fps",
            "Absolute floor in frames per second. Empty = no floor.",
            type=["null", "number"],
            minimum=0,
        ),
        "ap_tolerance": _p(
            0.003,
            "AP tolerance",
            "Allowed AP drop below the baseline (absolute).",
            type="number",
            minimum=0,
            exclusiveMaximum=1,
        ),
        "fps_tolerance": _p(
            0.05,
            "fps tolerance",
            "Allowed fps drop below the baseline (fraction: 0.05 = 5%).",
            type="number",
            minimum=0,
            exclusiveMaximum=1,
        ),
        "baseline_runs": _p(
            5,
            "Baseline runs",
            "The baseline is the median of the last N passing runs of the same configuration.",
            type="integer",
            minimum=1,
            maximum=100,
        ),
    }


def ascend_params() -> dict[str, Param]:
    """Form fields of the Ascend DAG."""
    return {
        "tool": _p(
            "msame",
            "Inference tool",
            "msame (the recipe) or ais_bench.",
            type="string",
            enum=["msame", "ais_bench"],
        ),
        "device": _p(
            0, "NPU device id", "The --device of msame/ais_bench.", type="integer", minimum=0, maximum=255
        ),
        "chips": _p(
            1,
            "Chips per card",
            "fps = chips x 1000 x batch / mean ms (4 for an Atlas 300I / Ascend 310).",
            type="integer",
            minimum=1,
            maximum=16,
        ),
        "outfmt": _p(
            "BIN",
            "Tool output format",
            "BIN (exact) or TXT (6 significant digits).",
            type="string",
            enum=["BIN", "TXT"],
        ),
        "soc_version": _p(
            "",
            "SoC version",
            "e.g. Ascend310P3; empty = detect with npu-smi info.",
            type="string",
            pattern="^(Ascend[0-9A-Za-z]+)?$",
        ),
        "precision_mode": _p(
            "force_fp16",
            "atc precision mode",
            "Passed to atc --precision_mode.",
            type="string",
            enum=["force_fp16", "allow_fp32_to_fp16", "must_keep_origin_dtype", "allow_mix_precision"],
        ),
        "cann_set_env": _p(
            "",
            "CANN set_env.sh",
            "Sourced once for the tools' environment. Empty = $GFOCAL_CANN_SET_ENV on the worker, "
            "else /usr/local/Ascend/ascend-toolkit/set_env.sh.",
            type="string",
            pattern="^[^;|&$`<>()!*?{}\\[\\]~'\"]*$",
        ),
    }


def build_dag(spec: PipelineSpec) -> DAG:
    """Build the DAG described by `spec` (see module docstring)."""
    from operators import (
        CocoEvalOperator,
        CocoPreprocessOperator,
        OnnxExportOperator,
        OnnxRuntimeInferOperator,
        PrepareRunOperator,
        RunSummaryOperator,
        TorchInferOperator,
    )
    from operators.alerting import GfocalAlertNotifier
    from operators.quality import RecordResultsOperator, RegressionGateOperator

    params = {**common_params(), **spec.extra_params}
    deadline = None
    if spec.deadline is not None:
        from airflow.sdk import DeadlineAlert, DeadlineReference, SyncCallback

        deadline = DeadlineAlert(
            reference=DeadlineReference.DAGRUN_QUEUED_AT,
            interval=spec.deadline,
            callback=SyncCallback(
                "operators.alerting.deadline_missed",
                kwargs={"dag_id": spec.dag_id, "interval": str(spec.deadline)},
            ),
        )
    with DAG(
        dag_id=spec.dag_id,
        description=spec.description,
        schedule=spec.schedule,
        start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
        catchup=False,
        max_active_runs=1,
        params=params,
        tags=["gfocal", *spec.tags],
        default_args={
            "retries": 0,
            "retry_delay": timedelta(minutes=2),
            "on_failure_callback": GfocalAlertNotifier(),
        },
        deadline=deadline,
        render_template_as_native_obj=True,
        doc_md=__doc__,
    ) as dag:
        prepare = PrepareRunOperator(
            task_id=PREPARE,
            config={name: "{{ params." + name + " }}" for name in params},
            validator=validate_run_config,
        )
        run_dir = cfg("run_dir")
        preprocess = CocoPreprocessOperator(
            task_id="preprocess",
            coco_root=cfg("coco_root"),
            run_dir=run_dir,
            policy=cfg("policy"),
            dtype=cfg("dtype"),
            height=cfg("height"),
            width=cfg("width"),
            shard_size=cfg("shard_size"),
            max_images=cfg("max_images"),
        )
        shards = XComArg(preprocess)
        uint8 = "{{ ti.xcom_pull(task_ids='prepare')['dtype'] == 'uint8' }}"
        export_kwargs = {
            "checkpoint": cfg("checkpoint"),
            "height": cfg("height"),
            "width": cfg("width"),
            "normalize_in_graph": uint8,
        }
        evaluations: dict[str, str] = {}
        convert_task: str | None = None
        if spec.backend == "onnxruntime":
            export = OnnxExportOperator(
                task_id="export",
                variant="portable",
                dynamic_batch=True,
                output_path=run_dir + "/model/gfocal_portable.onnx",
                **export_kwargs,
            )
            infer = OnnxRuntimeInferOperator.partial(
                task_id="infer",
                run_dir=run_dir,
                batch_size=cfg("batch_size"),
                model="{{ ti.xcom_pull(task_ids='export')['onnx_path'] }}",
            ).expand(shard=shards)
            evaluate = CocoEvalOperator(
                task_id="evaluate", run_dir=run_dir, backend="onnxruntime", engine=cfg("engine")
            )
            prepare >> [export, preprocess]
            [export, preprocess] >> infer >> evaluate
            evaluations["device"] = "evaluate"
            device_eval = evaluate
            roles = {
                "device": {
                    "eval_task": "evaluate",
                    "backend": "onnxruntime",
                    "device": spec.device,
                    "precision": "fp32",
                }
            }
        elif spec.backend == "msame":
            from operators import AtcConvertOperator, MsameInferOperator

            batched = "{{ ti.xcom_pull(task_ids='prepare')['batch_size'] > 1 }}"
            export = OnnxExportOperator(
                task_id="export",
                variant="ascend",
                output_path=run_dir + "/model/gfocal_ascend.onnx",
                checkpoint=cfg("checkpoint"),
                height=cfg("height"),
                width=cfg("width"),
                dynamic_batch=batched,  # batch > 1 (ais_bench): a dynamic-batch OM
            )
            export_portable = OnnxExportOperator(
                task_id="export_portable",
                variant="portable",
                dynamic_batch=True,
                output_path=run_dir + "/model/gfocal_portable.onnx",
                **export_kwargs,
            )
            ascend = {"queue": spec.queue, "pool": spec.pool} if spec.queue else {}
            convert = AtcConvertOperator(
                task_id="convert",
                onnx_path="{{ ti.xcom_pull(task_ids='export')['onnx_path'] }}",
                cache_dir=cfg("work_dir") + "/cache/om",
                output_dir=run_dir + "/model",
                om_name="gfocal",
                dynamic_batch_sizes="{{ '1,' ~ ti.xcom_pull(task_ids='prepare')['batch_size'] "
                "if ti.xcom_pull(task_ids='prepare')['batch_size'] > 1 else '' }}",
                soc_version=cfg("soc_version"),
                input_dtype=cfg("dtype"),
                precision_mode=cfg("precision_mode"),
                set_env=cfg("cann_set_env"),
                **ascend,
            )
            convert_task = "convert"
            infer = MsameInferOperator.partial(
                task_id="infer",
                run_dir=run_dir,
                tool=cfg("tool"),
                device=cfg("device"),
                outfmt=cfg("outfmt"),
                set_env=cfg("cann_set_env"),
                chips=cfg("chips"),
                batch_size=cfg("batch_size"),
                om_path="{{ ti.xcom_pull(task_ids='convert')['om_path'] }}",
                **ascend,
            ).expand(shard=shards)
            evaluate = CocoEvalOperator(
                task_id="evaluate", run_dir=run_dir, backend=cfg("tool"), engine=cfg("engine")
            )
            prepare >> [export, export_portable, preprocess]
            export >> convert
            [convert, preprocess] >> infer >> evaluate
            evaluations["device"] = "evaluate"
            device_eval = evaluate
            roles = {
                "device": {
                    "eval_task": "evaluate",
                    "backend": cfg("tool"),
                    "device": spec.device,
                    "precision": cfg("precision_mode"),
                }
            }
        else:
            raise ValueError(f"unknown backend {spec.backend!r}")
        ends = [device_eval]
        if spec.reference:
            reference = TorchInferOperator.partial(
                task_id="infer_reference",
                run_dir=run_dir,
                model=cfg("checkpoint"),
                batch_size=1,
            ).expand(shard=shards)
            evaluate_ref = CocoEvalOperator(
                task_id="evaluate_reference", run_dir=run_dir, backend="torch", engine=cfg("engine")
            )
            preprocess >> reference >> evaluate_ref
            evaluations["reference"] = "evaluate_reference"
            roles["reference"] = {
                "eval_task": "evaluate_reference",
                "backend": "torch",
                "device": "auto",
                "precision": "fp32",
            }
            ends.append(evaluate_ref)
        summary = RunSummaryOperator(
            task_id="summary",
            run_dir=run_dir,
            evaluations=evaluations,
            facts={"weights_random": cfg("weights_random"), "dag_id": spec.dag_id},
        )
        record = RecordResultsOperator(
            task_id="record",
            config=RUN,
            roles=roles,
            export_task="export",
            convert_task=convert_task,
        )
        gate = RegressionGateOperator(
            task_id="gate",
            record_task="record",
            thresholds="{{ ti.xcom_pull(task_ids='prepare')['thresholds'] }}",
        )
        ends >> summary >> record >> gate
        if spec.backend == "msame":
            export_portable >> summary  # the portable graph's parity report is part of the run
    return dag
