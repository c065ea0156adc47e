"""Operators of the embedded pipeline steps: prepare, preprocess, evaluate, summary.

Templated fields render as native objects (the DAGs set `render_template_as_native_obj`), so the
values read from the prepare task arrive typed (int, None, ...) and are passed on as they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseOperator

from gfocal_pipeline.constants import DEFAULT_ANNOTATION_FILE, DEFAULT_IMAGE_DIR
from gfocal_pipeline.run_config import PREPROCESS_OPTIONS
from gfocal_pipeline.sharding import ShardPlan
from operators.base import attributes, fail_without_retry, manifest_images, project_errors
from operators.settings import load_settings
from operators.timeout_mixin import SizedTimeoutMixin
from operators.wiring import MANIFEST_KEY


class PrepareRunOperator(BaseOperator):
    """First task of a run: validates the run's options once (`RunConfig`) and makes its run directory.

    A key of the run's conf that is not one of the DAG's params fails the task at once (no retry),
    naming the key and the nearest known name.

    Pushes the validated options plus `run_dir` (`<work_dir>/<dag_id>/<run_id>`) and `om_cache_dir`,
    so every later task reads the same typed values. `ascend` adds the Ascend DAG's options.
    """

    template_fields: Sequence[str] = ("config",)

    def __init__(
        self,
        *,
        config: dict[str, Any],
        ascend: bool = False,
        variants: dict[str, dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> None:
        """`variants`: a models file entry's ({name: the options it changes}); see `steps.prepare_step`."""
        super().__init__(**kwargs)
        self.config, self.ascend, self.variants = config, ascend, dict(variants or {})

    @project_errors
    def execute(self, context: Any) -> dict[str, Any]:
        from gfocal_pipeline import steps

        # the rendered params hold only the DAG's own; a key of the run's conf that is none of them
        # (a typo, an option of the other DAG) is refused here, before any work, not silently ignored
        conf = getattr(context.get("dag_run"), "conf", None) or {}
        values = {**{key: value for key, value in conf.items() if key not in self.config}, **self.config}
        with fail_without_retry():  # invalid options stay invalid: no retry
            prepared = steps.prepare_step(
                values, context["dag"].dag_id, context["run_id"], ascend=self.ascend, variants=self.variants
            )
        self.log.info("run directory: %s", prepared["run_dir"])
        return prepared


class CocoPreprocessOperator(SizedTimeoutMixin, BaseOperator):
    """COCO-format set -> manifest + sharded `.bin` inputs.

    Returns the list of shard names (what inference tasks are mapped over); the manifest facts
    (path, sha256, images, dtype, dataset_id, `cached` + `cache_key` of the inputs cache entry of
    `work_dir`, ...) are pushed under the XCom key `manifest`. With `cache_inputs` off the inputs
    are built by each inference task for its shard and deleted after it. `workers` (threads)
    defaults to the worker's `[gfocal] preprocess_workers`, else its usable CPU cores; `max_pixels`
    (the pixel budget of one image, 0: none) to the worker's `[gfocal] max_pixels`, else 100
    megapixels. The timeout is sized for the run's `max_images` when it is set.
    """

    template_fields: Sequence[str] = ("run_dir", "work_dir", "cache_inputs", *PREPROCESS_OPTIONS)
    timeout_kind = "preprocess"

    def __init__(
        self,
        *,
        coco_root: str,
        run_dir: str,
        images_dir: str = DEFAULT_IMAGE_DIR,
        annotations: str = DEFAULT_ANNOTATION_FILE,
        policy: str = "letterbox",
        dtype: str = "float32",
        height: int = 800,
        width: int = 1216,
        shard_size: int | None = None,
        shard_plan: dict[str, float] | None = None,
        max_images: int | None = None,
        skip_bad_images: bool = False,
        workers: int | None = None,
        max_pixels: int | None = None,
        work_dir: str | None = None,
        cache_inputs: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.coco_root, self.run_dir, self.policy, self.dtype = coco_root, run_dir, policy, dtype
        self.images_dir, self.annotations = images_dir, annotations
        self.height, self.width, self.shard_size = height, width, shard_size
        self.shard_plan = dict(shard_plan or {})
        self.max_images, self.skip_bad_images, self.workers = max_images, skip_bad_images, workers
        self.max_pixels = max_pixels
        self.work_dir, self.cache_inputs = work_dir, cache_inputs

    def timeout_images(self) -> int | None:
        return self.max_images if isinstance(self.max_images, int) and self.max_images > 0 else None

    def _worker_defaults(self) -> dict[str, Any]:
        """`workers` and `max_pixels` (0: no budget), from this worker's own `[gfocal]` settings
        (`preprocess_workers`, `max_pixels`) where the task does not set them."""
        workers, max_pixels = self.workers, self.max_pixels
        if workers is None or max_pixels is None:
            settings = load_settings()
            workers = settings.preprocess_workers if workers is None else workers
            max_pixels = settings.max_pixels if max_pixels is None else max_pixels
        return {"workers": workers, "max_pixels": max_pixels or None}

    @project_errors
    def execute(self, context: Any) -> list[str]:
        from gfocal_pipeline import steps

        names = tuple(name for name in PREPROCESS_OPTIONS if name != "coco_root")
        options = attributes(self, (*names, "skip_bad_images", "workers", "work_dir", "cache_inputs"))
        options.update(self._worker_defaults())
        plan = ShardPlan(**self.shard_plan)
        result = steps.preprocess_step(self.coco_root, self.run_dir, shard_plan=plan, **options)
        self.log.info(
            "%s %d images in %d shards of %d%s (%s, %s), inputs: %s",
            "reused the preprocessed" if result["cached"] else "preprocessed",
            result["images"],
            len(result["shards"]),
            result["shard_size"],
            "" if self.shard_size else f" (shard_size empty: {plan} rule)",
            result["policy"],
            result["dtype"],
            result["inputs"],
        )
        context["ti"].xcom_push(key=MANIFEST_KEY, value=result)
        return result["shards"]


class CocoEvalOperator(SizedTimeoutMixin, BaseOperator):
    """Postprocess one backend's outputs of a run and score them with COCO.

    For: the evaluate tasks (device and reference). Pushes the 12 stats by name, the detections and
    per-class files and the backend's combined timing. The timeout is sized for the manifest's images.
    """

    template_fields: Sequence[str] = ("run_dir", "backend", "engine")
    timeout_kind = "evaluate"

    def __init__(
        self,
        *,
        run_dir: str,
        backend: str,
        engine: str = "faster-coco-eval",
        allow_missing: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.run_dir, self.backend, self.engine, self.allow_missing = run_dir, backend, engine, allow_missing

    def timeout_images(self) -> int | None:
        return manifest_images(self.run_dir)

    @project_errors
    def execute(self, context: Any) -> dict[str, Any]:
        from gfocal_pipeline import steps

        result = steps.evaluate_step(
            self.run_dir, self.backend, engine=self.engine, allow_missing=self.allow_missing
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

    @project_errors
    def execute(self, context: Any) -> dict[str, Any]:
        from gfocal_pipeline import steps

        ti = context["ti"]
        results = {role: ti.xcom_pull(task_ids=task_id) for role, task_id in self.evaluations.items()}
        summary = steps.summary_step(self.run_dir, results, **self.facts)
        self.log.info("summary\n%s", steps.format_summary(summary))
        return summary
