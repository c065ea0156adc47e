"""The variant matrix of a models file entry's night (`gfocal_pipeline.zoo`), for `gfocal_factory`.

One export of each graph and one preprocessing serve every variant that changes only conversion,
inference or gate options; a variant that changes the inputs (height, dtype, policy, ...) exports
and preprocesses in its own folder (`fp16.export`, `fp16.preprocess`). Each variant is a task group
named after it (`fp16.convert`, `fp16.infer`, `fp16.evaluate`) that converts with its own atc
options (the OM cache keys entries by them, so an unchanged variant does not convert again), runs
its own tool and batch on the NPU queue and pool, and is evaluated in its own folder
(`<run>/variants/<name>/`). The summary holds the matrix, `record` one history row per variant
(model `<entry>/<variant>`), and one gate judges every variant and raises one alert naming all
that fail, or an expected failure that passes.

Device tasks carry the entry's `priority_weight` with the absolute weight rule. Airflow 3.3's scheduler
queues a pool's waiting task instances by (-priority_weight, the run's logical date, map index): a
higher weight is strict priority whenever its tasks wait; entries of equal weight scheduled at the
same time interleave shard by shard, so one model's long night does not hold the NPU until it ends
(docs/models-file.md, "One NPU, many models").
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

from airflow.sdk import BaseOperator, TaskGroup, XComArg
from gfocal_factory import (
    NO_RETRIES,
    Branch,
    Budgets,
    PipelineSpec,
    _export,
    preprocess_task,
    summary_and_record,
)

from gfocal_pipeline.zoo import owns_inputs
from operators import (
    AtcConvertOperator,
    CocoEvalOperator,
    ModelGateOperator,
    MsameInferOperator,
)
from operators import wiring as ids
from operators.wiring import from_variant, prepared, pulled, variant_prepared, variant_task


def _device_tasks(spec: PipelineSpec) -> dict[str, Any]:
    """Where a device task runs and how the NPU pool orders it (see the module docstring)."""
    placement = {"queue": spec.queue, "pool": spec.pool} if spec.queue else {}
    return {**placement, "priority_weight": spec.priority_weight, "weight_rule": "absolute"}


def _shares_inputs(spec: PipelineSpec) -> bool:
    """Whether a variant uses the run's ascend graph and inputs (else none is exported for it)."""
    return any(not owns_inputs(changes) for changes in spec.variants.values())


def _own_inputs(name: str, budgets: Budgets, plan: dict[str, Any]) -> tuple[Any, ...]:
    """(export, preprocessing, shards) of a variant that changes the inputs, in its own folder."""
    read = functools.partial(from_variant, name)
    export = _export(ids.EXPORT, "ascend", budgets, read=read)
    preprocess = preprocess_task(ids.PREPROCESS, plan, budgets, read=read)
    return export, preprocess, XComArg(preprocess)


def _variant(spec: PipelineSpec, name: str, shared: tuple[Any, ...], budgets: Budgets) -> Branch:
    """[export -> preprocess ->] convert -> infer per shard -> evaluate of variant `name`, in its task
    group; `shared` is (the ascend export, the preprocessing, its shards) of the run, which a
    variant that owns its inputs replaces by its own."""
    device = _device_tasks(spec)
    own = owns_inputs(spec.variants[name])
    with TaskGroup(group_id=name, tooltip=f"variant {name}: atc, inference and evaluation"):
        export, preprocess, shards = _own_inputs(name, budgets, shared[1].shard_plan) if own else shared
        convert = AtcConvertOperator(
            task_id=ids.CONVERT,
            onnx_path=pulled(export.task_id, "onnx_path"),
            input_name=pulled(export.task_id, "input_name"),
            cache_dir=prepared("om_cache_dir"),
            **from_variant(name, "run_dir", "batch_size", "soc_version", "precision_mode"),
            **from_variant(name, input_dtype="dtype", set_env="cann_set_env"),
            **device,
            **budgets("convert"),
        )
        infer = MsameInferOperator.partial(
            task_id=ids.INFER,
            model=pulled(variant_task(name, ids.CONVERT), "om_path"),
            options=from_variant(name, "device", "outfmt", "chips", set_env="cann_set_env"),
            **from_variant(name, "run_dir", "batch_size", backend="tool"),
            **device,
            **budgets("infer"),
        ).expand(shard=shards)
        evaluate = CocoEvalOperator(
            task_id=ids.EVALUATE,
            **from_variant(name, "run_dir", "engine", backend="tool"),
            **budgets("evaluate"),
        )
    export >> convert
    [convert, preprocess] >> infer >> evaluate
    role = {
        "eval_task": variant_task(name, ids.EVALUATE),
        "convert_task": variant_task(name, ids.CONVERT),
        "backend": variant_prepared(name, "tool"),
        "device": spec.device,
        "precision": variant_prepared(name, "precision_mode"),
        "variant": name,
        **({"export_task": export.task_id} if own else {}),
    }
    return Branch(evaluate, role, convert_task=variant_task(name, ids.CONVERT))


def variant_branches(
    spec: PipelineSpec, shards: XComArg, preprocess: BaseOperator, budgets: Budgets
) -> dict[str, Branch]:
    """The portable export and, when a variant shares the run's inputs, the ascend export (once each),
    and one branch per variant, by variant name."""
    portable = _export(ids.EXPORT_PORTABLE, "portable", budgets)
    export = (
        _export(ids.EXPORT, "ascend", budgets, batch="export_batch_size") if _shares_inputs(spec) else None
    )
    shared = (export, preprocess, shards)
    branches = {name: _variant(spec, name, shared, budgets) for name in spec.variants}
    first = next(iter(branches))  # the portable graph (parity, the reference's) is in the summary's wait
    branches[first] = dataclasses.replace(branches[first], also_before_summary=(portable,))
    return branches


INPUT_FACTS = ("height", "width", "dtype")  # the matrix's `inputs` column


def _variant_facts(spec: PipelineSpec) -> dict[str, dict[str, Any]]:
    """What the summary's matrix shows of each variant beside its results."""
    return {
        name: {
            **{
                key: variant_prepared(name, key)
                for key in ("tool", "precision_mode", "batch_size", *INPUT_FACTS)
            },
            "expected_failure": spec.expected_failures.get(name),
        }
        for name in spec.variants
    }


def finish_variants(
    spec: PipelineSpec, branches: dict[str, Branch], budgets: Budgets
) -> tuple[BaseOperator, BaseOperator]:
    """summary (the matrix) -> record (a row per variant and the reference) -> gate (every variant);
    returns (summary, record)."""
    facts = {
        "model": spec.history_name,
        "variants": _variant_facts(spec),
        "published_ap": prepared("published_ap"),
    }
    # the checkpoint's facts for the reference: the run's ascend graph's, else the portable one's
    export = ids.EXPORT if _shares_inputs(spec) else ids.EXPORT_PORTABLE
    summary, record = summary_and_record(
        spec, branches, budgets, facts, model=spec.history_name, export_task=export
    )
    gate = ModelGateOperator(
        task_id=ids.GATE,
        record_task=ids.RECORD,
        model=spec.history_name or spec.dag_id,
        variants={
            name: {
                "evaluate_task": variant_task(name, ids.EVALUATE),
                "thresholds": variant_prepared(name, "thresholds"),
                "run_dir": variant_prepared(name, "run_dir"),
                "expected_failure": spec.expected_failures.get(name),
            }
            for name in spec.variants
        },
        **NO_RETRIES,
        **budgets("gate"),
    )
    summary >> record >> gate
    return summary, record
