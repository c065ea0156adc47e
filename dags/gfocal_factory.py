"""One factory for every gfocal DAG: the ONNX Runtime (embedded) and the Ascend nightly variants.

A `PipelineSpec` names a backend family (`FAMILIES`), where the device tasks run (queue, pool),
whether a PyTorch reference runs beside it, and the schedule. Each family's builder adds its model
tasks and returns a `Branch` (its evaluate task and history role); the shared part (prepare,
preprocess, reference, summary, record, gate, retention) is the same for all. Everything a run needs
comes from `params`, validated once by the prepare task, so a run triggered from the form and a
scheduled one take the same path; later tasks read prepare's values with `prepared(...)`.

Crash safety: every task but `record` and `gate` is idempotent and resumes from what is complete
(cache entries, finished shards), so it retries with exponential backoff (`[gfocal] task_retries`,
`retry_delay_seconds`, `max_retry_delay_minutes`); `record` and `gate` run once (retries=0: no
duplicate history row, verdict or alert). Every task has an `execution_timeout` sized for the images
it handles (`operators.timeouts`; `[gfocal] task_timeout_scale`, `task_timeout_minutes`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pendulum
from airflow.sdk import DAG, BaseOperator, Param, XComArg

from gfocal_pipeline.constants import DEFAULT_HEIGHT, DEFAULT_WIDTH
from gfocal_pipeline.errors import ConfigError
from gfocal_pipeline.options import check_option, plain
from gfocal_pipeline.run_config import DEFAULT_SECTION, PREPROCESS_OPTIONS, SECTION_OF, form_options
from gfocal_pipeline.sharding import CPU_SECONDS_PER_IMAGE, ShardPlan
from operators import (
    AtcConvertOperator,
    CocoEvalOperator,
    CocoPreprocessOperator,
    DoctorOperator,
    InferOperator,
    MsameInferOperator,
    OnnxExportOperator,
    PrepareRunOperator,
    RecordResultsOperator,
    RegressionGateOperator,
    RetentionOperator,
    RunSummaryOperator,
)
from operators import wiring as ids
from operators.alerting import GfocalAlertNotifier
from operators.base import require_shared_paths
from operators.settings import GfocalSettings, load_settings
from operators.timeouts import FULL_SET_IMAGES
from operators.wiring import from_prepare, prepared, pulled

NO_RETRIES = {"retries": 0}  # record, gate: a retry would add a history row, a verdict, an alert


@dataclass(frozen=True)
class PipelineSpec:
    dag_id: str
    description: str
    family: str  # a key of FAMILIES: onnxruntime | ascend
    schedule: str | None = None
    reference: bool = False  # also run the PyTorch model on the same inputs
    queue: str | None = None  # Celery queue of the device tasks (convert, infer)
    pool: str | None = None
    tags: tuple[str, ...] = ()
    device: str = "cpu"  # the history's `device` column for the device backend
    deadline: timedelta | None = None  # alert when a run has not finished this long after queueing
    # the device's time per image at 800x1216, for the default shard size (`gfocal_pipeline.sharding`)
    seconds_per_image: float = CPU_SECONDS_PER_IMAGE
    doctor: bool = False  # `gfocal doctor` as the first task, on `queue` (docs/doctor.md)
    # a models file entry's (gfocal_pipeline.zoo): its form defaults, variants and history name
    form_defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    variants: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    expected_failures: Mapping[str, str] = dataclasses.field(default_factory=dict)
    history_name: str | None = None  # the history's model: `<history_name>/<variant>`
    priority_weight: int = 1  # of the device tasks (absolute): the NPU pool serves higher first

    def shard_plan(self, settings: GfocalSettings) -> ShardPlan:
        return ShardPlan(slots=settings.device_slots, seconds_per_image=self.seconds_per_image)


@dataclass(frozen=True)
class Budgets:
    """The `execution_timeout` of each kind of task of a DAG, sized for the form's default images."""

    settings: GfocalSettings
    images: int | None  # the default max_images (None: the whole set)
    shard_images: int  # images of one inference shard

    @classmethod
    def of(cls, settings: GfocalSettings, params: Mapping[str, Param], plan: ShardPlan) -> Budgets:
        images = params["max_images"].value
        shard = params["shard_size"].value or plan.shard_size(
            images or FULL_SET_IMAGES,
            params["height"].value or DEFAULT_HEIGHT,  # empty: the model's, GFocalV2's size at parse time
            params["width"].value or DEFAULT_WIDTH,
        )
        return cls(settings, images, min(shard, images) if images else shard)

    def __call__(self, kind: str) -> dict[str, Any]:
        """`execution_timeout=` of a task of `kind` (an infer kind handles one shard)."""
        images = self.shard_images if kind.startswith("infer") else self.images
        return {"execution_timeout": self.settings.task_timeout(kind, images)}


@dataclass(frozen=True)
class Branch:
    """What a family builder adds: its evaluate task, history role and the tasks the summary waits for."""

    evaluate: BaseOperator
    role: dict[str, Any]
    convert_task: str | None = None
    also_before_summary: tuple[BaseOperator, ...] = ()


def _section(name: str) -> dict[str, str]:
    """The `section` of a form field; none for Airflow's default section (the one shown open)."""
    section = SECTION_OF.get(name, "Advanced")
    return {} if section == DEFAULT_SECTION else {"section": section}


def form_params(
    ascend: bool, overrides: Mapping[str, Any] | None = None, entry: Mapping[str, Any] | None = None
) -> dict[str, Param]:
    """The trigger form, generated from `RunConfig` (validated by Airflow before a run is created).

    `overrides` replace defaults (the deployment's `[gfocal]` data settings), then `entry` (a models
    file entry's options, already validated); each is checked like a form value, so a bad setting
    fails the DAG's parse with a message naming it.
    """
    options = form_options(ascend)
    defaults = {name: default for name, (default, _) in options.items()}
    for name, value in (overrides or {}).items():
        try:
            defaults[name] = check_option(name, value, options[name][1])
        except ConfigError as exc:
            raise ConfigError(
                f"[gfocal] {name} (airflow.cfg or AIRFLOW__GFOCAL__{name.upper()}): {exc}"
            ) from None
    for name, value in (entry or {}).items():
        defaults[name] = plain(check_option(name, value, options[name][1]))
    return {
        name: Param(
            defaults[name],
            title=spec.title,
            description=spec.description,
            **_section(name),
            **spec.schema(),
        )
        for name, (_, spec) in options.items()
    }


EXPORT_OPTIONS = ("run_dir", "model", "checkpoint", "height", "width", "dtype")
EXPORT_OPTIONS += ("parity_threshold", "max_unexplained", "work_dir", "cache_onnx")


def _export(
    task_id: str, variant: str, budgets: Budgets, batch: str = "batch_size", read: Callable = from_prepare
) -> OnnxExportOperator:
    """The export of graph `variant`, for the batch of option `batch` (a zoo night's: the largest);
    `read` gives the options (a zoo variant's own: `from_variant` of it)."""
    return OnnxExportOperator(
        task_id=task_id,
        variant=variant,
        **read(*EXPORT_OPTIONS, batch_size=batch),
        **budgets("export"),
    )


def preprocess_task(
    task_id: str, shard_plan: dict[str, Any], budgets: Budgets, read: Callable = from_prepare
) -> CocoPreprocessOperator:
    """The COCO preprocessing into the run's inputs (`read`: whose options, see `_export`)."""
    return CocoPreprocessOperator(
        task_id=task_id,
        shard_plan=shard_plan,
        **read("run_dir", "work_dir", "cache_inputs", *PREPROCESS_OPTIONS),
        **budgets("preprocess"),
    )


def _evaluate(task_id: str, backend: str, budgets: Budgets) -> CocoEvalOperator:
    return CocoEvalOperator(
        task_id=task_id,
        run_dir=prepared("run_dir"),
        backend=backend,
        engine=prepared("engine"),
        **budgets("evaluate"),
    )


def _role(backend: str, device: str, precision: str, eval_task: str = ids.EVALUATE) -> dict[str, str]:
    return {"eval_task": eval_task, "backend": backend, "device": device, "precision": precision}


def onnxruntime_family(
    spec: PipelineSpec, shards: XComArg, preprocess: BaseOperator, budgets: Budgets
) -> Branch:
    """Portable ONNX -> ONNX Runtime per shard -> evaluate."""
    export = _export(ids.EXPORT, "portable", budgets)
    infer = InferOperator.partial(
        task_id=ids.INFER,
        backend="onnxruntime",
        model=pulled(ids.EXPORT, "onnx_path"),
        options=from_prepare("keep_candidates"),
        **from_prepare("run_dir", "batch_size"),
        **budgets("infer"),
    ).expand(shard=shards)
    evaluate = _evaluate(ids.EVALUATE, "onnxruntime", budgets)
    [export, preprocess] >> infer >> evaluate
    return Branch(evaluate, _role("onnxruntime", spec.device, "fp32"))


def ascend_family(spec: PipelineSpec, shards: XComArg, preprocess: BaseOperator, budgets: Budgets) -> Branch:
    """Ascend ONNX -> atc -> msame / ais_bench per shard on the NPU queue -> evaluate; plus the portable
    graph, whose parity report is part of the run."""
    device_tasks = {"queue": spec.queue, "pool": spec.pool} if spec.queue else {}
    export = _export(ids.EXPORT, "ascend", budgets)
    portable = _export(ids.EXPORT_PORTABLE, "portable", budgets)
    convert = AtcConvertOperator(
        task_id=ids.CONVERT,
        onnx_path=pulled(ids.EXPORT, "onnx_path"),
        **from_prepare("run_dir", "batch_size", "soc_version", "precision_mode"),
        **from_prepare(cache_dir="om_cache_dir", input_dtype="dtype", set_env="cann_set_env"),
        input_name=pulled(ids.EXPORT, "input_name"),
        **device_tasks,
        **budgets("convert"),
    )
    infer = MsameInferOperator.partial(
        task_id=ids.INFER,
        model=pulled(ids.CONVERT, "om_path"),
        options=from_prepare("device", "outfmt", "chips", set_env="cann_set_env"),
        **from_prepare("run_dir", "batch_size", backend="tool"),
        **device_tasks,
        **budgets("infer"),
    ).expand(shard=shards)
    evaluate = _evaluate(ids.EVALUATE, prepared("tool"), budgets)
    export >> convert
    [convert, preprocess] >> infer >> evaluate
    role = _role(prepared("tool"), spec.device, prepared("precision_mode"))
    return Branch(evaluate, role, convert_task=ids.CONVERT, also_before_summary=(portable,))


@dataclass(frozen=True)
class Family:
    build: Callable[[PipelineSpec, XComArg, BaseOperator, Budgets], Branch]
    ascend_options: bool  # the form has the Ascend options


FAMILIES: dict[str, Family] = {
    "onnxruntime": Family(onnxruntime_family, ascend_options=False),
    "ascend": Family(ascend_family, ascend_options=True),
}


def reference_branch(
    shards: XComArg, preprocess: BaseOperator, budgets: Budgets, portable: BaseOperator
) -> Branch:
    """The model's reference on the same inputs: its PyTorch checkpoint (CUDA when present, else CPU),
    or, for a bring-your-own graph, ONNX Runtime on the CPU running the same (portable) graph."""
    backend = prepared("reference_backend")
    infer = InferOperator.partial(
        task_id=ids.INFER_REFERENCE,
        backend=backend,
        run_dir=prepared("run_dir"),
        model=ids.reference_model(portable.task_id),
        batch_size=1,
        options=from_prepare("work_dir", "cache_reference"),
        **budgets("infer_reference"),
    ).expand(shard=shards)
    evaluate = _evaluate(ids.EVALUATE_REFERENCE, backend, budgets)
    [preprocess, portable] >> infer >> evaluate
    return Branch(evaluate, _role(backend, "auto", "fp32", ids.EVALUATE_REFERENCE))


def _finish(spec: PipelineSpec, branches: dict[str, Branch], budgets: Budgets) -> None:
    """summary -> record -> gate after every branch's evaluation, and retention."""
    if spec.variants:
        from gfocal_variants import finish_variants

        summary, record = finish_variants(spec, branches, budgets)
    else:
        summary, record = _summary_record_gate(spec, branches, budgets)
    retention = RetentionOperator(
        task_id=ids.RETENTION,
        trigger_rule="all_done",  # also after a failed task: the disk must stay bounded
        require_work_dir=False,  # a run that failed in prepare may not have created it
        work_dir="{{ params.work_dir }}",
        run_dir="{{ (ti.xcom_pull(task_ids='" + ids.PREPARE + "') or {}).get('run_dir') }}",
        **budgets("retention"),
    )
    for branch in branches.values():
        [branch.evaluate, *branch.also_before_summary] >> summary
    # the gate stays a leaf, so a failed gate (or task) fails the run even though retention succeeds
    record >> retention


def summary_and_record(
    spec: PipelineSpec, branches: dict[str, Branch], budgets: Budgets, facts: dict[str, Any], **record: Any
) -> tuple[BaseOperator, BaseOperator]:
    """The summary of every branch's evaluation (with `facts`) and the record of every branch's role
    (`record`: RecordResultsOperator's own arguments), not yet wired to the branches."""
    summary = RunSummaryOperator(
        task_id=ids.SUMMARY,
        run_dir=prepared("run_dir"),
        evaluations={role: branch.role["eval_task"] for role, branch in branches.items()},
        facts={"weights_random": prepared("weights_random"), "dag_id": spec.dag_id, **facts},
        **budgets("summary"),
    )
    record.setdefault("export_task", ids.EXPORT)
    recorder = RecordResultsOperator(
        task_id=ids.RECORD,
        config=prepared(),
        roles={role: branch.role for role, branch in branches.items()},
        summary_task=ids.SUMMARY,
        **record,
        **NO_RETRIES,
        **budgets("record"),
    )
    return summary, recorder


def _summary_record_gate(
    spec: PipelineSpec, branches: dict[str, Branch], budgets: Budgets
) -> tuple[BaseOperator, BaseOperator]:
    """summary -> record -> gate of a run with one device branch; returns (summary, record)."""
    summary, record = summary_and_record(
        spec, branches, budgets, {}, convert_task=branches["device"].convert_task
    )
    gate = RegressionGateOperator(
        task_id=ids.GATE,
        record_task=ids.RECORD,
        evaluate_task=branches["device"].role["eval_task"],
        thresholds=prepared("thresholds"),
        run_dir=prepared("run_dir"),  # the regression report is written there
        **NO_RETRIES,
        **budgets("gate"),
    )
    summary >> record >> gate
    return summary, record


def _deadline(spec: PipelineSpec) -> Any:
    if spec.deadline is None:
        return None
    from airflow.sdk import DeadlineAlert, DeadlineReference, SyncCallback

    return DeadlineAlert(
        reference=DeadlineReference.DAGRUN_QUEUED_AT,
        interval=spec.deadline,
        callback=SyncCallback(
            "operators.alerting.deadline_missed",
            kwargs={"dag_id": spec.dag_id, "interval": str(spec.deadline)},
        ),
    )


def _doctor(spec: PipelineSpec, budgets: Budgets) -> BaseOperator:
    """`gfocal doctor` on the device worker before anything else (`[gfocal] nightly_doctor`): a host
    without CANN, NPU, shared work directory, databases or broker fails the night in seconds."""
    return DoctorOperator(
        task_id=ids.DOCTOR,
        queue=spec.queue,
        retries=0,  # a broken host stays broken for the night; the failure alert says what to fix
        set_env="{{ params.cann_set_env }}",
        tool="{{ params.tool }}",
        work_dir="{{ params.work_dir }}",
        images="{{ params.max_images }}",
        height="{{ params.height }}",
        width="{{ params.width }}",
        dtype="{{ params.dtype }}",
        **budgets("doctor"),
    )


def _device_branches(
    spec: PipelineSpec, family: Family, shards: XComArg, preprocess: BaseOperator, budgets: Budgets
) -> dict[str, Branch]:
    """The family's one device branch, or a models file entry's variants (by name)."""
    if spec.variants:
        from gfocal_variants import variant_branches

        if spec.family != "ascend":
            raise ConfigError(f"{spec.dag_id}: variants run on the ascend family, not {spec.family!r}")
        return variant_branches(spec, shards, preprocess, budgets)
    return {"device": family.build(spec, shards, preprocess, budgets)}


def build_dag(spec: PipelineSpec) -> DAG:
    """Build the DAG described by `spec` (see module docstring)."""
    family = FAMILIES[spec.family]
    settings = load_settings()
    params = form_params(family.ascend_options, dict(settings.run_defaults), spec.form_defaults)
    budgets = Budgets.of(settings, params, spec.shard_plan(settings))
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
            **settings.retry_args(),  # record and gate override it with NO_RETRIES
            "on_failure_callback": GfocalAlertNotifier(),
            "pre_execute": require_shared_paths,  # the shared work_dir is mounted on this worker
        },
        deadline=_deadline(spec),
        render_template_as_native_obj=True,
        user_defined_macros=ids.MACROS,  # `prepared(key)`: one XCom read of prepare per task
        doc_md=__doc__,
    ) as dag:
        prepare = PrepareRunOperator(
            task_id=ids.PREPARE,
            config={name: "{{ params." + name + " }}" for name in params},
            ascend=family.ascend_options,
            variants={name: dict(options) for name, options in spec.variants.items()},
            **budgets("prepare"),
        )
        preprocess = preprocess_task(ids.PREPROCESS, dataclasses.asdict(spec.shard_plan(settings)), budgets)
        shards = XComArg(preprocess)
        branches = _device_branches(spec, family, shards, preprocess, budgets)
        if spec.reference:
            # the portable graph a bring-your-own reference runs: the Ascend family's parity export
            portable = dag.task_dict.get(ids.EXPORT_PORTABLE) or dag.get_task(ids.EXPORT)
            branches["reference"] = reference_branch(shards, preprocess, budgets, portable)
        prepare >> [task for task in dag.tasks if task is not prepare and not task.upstream_list]
        if spec.doctor and spec.queue:
            _doctor(spec, budgets) >> prepare
        _finish(spec, branches, budgets)
    return dag
