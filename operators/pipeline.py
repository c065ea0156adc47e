"""Operators for the embedded pipeline steps: prepare, preprocess, infer, evaluate, summary."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseOperator

from gfocal_pipeline import steps
from operators.params import as_bool, as_int


class PrepareRunOperator(BaseOperator):
    """First task of a run: validates the run's parameters once and fixes its working directory.

    Pushes the validated parameters plus `run_dir` (`<work_dir>/<dag_id>/<run_id>`), so every later
    task reads the same values.
    """

    template_fields: Sequence[str] = ("config",)

    def __init__(self, *, config: dict[str, Any] | str, validator: Any = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.config = config
        self.validator = validator

    def execute(self, context: Any) -> dict[str, Any]:
        config = dict(self.config) if isinstance(self.config, dict) else {}
        if self.validator is not None:
            config = self.validator(config)
        run_dir = steps.run_directory(config["work_dir"], context["dag"].dag_id, context["run_id"])
        run_dir.mkdir(parents=True, exist_ok=True)
        config["run_dir"] = str(run_dir)
        self.log.info("run directory: %s", run_dir)
        return config


class CocoPreprocessOperator(BaseOperator):
    """COCO root -> manifest + sharded `.bin` inputs.

    Returns the list of shard names (what inference tasks are mapped over); the manifest facts
    (path, sha256, images, dtype, ...) are pushed under the XCom key `manifest`.
    """

    template_fields: Sequence[str] = (
        "coco_root",
        "run_dir",
        "policy",
        "dtype",
        "height",
        "width",
        "shard_size",
        "max_images",
        "skip_bad_images",
    )

    def __init__(
        self,
        *,
        coco_root: str,
        run_dir: str,
        policy: str = "letterbox",
        dtype: str = "float32",
        height: int | str = 800,
        width: int | str = 1216,
        shard_size: int | str = 8,
        max_images: int | str | None = None,
        skip_bad_images: bool | str = False,
        workers: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.coco_root, self.run_dir, self.policy, self.dtype = coco_root, run_dir, policy, dtype
        self.height, self.width, self.shard_size = height, width, shard_size
        self.max_images, self.skip_bad_images, self.workers = max_images, skip_bad_images, workers

    def execute(self, context: Any) -> list[str]:
        max_images = (
            None if self.max_images in (None, "", "None", 0, "0") else as_int("max_images", self.max_images)
        )
        result = steps.preprocess_step(
            self.coco_root,
            self.run_dir,
            policy=str(self.policy),
            dtype=str(self.dtype),
            height=as_int("height", self.height),
            width=as_int("width", self.width),
            shard_size=as_int("shard_size", self.shard_size),
            max_images=max_images,
            skip_bad_images=as_bool("skip_bad_images", self.skip_bad_images),
            workers=self.workers,
        )
        self.log.info(
            "preprocessed %d images into %d shards (%s, %s)",
            result["images"],
            len(result["shards"]),
            result["policy"],
            result["dtype"],
        )
        context["ti"].xcom_push(key="manifest", value=result)
        return result["shards"]


class InferOperator(BaseOperator):
    """Run one shard through an in-process backend (`onnxruntime` or `torch`); mapped over shards."""

    template_fields: Sequence[str] = ("run_dir", "shard", "model", "batch_size", "providers", "backend")
    backend_name = ""

    def __init__(
        self,
        *,
        run_dir: str,
        shard: str,
        model: str,
        batch_size: int | str = 1,
        providers: str | None = None,
        threads: int | None = None,
        backend: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.run_dir, self.shard, self.model = run_dir, shard, model
        self.batch_size, self.providers, self.threads = batch_size, providers, threads
        self.backend = backend or self.backend_name

    def backend_options(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "providers": self.providers or None,
            "intra_op_num_threads": self.threads,
        }

    def execute(self, context: Any) -> dict[str, Any]:
        result = steps.infer_step(
            self.run_dir,
            str(self.shard),
            str(self.backend),
            batch_size=as_int("batch_size", self.batch_size),
            **self.backend_options(),
        )
        self.log.info(
            "shard %s: %d images, %.2f fps", result["shard"], result["images"], result["timing"]["fps"]
        )
        return result


class OnnxRuntimeInferOperator(InferOperator):
    """ONNX Runtime on the portable graph; providers e.g. `cpu`, `cuda`, `cann` (CPU by default)."""

    backend_name = "onnxruntime"


class TorchInferOperator(InferOperator):
    """The PyTorch reference: the checkpoint itself on CPU (CUDA with fp16 when present)."""

    backend_name = "torch"

    def backend_options(self) -> dict[str, Any]:
        return {"checkpoint": self.model, "num_threads": self.threads}


class CocoEvalOperator(BaseOperator):
    """Postprocess a backend's outputs and score them with COCO; pushes the 12 stats by name."""

    template_fields: Sequence[str] = ("run_dir", "backend", "engine", "allow_missing")

    def __init__(
        self,
        *,
        run_dir: str,
        backend: str,
        engine: str = "faster-coco-eval",
        allow_missing: bool | str = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.run_dir, self.backend, self.engine, self.allow_missing = run_dir, backend, engine, allow_missing

    def execute(self, context: Any) -> dict[str, Any]:
        result = steps.evaluate_step(
            self.run_dir,
            str(self.backend),
            engine=str(self.engine),
            allow_missing=as_bool("allow_missing", self.allow_missing),
        )
        self.log.info("%s: AP=%.4f over %d images", self.backend, result["stats"]["AP"], result["images"])
        return result


class RunSummaryOperator(BaseOperator):
    """Collect the evaluations of a run, write `summary.json` and print the table."""

    template_fields: Sequence[str] = ("run_dir", "facts")

    def __init__(
        self, *, run_dir: str, evaluations: dict[str, str], facts: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        """`evaluations` maps a role (`device`, `reference`) to the task id of its CocoEvalOperator."""
        super().__init__(**kwargs)
        self.run_dir, self.evaluations, self.facts = run_dir, evaluations, facts or {}

    def execute(self, context: Any) -> dict[str, Any]:
        ti = context["ti"]
        results = {role: ti.xcom_pull(task_ids=task_id) for role, task_id in self.evaluations.items()}
        summary = steps.summary_step(self.run_dir, results, **self.facts)
        self.log.info("summary\n%s", steps.format_summary(summary))
        return summary
