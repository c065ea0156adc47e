"""One function per pipeline step, returning the small dicts that travel by XCom.

The Airflow operators and the `gfocal` CLI both call these, so a step behaves the same everywhere.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gfocal_pipeline.constants import DEFAULT_ANNOTATION_FILE, DEFAULT_IMAGE_DIR, NUM_CLASSES
from gfocal_pipeline.errors import ConfigError, DatasetError, GfocalError
from gfocal_pipeline.fileio import read_state_json, reclaim_temps, step_lock, write_json
from gfocal_pipeline.layout import RunLayout, om_cache_dir
from gfocal_pipeline.manifest import Manifest, load_manifest
from gfocal_pipeline.pixels import pixels_of
from gfocal_pipeline.timing import summarize

log = logging.getLogger(__name__)

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(text: str) -> str:
    """A run id (e.g. `manual__2025-01-01T00:00:00+00:00`) as one safe path component."""
    name = _UNSAFE.sub("_", str(text)).strip("._")
    if not name:
        raise GfocalError(f"cannot make a directory name from {text!r}")
    return name


def run_directory(work_dir: str | Path, dag_id: str, run_id: str) -> Path:
    """`<work_dir>/<dag_id>/<run_id>` with both ids made path-safe."""
    return Path(work_dir) / safe_name(dag_id) / safe_name(run_id)


def prepare_step(
    values: dict[str, Any],
    dag_id: str,
    run_id: str,
    *,
    ascend: bool,
    variants: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Validate a run's options once (`RunConfig`) and create its run directory.

    Returns the validated options plus `run_dir`, `om_cache_dir`, and from the run's model spec (also
    recorded in `run.json`) `reference_backend` and `history_model`: what every later task reads.
    `variants` ({name: the options it changes}, a models file entry's) adds `variants`: per name the
    whole validated options of that variant with its own `run_dir` (`variants/<name>/`, a run folder
    of its own with its `run.json` when the variant `own_inputs`, see `zoo.owns_inputs`), and
    `export_batch_size`, the largest batch of the variants that share the run's ascend graph.
    """
    from gfocal_pipeline.adapters import run_model_spec
    from gfocal_pipeline.run_config import RunConfig

    config = RunConfig.from_mapping(values, ascend=ascend).to_dict()
    spec = run_model_spec(config["model"], config["checkpoint"])
    run_dir = run_directory(config["work_dir"], dag_id, run_id)
    run_dir.mkdir(parents=True, exist_ok=True)
    layout = RunLayout.at(run_dir)
    by_variant = _variant_configs(values, variants, ascend=ascend)  # checked before anything is written
    record = {"dag_id": dag_id, "run_id": run_id, "created": time.time(), "model": spec.to_dict()}
    if not layout.run_json.is_file():  # a retried prepare keeps the run's creation time
        write_json(layout.run_json, {**record, "config": config})
    for name, variant in by_variant.items():
        variant["run_dir"] = str(_variant_folder(layout, name, variant, record))
    prepared = {
        **config,
        "run_dir": str(run_dir),
        "om_cache_dir": str(om_cache_dir(config["work_dir"])),
        "reference_backend": spec.reference_backend,  # what the nightly's reference branch runs
        "history_model": spec.history_name,
    }
    if by_variant:
        batches = [v["batch_size"] for v in by_variant.values() if not v["own_inputs"]]
        prepared.update(variants=by_variant, export_batch_size=max(batches or [config["batch_size"]]))
    return prepared


def _variant_configs(
    values: dict[str, Any], variants: dict[str, dict[str, Any]] | None, *, ascend: bool
) -> dict[str, dict[str, Any]]:
    """Each variant's validated options: the run's values with its changes, and `own_inputs`."""
    from gfocal_pipeline.run_config import RunConfig
    from gfocal_pipeline.zoo import owns_inputs

    found = {}
    for name, changes in (variants or {}).items():
        try:
            config = RunConfig.from_mapping({**values, **changes}, ascend=ascend).to_dict()
        except GfocalError as exc:
            raise ConfigError(f"variant {name!r}: {exc}") from None
        found[name] = {**config, "variant": name, "own_inputs": owns_inputs(changes)}
    return found


def _variant_folder(layout: RunLayout, name: str, variant: dict[str, Any], record: dict[str, Any]) -> Path:
    """`variants/<name>/` of the run; a variant that owns its inputs is a run folder of its own there:
    its `run.json` (`record` with its options) makes it its manifest's, inputs' and graphs' root."""
    folder = layout.variant(safe_name(name)).root
    folder.mkdir(parents=True, exist_ok=True)
    own_record = folder / layout.run_json.name
    if variant["own_inputs"] and not own_record.is_file():
        config = {key: value for key, value in variant.items() if key not in ("variant", "own_inputs")}
        write_json(own_record, {**record, "config": config, "variant": name})
    return folder


def om_batch_sizes(batch_size: int) -> tuple[int, ...]:
    """The dynamic batch sizes an OM is converted with to run `batch_size` (none for batch 1)."""
    return (1, batch_size) if batch_size > 1 else ()


def export_step(
    run_dir: str | Path,
    variant: str,
    checkpoint: str | Path,
    *,
    dtype: str = "float32",
    batch_size: int = 1,
    work_dir: str | Path | None = None,
    cache_onnx: bool = True,
    model: str = "gfocalv2",
    **options: Any,
) -> dict[str, Any]:
    """Export `checkpoint` of adapter `model` (see `export.export_onnx`): into the ONNX cache of
    `work_dir` (the graph stays there; `cached` says whether it was reused), else to the run's
    `model/gfocal_<variant>.onnx`.

    The portable graph has a dynamic batch and, for uint8 inputs, normalizes in the graph; the
    Ascend graph stays float NCHW (AIPP normalizes on the NPU) with a dynamic batch only for
    `batch_size` > 1 (then converted to a dynamic-batch OM)."""
    from gfocal_pipeline.export import export_onnx

    portable = variant == "portable"
    options = {
        **options,
        "dynamic_batch": portable or batch_size > 1,
        "normalize_in_graph": portable and dtype == "uint8",
    }
    target = RunLayout.at(run_dir).onnx(variant)
    with step_lock(run_dir, f"export-{variant}"):
        reclaim_temps(target.parent, [target.name])
        if work_dir is not None and cache_onnx:
            from gfocal_pipeline.step_caches import cached_export

            # the run's model spec is part of the key (a bring-your-own graph's declaration with it)
            spec = RunLayout.at(run_dir).recorded_model()
            return cached_export(run_dir, work_dir, variant, checkpoint, model=model, spec=spec, **options)
        result = export_onnx(checkpoint=checkpoint, output=target, variant=variant, model=model, **options)
    return {**result.to_xcom(), "cached": False}


def convert_step(
    run_dir: str | Path, onnx_path: str | Path, cache_dir: str | Path, batch_size: int = 1, **options: Any
) -> dict[str, Any]:
    """ONNX -> the run's `model/gfocal.om` with atc through the OM cache (see `backends.atc`).

    `batch_size` > 1 converts a dynamic-batch OM with sizes (1, batch_size)."""
    from gfocal_pipeline.backends.atc import convert_onnx
    from gfocal_pipeline.step_caches import note_key_use

    layout = RunLayout.at(run_dir)
    with step_lock(layout.root, "convert"):
        reclaim_temps(layout.om.parent, [layout.om.name, "convert.json"])
        result = convert_onnx(
            onnx_path,
            cache_dir,
            output_dir=layout.om.parent,
            om_name=layout.om.stem,
            dynamic_batch_sizes=om_batch_sizes(batch_size),
            **options,
        )
    # the OM cache is a kind of the work directory's cache (`cache/om`): the run names its entry
    note_key_use(layout.root, Path(cache_dir).name, result["cache_key"], result["cached"])
    return result


def preprocess_step(
    coco_root: str | Path,
    run_dir: str | Path,
    *,
    images_dir: str = DEFAULT_IMAGE_DIR,
    annotations: str = DEFAULT_ANNOTATION_FILE,
    work_dir: str | Path | None = None,
    cache_inputs: bool = True,
    model: str | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Preprocess a COCO-format set (`images_dir`, `annotations` inside `coco_root`) for `run_dir`;
    returns the manifest facts and the shard names. `shard_size` None (the default) sizes the
    shards by `shard_plan` (`sharding.ShardPlan`: one NPU unless given). The pixel format (channel
    order, mean/std, pad value) and the class list the annotations are checked against are the
    model's: the spec `run.json` records, else adapter `model`'s (the CLI; default GFocalV2's).

    With a `work_dir` (the DAGs) the inputs go to its inputs cache (`cache_inputs`), or, with the
    cache off, nowhere: the manifest is written and each inference task builds and then deletes
    its own shard, so the disk holds only the shards in flight. Without one (`gfocal preprocess`)
    they are written into `run_dir/inputs/`."""
    from gfocal_pipeline.preprocess import preprocess

    started = time.perf_counter()
    layout = RunLayout.at(run_dir)
    where = {"image_dir": images_dir, "annotation_file": annotations}
    spec = _run_spec(layout, model)
    options["pixels"] = pixels_of(spec)
    options["classes"] = {"num_classes": spec.get("num_classes", NUM_CLASSES), "classes": spec.get("classes")}
    reuse: dict[str, Any] = {"cached": False}
    layout.root.mkdir(parents=True, exist_ok=True)
    with step_lock(layout.root, "preprocess"):
        reclaim_temps(layout.root, [layout.manifest.name])
        if work_dir is not None and cache_inputs:
            from gfocal_pipeline.step_caches import cached_inputs

            manifest, reuse = cached_inputs(preprocess, coco_root, layout.root, work_dir, **where, **options)
        elif work_dir is not None:
            manifest = preprocess(coco_root, layout.root, **where, **options, write_inputs=False)
            manifest.per_task_inputs = True
            manifest.write(layout.manifest)
        else:
            manifest = preprocess(coco_root, layout.root, **where, **options)
    return {
        **reuse,
        "dataset_id": manifest.dataset_id,
        "inputs": "per-task" if manifest.per_task_inputs else str(manifest.inputs_folder),
        "manifest_path": str(manifest.path),
        "manifest_sha256": manifest.sha256,
        "policy": manifest.policy,
        "dtype": manifest.dtype,
        "pixels": manifest.pixel_format.describe(),
        "input_shape": list(manifest.input_shape()),
        "images": len(manifest.images),
        "skipped": len(manifest.skipped),
        "skipped_images": skipped_images(manifest),
        "shards": sorted(manifest.shards),
        "shard_size": manifest.shard_size,
        "preprocess_seconds": round(time.perf_counter() - started, 3),
    }


def _run_spec(layout: RunLayout, model: str | None) -> dict[str, Any]:
    """The run's recorded model spec, else adapter `model`'s (a run of `gfocal preprocess`)."""
    from gfocal_pipeline.adapters import DEFAULT_MODEL, model_spec

    return layout.recorded_model() or model_spec(model or DEFAULT_MODEL).to_dict()


SKIPPED_LISTED = 20  # at most this many skipped images named in XCom / summary (all are in the manifest)


def skipped_images(manifest: Manifest) -> list[dict[str, Any]]:
    """The first skipped images (file name + reason): small enough for XCom and the summary."""
    return [
        {"file_name": s.get("file_name"), "reason": s.get("reason")}
        for s in manifest.skipped[:SKIPPED_LISTED]
    ]


@contextlib.contextmanager
def shard_inputs(layout: RunLayout, manifest: Manifest, shard: str, backend: str) -> Iterator[Manifest]:
    """The manifest to run `shard` with: as it is when its inputs exist, else (per-task inputs, or
    inputs evicted from the cache / pruned since) pointing at a private copy of the shard built now
    from the source images (checked against their recorded sha256) and deleted when the task is done."""
    if not manifest.per_task_inputs:
        if manifest.input_dir(shard).is_dir():
            yield manifest
            return
        log.warning(
            "inputs of shard %s are gone from %s (cache eviction or retention); rebuilding them",
            shard,
            manifest.inputs_folder,
        )
    from gfocal_pipeline.preprocess import materialize_shard

    # private to the task: a variant's folder name keeps two variants of one backend apart
    owner = backend if layout.root == layout.run_root else f"{layout.root.name}-{backend}"
    root = layout.inputs_dir / safe_name(owner)
    try:
        materialize_shard(manifest, shard, root / shard)
        yield dataclasses.replace(manifest, inputs_root=str(root))
    finally:
        shutil.rmtree(root / shard, ignore_errors=True)


def infer_step(
    run_dir: str | Path,
    shard: str,
    backend: str,
    *,
    work_dir: str | Path | None = None,
    cache_reference: bool = True,
    **options: Any,
) -> dict[str, Any]:
    """Run one shard through `backend` (see `backends.registry`); returns its timing summary.

    The PyTorch reference (`torch`) goes through the reference cache of `work_dir` when
    `cache_reference`: an unchanged checkpoint on unchanged inputs is not run again. Its model
    adapter (`adapter`) defaults to the one the run recorded in `run.json`."""
    from gfocal_pipeline.backends.registry import backend_class, get_backend
    from gfocal_pipeline.retention import check_not_pruned

    if backend == "torch" and "adapter" not in options:
        recorded = RunLayout.at(run_dir).recorded_model().get("name")
        options = {**options, **({"adapter": recorded} if recorded else {})}

    backend_class(backend)  # an unknown backend or bad options fail before any file is read
    cached = backend == "torch" and work_dir is not None and cache_reference
    runner = None if cached else get_backend(backend, **options)
    check_not_pruned(run_dir, "model copies and inputs")
    layout = RunLayout.at(run_dir)
    manifest = load_manifest(layout.manifest)
    with step_lock(layout.root, f"infer-{safe_name(backend)}-{safe_name(shard)}"):
        reclaim_temps(layout.output_shard(backend, shard))
        reclaim_temps(layout.timing_dir(backend), [layout.timing_file(backend, shard).name])
        return _infer_locked(layout, manifest, shard, backend, runner, work_dir, options)


def _infer_locked(
    layout: RunLayout,
    manifest: Manifest,
    shard: str,
    backend: str,
    runner: Any,
    work_dir: str | Path | None,
    options: dict[str, Any],
) -> dict[str, Any]:
    from gfocal_pipeline.backends.registry import get_backend

    with shard_inputs(layout, manifest, shard, backend) as usable:
        if runner is not None:
            return {**runner.infer_shard(layout, usable, shard).to_dict(), "cached": False}
        from gfocal_pipeline.step_caches import cached_reference

        def run(target: RunLayout) -> dict[str, Any]:
            return get_backend(backend, **options).infer_shard(target, usable, shard).to_dict()

        return cached_reference(layout.root, work_dir, usable, shard, run, options["model"], options)


def _shard_timing(layout: RunLayout, backend: str, shard: str, images: int) -> dict[str, Any]:
    """The timing file of one shard of the manifest, checked: present, whole, and for its `images`."""
    path = layout.timing_file(backend, shard)
    rerun = (
        "run the inference of shard {} (again): a retried infer task redoes exactly the shards not complete"
    )
    if not path.is_file():
        raise DatasetError(
            f"the timing of shard {shard!r} of backend {backend!r} is missing: {str(path)!r} does not exist; "
            + rerun.format(repr(shard))
        )
    data = read_state_json(path, "timing file")
    summary = data.get("summary") if isinstance(data, dict) else None
    if not isinstance(summary, dict) or not summary.get("images"):
        raise DatasetError(f"timing file {str(path)!r} is damaged; " + rerun.format(repr(shard)))
    if summary["images"] != images:
        raise DatasetError(
            f"timing file {str(path)!r} records {summary['images']} images but shard {shard!r} of the "
            f"manifest has {images}: it is from an earlier preprocess of this run directory; "
            + rerun.format(repr(shard))
        )
    return data


def combined_timing(run_dir: str | Path, backend: str, shards: list[str] | None = None) -> dict[str, Any]:
    """Timing over the manifest's shards of a backend (`shards`: only those).

    Only the shards the manifest lists count: a timing file of another shard (stale, from an earlier
    preprocess of the same run directory) is ignored and named in a warning; a listed shard's
    missing, damaged or stale (another image count) timing file is an error naming the shard.

    fps = all images / sum over shards of (shard images / shard fps): each shard's fps comes from its
    backend's own formula (e.g. msame's chip count), and for in-process backends this equals images /
    total batch latency. Latency percentiles pool every shard's timed latencies.
    """
    from gfocal_pipeline.evaluate import warn_unlisted

    layout = RunLayout.at(run_dir)
    manifest = load_manifest(layout.manifest)
    warn_unlisted(layout.timing_dir(backend), manifest, "timing file(s)", suffix=".json")
    latencies: list[float] = []
    images = 0
    seconds = 0.0
    batch_sizes = set()
    shard_fps = []
    extra: dict[str, Any] = {}
    for shard in sorted(manifest.shards) if shards is None else shards:
        data = _shard_timing(layout, backend, shard, len(manifest.shards.get(shard, [])))
        summary = data["summary"]
        batch_sizes.add(summary.get("batch_size"))
        shard_fps.append(summary["fps"])
        images += summary["images"]
        seconds += summary["images"] / summary["fps"] if summary["fps"] else 0.0
        latencies += data.get("latencies_ms") or []
        extra.update({k: summary[k] for k in ("device", "chips") if k in summary})
    batch = batch_sizes.pop() if len(batch_sizes) == 1 else None
    result: dict[str, Any] = {
        "fps": images / seconds if seconds else 0.0,
        "images": images,
        "batch_size": batch,
        "shard_fps": shard_fps,
    }
    if latencies:
        result["latency_ms"] = summarize(latencies, images, batch or 1)["latency_ms"]
    return {**result, **extra}


def evaluate_step(run_dir: str | Path, backend: str, **options: Any) -> dict[str, Any]:
    """COCO evaluation of a backend's outputs plus its combined timing."""
    from gfocal_pipeline.evaluate import evaluate_outputs
    from gfocal_pipeline.retention import check_not_pruned

    check_not_pruned(run_dir, "raw outputs")
    layout = RunLayout.at(run_dir)
    with step_lock(layout.root, f"evaluate-{safe_name(backend)}"):
        reclaim_temps(layout.eval_dir(backend))
        timing = combined_timing(run_dir, backend)  # read first: results are written after all inputs
        result = evaluate_outputs(run_dir, backend, **options)
    result["timing"] = timing
    result["dataset_id"] = load_manifest(RunLayout.at(run_dir).manifest).dataset_id
    return result


def history_record(
    *,
    dag_id: str,
    run_id: str,
    role: dict[str, Any],
    evaluation: dict[str, Any],
    run_config: dict[str, Any],
    export_info: dict[str, Any],
    convert_info: dict[str, Any],
    ap_delta: float | None,
    model: str | None = None,
) -> Any:
    """The history row of one evaluated backend of a run.

    The configuration that baselines are grouped by names what changes the numbers: backend, the
    device it really ran on (the SoC from atc, or torch's device), precision, the batch actually run,
    and resize policy + input size + dtype + image count (a 8-image smoke run never becomes the
    baseline of a full val2017 run).
    """
    from gfocal_pipeline.adapters import DEFAULT_MODEL, model_spec
    from gfocal_pipeline.history import RunRecord

    # the history key: the adapter's history name (GFocalV2's is the one used since the first release)
    default = model_spec(run_config.get("model") or DEFAULT_MODEL).history_name
    model = model or run_config.get("history_model") or default
    timing = evaluation.get("timing", {})
    device = role["device"]
    if device == "auto":
        device = str(timing.get("device", "cpu"))
    elif device == "npu" and convert_info.get("soc_version"):
        device = str(convert_info["soc_version"])
    policy = (
        f"{run_config.get('policy', 'letterbox')} {run_config.get('height')}x{run_config.get('width')} "
        f"{run_config.get('dtype', 'float32')} {evaluation['images']}img"
    )
    return RunRecord.from_pipeline(
        dag_id=dag_id,
        run_id=run_id,
        config={
            "model": model,
            "backend": role["backend"],
            "device": device,
            "precision": timing.get("precision") or role.get("precision", "fp32"),
            "batch_size": timing.get("batch_size") or run_config.get("batch_size", 1),
            "policy": policy,
            # no fallback: a run without its dataset's identity must not share one with others
            **({"dataset": evaluation["dataset_id"]} if evaluation.get("dataset_id") else {}),
        },
        stats=evaluation["stats"],
        timing={**timing, "images": evaluation["images"]},
        export_info=export_info,
        convert_info=convert_info,
        ap_delta=ap_delta,
    )


def cli_history_record(
    run_dir: str | Path, backend: str, *, run_id: str | None, device: str, precision: str
) -> tuple[Any, dict[str, Any]]:
    """(history row, evaluation) of an evaluated run directory, for `gfocal gate` (no Airflow run)."""
    layout = RunLayout.at(run_dir)
    stats_file = layout.eval_dir(backend) / "stats.json"
    stats = read_state_json(stats_file, "evaluation results")
    if not isinstance(stats, dict) or not isinstance(stats.get("stats"), dict):
        state = "damaged" if stats_file.is_file() else "not found"
        raise GfocalError(f"{str(stats_file)!r} {state}; run `gfocal eval --backend {backend}` (again) first")
    manifest = load_manifest(layout.manifest)
    evaluation = {
        **stats,
        "timing": combined_timing(layout.root, backend),
        "dataset_id": manifest.dataset_id,
    }
    run_config = {
        "history_model": layout.recorded_model().get("history_name"),
        "policy": manifest.policy,
        "dtype": manifest.dtype,
        "height": manifest.input_height,
        "width": manifest.input_width,
    }
    record = history_record(
        dag_id="gfocal-cli",
        run_id=run_id or layout.root.name,
        role={"backend": backend, "device": device, "precision": precision},
        evaluation=evaluation,
        run_config=run_config,
        export_info={},
        convert_info={},
        ap_delta=None,
    )
    return record, evaluation


def variant_matrix(
    evaluations: dict[str, dict[str, Any]], variants: dict[str, dict[str, Any]], published_ap: float | None
) -> list[dict[str, Any]]:
    """One row per variant (the evaluation of role = its name): its tool, precision mode and batch,
    AP, ΔAP vs the reference (when one ran), ΔAP vs the published AP, fps and p99 latency, and
    whether it is an expected failure (`variants[name]["expected_failure"]`, the reason)."""
    reference = evaluations.get("reference", {}).get("stats", {}).get("AP")
    rows = []
    for name, facts in variants.items():
        result = evaluations.get(name) or {}
        ap = result.get("stats", {}).get("AP")
        timing = result.get("timing", {})
        rows.append(
            {
                "variant": name,
                "tool": facts.get("tool"),
                "precision_mode": facts.get("precision_mode"),
                "batch_size": timing.get("batch_size") or facts.get("batch_size"),
                "inputs": _inputs_of(facts),
                "AP": ap,
                "dAP_reference": None if ap is None or reference is None else ap - reference,
                "dAP_published": None if ap is None or published_ap is None else ap - published_ap,
                "fps": timing.get("fps"),
                "p99_ms": (timing.get("latency_ms") or {}).get("p99"),
                "expected_failure": facts.get("expected_failure"),
            }
        )
    return rows


def _inputs_of(facts: dict[str, Any]) -> str | None:
    """A variant's input size and dtype (`640x640 uint8`), when its facts have them."""
    if not facts.get("height") or not facts.get("width"):
        return None
    return f"{facts['height']}x{facts['width']} {facts.get('dtype') or 'float32'}"


def summary_step(
    run_dir: str | Path,
    evaluations: dict[str, dict[str, Any]],
    variants: dict[str, dict[str, Any]] | None = None,
    published_ap: float | None = None,
    **facts: Any,
) -> dict[str, Any]:
    """Write `summary.json` (what the summary task prints) and return it.

    With a `reference` evaluation and a `device` one, AP_reference, AP_npu and AP_delta are reported
    like the seed's 0.410 vs 0.406 table; AP_pytorch too when the reference is PyTorch (a
    bring-your-own graph's reference is ONNX Runtime on the same graph). With `variants` (a models
    file entry's, see `variant_matrix`) the summary holds their `matrix`.
    """
    from gfocal_pipeline.step_caches import reuse_summary

    layout = RunLayout.at(run_dir)
    summary: dict[str, Any] = {"run_dir": str(layout.root), **facts, "cache": reuse_summary(layout.root)}
    if layout.manifest.is_file():
        manifest = load_manifest(layout.manifest)
        if manifest.skipped:
            summary["skipped"] = {"count": len(manifest.skipped), "images": skipped_images(manifest)}
    summary["backends"] = {}
    for role, result in evaluations.items():
        timing = result.get("timing", {})
        summary["backends"][role] = {
            "backend": result.get("backend"),
            "stats": result.get("stats", {}),
            "fps": timing.get("fps"),
            "latency_ms": timing.get("latency_ms"),
            "batch_size": timing.get("batch_size"),
            "images": result.get("images"),
            "detections": result.get("detections"),
            "detections_path": result.get("detections_path"),
            "per_class_path": result.get("per_class_path"),
        }
    if "reference" in evaluations and "device" in evaluations:
        ap_ref = evaluations["reference"]["stats"]["AP"]
        ap_dev = evaluations["device"]["stats"]["AP"]
        summary.update({"AP_reference": ap_ref, "AP_npu": ap_dev, "AP_delta": ap_dev - ap_ref})
        if evaluations["reference"].get("backend", "torch") == "torch":
            summary["AP_pytorch"] = ap_ref
    if variants:
        summary["matrix"] = variant_matrix(evaluations, variants, published_ap)
        if "reference" in evaluations:
            summary["AP_reference"] = evaluations["reference"]["stats"]["AP"]
            if evaluations["reference"].get("backend", "torch") == "torch":
                summary["AP_pytorch"] = summary["AP_reference"]
    write_json(layout.summary, summary)
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """The human-readable table printed at the end of a run."""
    from gfocal_pipeline.evaluate import STAT_NAMES

    lines = [f"Run directory: {summary['run_dir']}"]
    if summary.get("weights_random"):
        lines.append(
            "NOTE: the checkpoint has RANDOM weights (generated demo): AP and detections are "
            "meaningless; speed and the pipeline itself are what this run shows."
        )
    for role, info in summary["backends"].items():
        lines.append(
            f"\n[{role}] backend={info['backend']} images={info['images']} detections={info['detections']}"
        )
        stats = info["stats"]
        lines.append(
            "  " + "  ".join(f"{name}={stats.get(name, float('nan')):.3f}" for name in STAT_NAMES[:6])
        )
        lines.append(
            "  " + "  ".join(f"{name}={stats.get(name, float('nan')):.3f}" for name in STAT_NAMES[6:])
        )
        if info.get("fps") is not None:
            lat = info.get("latency_ms") or {}
            pct = "  ".join(f"{k}={v:.1f}" for k, v in lat.items() if isinstance(v, int | float))
            lines.append(f"  fps={info['fps']:.2f} (batch {info['batch_size']})  latency ms: {pct}")
        lines.append(f"  detections: {info['detections_path']}")
        lines.append(f"  per-class AP: {info['per_class_path']}")
    if summary.get("skipped"):
        skipped = summary["skipped"]
        lines.append(f"\nskipped {skipped['count']} unreadable image(s) (skip_bad_images), e.g.:")
        lines += [f"  {s['file_name']}: {s['reason']}" for s in skipped["images"][:5]]
    if summary.get("cache"):
        reused = ", ".join(
            f"{kind} {n['reused']} reused / {n['built']} built" for kind, n in summary["cache"].items()
        )
        lines.append(f"\ncache: {reused}")
    if summary.get("matrix"):
        lines += ["", *format_matrix(summary["matrix"], summary.get("AP_reference"))]
    if "AP_delta" in summary:
        reference = summary["backends"].get("reference", {}).get("backend") or "torch"
        name = "AP_pytorch" if reference == "torch" else f"AP_{reference}"
        lines.append(
            f"\n{name}={summary.get('AP_reference', summary.get('AP_pytorch', 0.0)):.4f}  "
            f"AP_npu={summary['AP_npu']:.4f}  "
            f"AP_delta={summary['AP_delta']:+.4f}"
        )
    return "\n".join(lines)


def _cell(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_matrix(matrix: list[dict[str, Any]], ap_reference: float | None = None) -> list[str]:
    """The variant matrix as aligned text lines (the summary task's log, the CLI)."""
    header = [
        "variant",
        "tool",
        "precision",
        "batch",
        "inputs",
        "AP",
        "dAP_ref",
        "dAP_pub",
        "fps",
        "p99 ms",
        "expected",
    ]
    rows = [header]
    for row in matrix:
        rows.append(
            [
                str(row["variant"]),
                str(row.get("tool") or "-"),
                str(row.get("precision_mode") or "-"),
                _cell(row.get("batch_size"), "d"),
                str(row.get("inputs") or "-"),
                _cell(row.get("AP"), ".4f"),
                _cell(row.get("dAP_reference"), "+.4f"),
                _cell(row.get("dAP_published"), "+.4f"),
                _cell(row.get("fps"), ".2f"),
                _cell(row.get("p99_ms"), ".1f"),
                "FAILS: " + row["expected_failure"] if row.get("expected_failure") else "",
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    title = "variants" + ("" if ap_reference is None else f" (reference AP {ap_reference:.4f})")
    return [title, *("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)]
