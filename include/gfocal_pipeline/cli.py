"""`gfocal` command line: every pipeline step without Airflow, with the options of the DAGs' forms.

Options shared with the trigger forms (sizes, policy, dtype, batch, Ascend tool settings, gate
thresholds, ...) are generated from `RunConfig` (same names, bounds, choices and help), and are
validated the same way; relative paths are made absolute first.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from gfocal_pipeline.constants import DEFAULT_INPUT_NAME, DEFAULT_MAX_PIXELS
from gfocal_pipeline.errors import ConfigError, GfocalError, describe_os_error
from gfocal_pipeline.options import Choice, check_option, plain
from gfocal_pipeline.run_config import (
    FORM_SECTIONS,
    PREPROCESS_OPTIONS,
    form_options,
    model_input_defaults,
    option_spec,
)

DEFAULTS = {name: default for name, (default, _) in form_options(ascend=True).items()}
INFER_BACKENDS = ("onnxruntime", "torch", "msame", "ais_bench")


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True, default=str))


def add_run_options(parser: argparse.ArgumentParser, *names: str, required: Sequence[str] = ()) -> None:
    """`--<name>` options generated from the run options' specs (see `run_config`)."""
    for name in names:
        spec = option_spec(name)
        kind = str if issubclass(spec.kind, Choice) else spec.kind
        choices = spec.kind.values() if issubclass(spec.kind, Choice) else spec.allowed()
        default = None if name in required or spec.path else DEFAULTS[name]
        text = f"{spec.description} (default: {default})" if default is not None else spec.description
        parser.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            type=kind,
            choices=choices,
            default=default,
            required=name in required,
            help=text.replace("%", "%%"),  # argparse %-formats help: a literal % (e.g. "5%") must be %%
        )


def run_values(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    """The named options of `args`, validated by their specs (paths made absolute and normalized)."""
    values = {}
    for name in names:
        spec, value = option_spec(name), getattr(args, name)
        if spec.path and value:
            value = os.path.abspath(value)
        values[name] = plain(check_option(name, value, spec))
    return values


def cmd_export(args: argparse.Namespace) -> Any:
    from gfocal_pipeline.export import export_onnx

    options = run_values(args, "model", "height", "width", "parity_threshold", "max_unexplained")
    size = model_input_defaults({**options, "checkpoint": args.checkpoint}, ("height", "width"))
    options.update(height=size["height"], width=size["width"])  # empty: the model's input size
    result = export_onnx(
        checkpoint=args.checkpoint,
        output=args.output,
        variant=args.variant,
        batch=args.batch,
        dynamic_batch=args.dynamic_batch,
        opset=args.opset,
        input_name=args.input_name,
        normalize_in_graph=args.normalize_in_graph,
        **options,
    )
    return result.to_dict()


def cmd_random_checkpoint(args: argparse.Namespace) -> Any:
    from gfocal_pipeline.adapters import load_adapter
    from gfocal_pipeline.checkpoint import RANDOM_CHECKPOINT_NOTE

    model = run_values(args, "model")["model"]
    path = load_adapter(model).write_random_checkpoint(args.output, seed=args.seed)
    return {"checkpoint": str(path), "model": model, "seed": args.seed, "note": RANDOM_CHECKPOINT_NOTE}


def cmd_models(args: argparse.Namespace) -> Any:
    """The registered model adapters and their specs (no torch import)."""
    from gfocal_pipeline.adapters import model_names, model_spec

    specs = [model_spec(name) for name in model_names()]
    if args.json:
        return {spec.name: spec.to_dict() for spec in specs}
    for spec in specs:
        print(spec.describe())
    return None


def cmd_models_file(args: argparse.Namespace) -> Any:
    """Check a models file as the DAG processor will: each entry's DAG id and variants, or its error."""
    from gfocal_pipeline.zoo import MODELS_FILE_ENV, load_models_file, models_file_path, owns_inputs

    path = args.file or models_file_path()
    if not path:
        raise ConfigError(f"no models file: pass its path, or set ${MODELS_FILE_ENV}")
    models = load_models_file(path)
    for entry in models.entries:
        runs = entry.variant_runs()
        variants = ", ".join(name + (" (own inputs)" if owns_inputs(runs[name]) else "") for name in runs)
        print(f"ok     {entry.dag_id}: {entry.adapter}, variants {variants}")
    for error in models.errors:
        print(f"ERROR  {error.dag_id}: {error}")
    if models.errors:
        raise ConfigError(
            f"{len(models.errors)} of {len(models.entries) + len(models.errors)} entries are invalid"
        )
    return None


def add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a checkpoint to ONNX (portable or ascend) and check parity")
    p.add_argument("--checkpoint", required=True, help="mmcv-style .pth (official layout)")
    p.add_argument("--output", required=True, help="path of the .onnx file to write")
    p.add_argument("--variant", default="portable", choices=["portable", "ascend"])
    add_run_options(p, "model", "height", "width", "parity_threshold", "max_unexplained")
    p.add_argument("--batch", type=int, default=1, help="static batch (ignored with --dynamic-batch)")
    p.add_argument("--dynamic-batch", action="store_true", help="make the batch axis dynamic")
    p.add_argument("--opset", type=int, default=None, help="default: 17 portable, 11 ascend")
    p.add_argument("--input-name", default=DEFAULT_INPUT_NAME)
    p.add_argument(
        "--normalize-in-graph",
        action="store_true",
        help="take NHWC uint8 BGR input and normalize inside the graph",
    )
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "random-checkpoint", help="write a deterministic RANDOM-weight checkpoint (tests/demo)"
    )
    p.add_argument("--output", required=True)
    p.add_argument("--seed", type=int, default=0)
    add_run_options(p, "model")
    p.set_defaults(func=cmd_random_checkpoint)

    p = sub.add_parser("models", help="list the model adapters and their specs")
    p.add_argument("--json", action="store_true", help="the full specs as JSON")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser(
        "models-file", help="check a models file (docs/models-file.md): entries, variants, errors"
    )
    p.add_argument("file", nargs="?", help="the YAML file (default: $GFOCAL_MODELS_FILE)")
    p.set_defaults(func=cmd_models_file)


def cmd_preprocess(args: argparse.Namespace) -> Any:
    from gfocal_pipeline.steps import preprocess_step

    # the model: its pixel format, and its policy and input size where none is given
    values = model_input_defaults(run_values(args, *PREPROCESS_OPTIONS, "model"))
    extra = {"skip_bad_images": args.skip_bad_images, "workers": args.workers, "max_pixels": args.max_pixels}
    return preprocess_step(values.pop("coco_root"), args.run_dir, **values, **extra)


CONVERT_OPTIONS = ("batch_size", "soc_version", "dtype", "precision_mode", "cann_set_env")


def cmd_convert(args: argparse.Namespace) -> Any:
    from gfocal_pipeline.layout import RunLayout, om_cache_dir
    from gfocal_pipeline.steps import convert_step

    values = run_values(args, *CONVERT_OPTIONS)
    onnx = args.onnx or RunLayout.at(args.run_dir).onnx("ascend")
    cache = args.cache_dir or om_cache_dir(Path(args.run_dir).resolve().parent)
    return convert_step(
        args.run_dir,
        onnx,
        cache,
        batch_size=values["batch_size"],
        soc_version=values["soc_version"],
        input_dtype=values["dtype"],
        precision_mode=values["precision_mode"],
        set_env=values["cann_set_env"],
        log_level=args.log_level,
    )


def _default_model(backend: str, run_dir: str) -> str:
    from gfocal_pipeline.layout import RunLayout

    layout = RunLayout.at(run_dir)
    defaults = {"onnxruntime": layout.onnx("portable"), "msame": layout.om, "ais_bench": layout.om}
    if backend not in defaults:
        raise GfocalError(f"backend {backend!r} needs --model (the checkpoint .pth)")
    return str(defaults[backend])


TORCH_FLAGS = ("precision", "channels_last", "compile", "cuda_graphs")  # `gfocal infer`, torch only


def _torch_options(args: argparse.Namespace) -> dict[str, Any]:
    """The torch-only flags given on the command line (absent ones keep the backend's defaults)."""
    given = {name: getattr(args, name) for name in TORCH_FLAGS if getattr(args, name) is not None}
    if given and args.backend != "torch":
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise GfocalError(f"{flags} only apply to --backend torch, not {args.backend!r}; drop them")
    return given


def _backend_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options of `--backend`'s own constructor taken from the command line."""
    if args.adapter and args.backend != "torch":
        raise GfocalError(f"--adapter only applies to --backend torch, not {args.backend!r}; drop it")
    extra = {"keep_candidates": True} if args.keep_candidates else {}
    torch_options = _torch_options(args)
    if args.backend == "onnxruntime":
        return {"providers": args.providers, **extra}
    if args.backend == "torch":
        adapter = {"adapter": args.adapter} if args.adapter else {}
        return {"device": args.device or "auto", **adapter, **torch_options, **extra}
    args.device = 0 if args.device is None else args.device
    values = run_values(args, "device", "outfmt", "chips", "cann_set_env")
    values["set_env"] = values.pop("cann_set_env")
    return {**values, **extra}


def cmd_infer(args: argparse.Namespace) -> Any:
    from gfocal_pipeline.layout import RunLayout
    from gfocal_pipeline.manifest import load_manifest
    from gfocal_pipeline.steps import combined_timing, infer_step

    options = {
        "model": args.model or _default_model(args.backend, args.run_dir),
        **run_values(args, "batch_size"),
        **_backend_options(args),
    }
    shards = args.shard or sorted(load_manifest(RunLayout.at(args.run_dir).manifest).shards)
    results = [infer_step(args.run_dir, shard, args.backend, **options) for shard in shards]
    return {"shards": results, "timing": combined_timing(args.run_dir, args.backend, shards=shards)}


def cmd_eval(args: argparse.Namespace) -> Any:
    from gfocal_pipeline.steps import evaluate_step

    engine = run_values(args, "engine")["engine"]
    return evaluate_step(args.run_dir, args.backend, engine=engine, allow_missing=args.allow_missing)


def _latest_run(folder: str) -> Path:
    """The run directory under `folder` (a DAG's folder) whose summary.json is newest."""
    if not Path(folder).is_dir():
        raise GfocalError(
            f"{folder!r} is not a directory; pass a DAG's folder of run directories, e.g. "
            "<work_dir>/gfocal_onnxruntime"
        )
    found = []
    for path in Path(folder).glob("*/summary.json"):
        with contextlib.suppress(OSError):  # removed meanwhile (retention)
            found.append((path.stat().st_mtime, path))
    if not found:
        raise GfocalError(f"no finished run (summary.json) under {folder!r}; run a DAG to its end first")
    return max(found)[1].parent


def cmd_summary(args: argparse.Namespace) -> Any:
    from gfocal_pipeline.layout import RunLayout
    from gfocal_pipeline.steps import format_summary

    run_dir = _latest_run(args.run_dir) if args.latest else Path(args.run_dir)
    path = RunLayout.at(run_dir).summary
    if not path.is_file():
        raise GfocalError(
            f"{str(path)!r} does not exist: {str(run_dir)!r} is not a finished run directory (its summary "
            "task writes summary.json last); pass a finished run's directory, or a DAG's folder with --latest"
        )
    try:
        text = format_summary(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise GfocalError(
            f"summary {str(path)!r} is damaged ({type(exc).__name__}: {exc}); re-run the run's summary task "
            "(clear it in Airflow) to write it again, or look at its eval/*/stats.json"
        ) from None
    print(text)
    return None


GATE_OPTIONS = FORM_SECTIONS["Gate & alerts"]  # the gate's thresholds (`GateThresholds`)


def _send_alert(args: argparse.Namespace, verdict: dict[str, Any], report: dict[str, Any] | None) -> None:
    """E-mail a failed verdict (with its report); a lost alert is reported, the verdict stands."""
    from gfocal_pipeline.alerts import AlertDeliveryError, SmtpSettings, alert_on_failure

    try:
        settings = SmtpSettings.from_mapping(
            {"host": args.smtp_host, "port": args.smtp_port, "from": args.alert_from, "to": args.alert_to}
        )
        alert_on_failure(verdict, settings, report=report)
    except AlertDeliveryError as exc:
        print(f"gfocal gate: warning: alert not sent: {exc}", file=sys.stderr)


def cmd_gate(args: argparse.Namespace) -> Any:
    """Record a finished run directory in the history and judge it, without Airflow."""
    from gfocal_pipeline.gate import GateThresholds, format_verdict_table, raise_for_verdict, run_gate
    from gfocal_pipeline.history import HistoryStore, default_history_url
    from gfocal_pipeline.steps import cli_history_record

    thresholds = GateThresholds(**run_values(args, *GATE_OPTIONS))
    record, evaluation = cli_history_record(
        args.run_dir, args.backend, run_id=args.run_id, device=args.device, precision=args.precision
    )
    run_dir = os.path.abspath(args.run_dir)
    with HistoryStore(args.history_url or default_history_url()) as store:
        store.record(record)
        verdict = run_gate(
            store, record, thresholds, fps_windows=evaluation["timing"].get("shard_fps"), run_dir=run_dir
        )
    print(format_verdict_table(verdict), file=sys.stderr)
    report = _gate_report(run_dir, verdict)
    if args.smtp_host:
        _send_alert(args, verdict, report)
    raise_for_verdict(verdict)  # a failed gate exits with status 1
    return verdict


def _gate_report(run_dir: str, verdict: dict[str, Any]) -> dict[str, Any] | None:
    """The run's regression report beside the verdict; one that cannot be made is a warning."""
    from gfocal_pipeline.report import load_report, write_report

    try:
        summary = write_report(run_dir, verdict=verdict)
    except GfocalError as exc:
        print(f"gfocal gate: warning: no regression report: {exc}", file=sys.stderr)
        return None
    print(f"gfocal gate: report {summary['report_html']}", file=sys.stderr)
    return load_report(run_dir)


def cmd_report(args: argparse.Namespace) -> Any:
    """Write `<run-dir>/report/` for a run done with or without Airflow."""
    from gfocal_pipeline.report import ReportOptions, write_report

    if not os.path.isdir(args.run_dir):
        raise GfocalError(f"run directory {args.run_dir!r} does not exist; pass a finished run's directory")
    baseline = [
        {"dag_id": "-", "run_id": os.path.basename(os.path.abspath(d)), "run_dir": d} for d in args.baseline
    ]
    missing = [d for d in args.baseline if not os.path.isdir(d)]
    if missing:
        raise GfocalError(f"--baseline run directories {missing} do not exist")
    options = ReportOptions(top_images=args.top_images, score_thr=args.score_thr, iou_thr=args.iou_thr)
    reference = None if args.reference == "none" else args.reference
    summary = write_report(
        args.run_dir, backend=args.backend, reference=reference, baseline=baseline, options=options
    )
    print(f"gfocal report: {summary['report_html']}", file=sys.stderr)
    return summary


def cmd_demo_data(args: argparse.Namespace) -> Any:
    from gfocal_pipeline.workspace import ensure_demo_data

    model = run_values(args, "model")["model"]
    return {k: str(v) for k, v in ensure_demo_data(args.work_dir, model).items()}


def cmd_gc(args: argparse.Namespace) -> Any:
    from gfocal_pipeline.retention import GB, check_cache_max_gb, check_keep_runs, format_summary, gc
    from gfocal_pipeline.workspace import default_work_dir

    keep_runs = check_keep_runs(args.keep_runs, f"--keep-runs {args.keep_runs}")
    max_gb = check_cache_max_gb(args.cache_max_gb, f"--cache-max-gb {args.cache_max_gb:g}")
    work_dir = os.path.abspath(args.work_dir or default_work_dir())
    report = gc(work_dir, keep_runs, round(max_gb * GB), dry_run=args.dry_run)
    print(f"gfocal gc: {format_summary(report)}", file=sys.stderr)
    return report


def add_gc(sub: argparse._SubParsersAction) -> None:
    from gfocal_pipeline.retention import DEFAULT_CACHE_MAX_GB, DEFAULT_KEEP_RUNS

    p = sub.add_parser(
        "gc",
        help="retention: prune old run directories to their small results and evict the cache",
        description="Keep the newest --keep-runs run directories of each DAG whole, prune older ones "
        "to summary/eval/timing/final detections, then evict least-recently-used cache entries down "
        "to --cache-max-gb. Runs in progress (no summary.json, changed within 24 h) and the cache "
        "entries they use are never touched. Prints the JSON report (stdout) and a summary (stderr).",
    )
    p.add_argument("--work-dir", default=None, help="default: $GFOCAL_WORK_DIR, else $AIRFLOW_HOME/gfocal")
    p.add_argument(
        "--keep-runs",
        type=int,
        default=DEFAULT_KEEP_RUNS,
        help=f"newest run directories of each DAG kept whole (default: {DEFAULT_KEEP_RUNS})",
    )
    p.add_argument(
        "--cache-max-gb",
        type=float,
        default=DEFAULT_CACHE_MAX_GB,
        help=f"evict the cache down to this many GB (default: {DEFAULT_CACHE_MAX_GB:g}; 0: all but "
        "the entries of runs in progress)",
    )
    p.add_argument("--dry-run", action="store_true", help="report what would be removed; remove nothing")
    p.set_defaults(func=cmd_gc)


def _pixels(text: str) -> int | None:
    """`--max-pixels`: a positive integer (underscores allowed), or 0 for no budget."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number of pixels >= 0 (0: no budget), got {text!r}")
    return value or None


def add_preprocess_and_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("preprocess", help="COCO-format set -> manifest + sharded .bin inputs")
    p.add_argument("--run-dir", required=True)
    add_run_options(p, *PREPROCESS_OPTIONS, "model", required=("coco_root",))
    p.add_argument(
        "--skip-bad-images",
        action="store_true",
        help="leave unreadable images (and images over --max-pixels) out, listed in manifest.skipped",
    )
    p.add_argument("--workers", type=int, default=None)
    p.add_argument(
        "--max-pixels",
        type=_pixels,
        default=DEFAULT_MAX_PIXELS,
        help="pixel budget of one image (width x height, from its header, before decoding); an image over "
        f"it is a bad image; 0: no budget (default: {DEFAULT_MAX_PIXELS})",
    )
    p.set_defaults(func=cmd_preprocess)

    p = sub.add_parser("convert", help="the Ascend ONNX -> <run-dir>/model/gfocal.om with atc (OM cache)")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--onnx", default=None, help="default: <run-dir>/model/<name>_ascend.onnx")
    p.add_argument("--cache-dir", default=None, help="OM cache (default: <run-dir>/../cache/om)")
    p.add_argument("--log-level", default="error", choices=["debug", "info", "warning", "error", "null"])
    add_run_options(p, *CONVERT_OPTIONS)
    p.set_defaults(func=cmd_convert)


def add_infer(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("infer", help="run shards of a run directory through a backend")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--backend", default="onnxruntime", choices=INFER_BACKENDS)
    p.add_argument(
        "--model",
        default=None,
        help="ONNX (onnxruntime), checkpoint (torch) or OM (msame, ais_bench); default: the run's "
        "model/<name>_portable.onnx or model/<name>.om (<name>: gfocal for GFocalV2)",
    )
    p.add_argument("--shard", action="append", help="shard name (repeatable); default: all")
    p.add_argument(
        "--adapter",
        default=None,
        choices=option_spec("model").allowed(),
        help="torch: the checkpoint's model adapter (default: the model the run recorded, else gfocalv2)",
    )
    add_run_options(p, "batch_size", "outfmt", "chips", "cann_set_env")
    p.add_argument("--providers", default=None, help="onnxruntime providers, e.g. cpu or cuda,cpu")
    p.add_argument(
        "--device",
        default=None,
        help="torch: auto (default), cpu, cuda; msame/ais_bench: the NPU device id (default 0)",
    )
    p.add_argument(
        "--keep-candidates",
        action="store_true",
        help="also keep each shard's raw candidates (candidates.npz, large; for debugging)",
    )
    p.add_argument(
        "--precision",
        choices=["fp32", "fp16"],
        default=None,
        help="torch: network precision (default fp16 on CUDA, fp32 on CPU; the decode is always fp32)",
    )
    p.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch: NHWC memory format for the network (default: on for CUDA, off for CPU)",
    )
    p.add_argument(
        "--compile",
        choices=["off", "default", "max-autotune"],
        default=None,
        help="torch: torch.compile mode (default off; compiling takes minutes)",
    )
    p.add_argument(
        "--cuda-graphs",
        action="store_true",
        default=None,
        help="torch on CUDA: capture the forward as a CUDA graph (the last partial batch is padded)",
    )
    p.set_defaults(func=cmd_infer)


def add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="postprocess + COCO evaluation of a backend's outputs")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--backend", default="onnxruntime", choices=INFER_BACKENDS)
    add_run_options(p, "engine")
    p.add_argument("--allow-missing", action="store_true", help="count images without output as empty")
    p.set_defaults(func=cmd_eval)


def add_results(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("summary", help="print the summary table of a finished run")
    p.add_argument("run_dir")
    p.add_argument("--latest", action="store_true", help="run_dir is a DAG folder: show its newest run")
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser("gate", help="record a finished run in the history and apply the regression gate")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--backend", default="onnxruntime", choices=INFER_BACKENDS)
    p.add_argument("--run-id", default=None, help="default: the run directory's name")
    p.add_argument("--device", default="auto", help="auto: where the backend ran (torch: cpu or cuda)")
    p.add_argument("--precision", default="fp32")
    p.add_argument(
        "--history-url", default=None, help="SQLAlchemy URL (default: $GFOCAL_HISTORY_URL or SQLite)"
    )
    add_run_options(p, *GATE_OPTIONS)
    p.add_argument("--smtp-host", default=None, help="send an alert on failure through this SMTP server")
    p.add_argument("--smtp-port", type=int, default=25)
    p.add_argument("--alert-from", default="gfocal@localhost")
    p.add_argument("--alert-to", default=None, help="comma-separated recipients")
    p.set_defaults(func=cmd_gate)

    p = sub.add_parser(
        "report",
        help="write a run's regression report (report/report.json, report.html, pictures)",
        description="Compare a run's device backend with its PyTorch reference (or the ground truth) and "
        "with baseline runs: per-class AP sorted by the largest drop, AP by object size, the images that "
        "disagree most, with pictures. Written to <run-dir>/report/; the gate writes the same report.",
    )
    p.add_argument("--run-dir", required=True)
    p.add_argument(
        "--backend", default=None, help="device backend (default: the run's one non-torch evaluation)"
    )
    p.add_argument(
        "--reference", default="auto", help="reference backend: auto (torch when evaluated), a name, or none"
    )
    p.add_argument("--baseline", action="append", default=[], help="a baseline run directory (repeatable)")
    p.add_argument("--top-images", type=int, default=6, help="pictures drawn (default: 6)")
    p.add_argument(
        "--score-thr", type=float, default=0.3, help="confident boxes for the image ranking (default: 0.3)"
    )
    p.add_argument("--iou-thr", type=float, default=0.5, help="IoU of a match (default: 0.5)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("demo-data", help="generate the demo COCO set and a model's RANDOM checkpoint")
    p.add_argument("--work-dir", default=None)
    add_run_options(p, "model")
    p.set_defaults(func=cmd_demo_data)


DOCTOR_OPTIONS = ("height", "width", "dtype")


def _doctor_smtp(args: argparse.Namespace) -> Any:
    from gfocal_pipeline.probes import SmtpTarget

    if not args.smtp_host:
        return None
    port = args.smtp_port or (465 if args.smtp_security == "ssl" else 25)
    return SmtpTarget(args.smtp_host, port, args.smtp_security, "--smtp-host")


def cmd_doctor(args: argparse.Namespace) -> Any:
    """Check this host for a night: one line per check (stdout; stderr with --json), exit 1 on a FAIL."""
    from gfocal_pipeline.doctor import DoctorFailed, run_doctor, settings_from_environment, verdict_line

    if not args.verbose:  # the tools' output lines are for -v; the report is the check lines
        logging.getLogger().setLevel(logging.WARNING)
    settings = settings_from_environment(
        set_env=args.set_env,
        tool=args.tool,
        work_dir=os.path.abspath(args.work_dir) if args.work_dir else None,
        images=args.images,
        metadata_url=args.metadata_url,
        history_url=args.history_url,
        broker_url=args.broker_url,
        smtp=_doctor_smtp(args),
        smtp_conn_id=args.smtp_conn_id,
        timeout_s=args.timeout,
        **model_input_defaults(run_values(args, *DOCTOR_OPTIONS), ("height", "width")),
    )
    stream = sys.stderr if args.json else sys.stdout
    results = run_doctor(
        settings, args.only, on_result=lambda result: print(result.line(), file=stream, flush=True)
    )
    print(verdict_line(results), file=stream, flush=True)
    failed = [result for result in results if result.failed]
    if args.json:
        _print_json({"ready": not failed, "checks": [result.to_dict() for result in results]})
    if failed:
        raise DoctorFailed(failed, with_lines=False)
    return None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


# `gfocal doctor`'s text options (default: not given, then the Airflow environment decides)
DOCTOR_TEXT_OPTIONS = (
    (
        "--set-env",
        "CANN set_env.sh (default: $GFOCAL_CANN_SET_ENV, else /usr/local/Ascend/ascend-toolkit/set_env.sh)",
    ),
    (
        "--work-dir",
        "the shared work directory (default: [gfocal] work_dir, $GFOCAL_WORK_DIR, else $AIRFLOW_HOME/gfocal)",
    ),
    (
        "--metadata-url",
        "Airflow's metadata DB (default: $AIRFLOW__DATABASE__SQL_ALCHEMY_CONN, else airflow.cfg)",
    ),
    (
        "--history-url",
        "the results history DB (default: [gfocal] history_url, $GFOCAL_HISTORY_URL, else SQLite)",
    ),
    ("--broker-url", "the Celery broker (default: $AIRFLOW__CELERY__BROKER_URL, else airflow.cfg)"),
    ("--smtp-host", "SMTP server (default: the Airflow connection --smtp-conn-id, from $AIRFLOW_CONN_<ID>)"),
    ("--smtp-conn-id", "Airflow SMTP connection (default: [gfocal] smtp_conn_id, else smtp_default)"),
)


def add_doctor(sub: argparse._SubParsersAction) -> None:
    from gfocal_pipeline.doctor import CHECKS, DEFAULT_IMAGES, DEFAULT_TIMEOUT_S, TOOLS
    from gfocal_pipeline.probes import SMTP_SECURITY

    p = sub.add_parser(
        "doctor",
        help="check this worker host for a night: CANN, NPU, work dir, databases, broker, SMTP, versions",
        description="One line per check: OK, WARN, SKIP, or FAIL with the fix; exit status 1 when a check "
        "a night needs FAILs. See docs/doctor.md.",
    )
    for flag, text in DOCTOR_TEXT_OPTIONS:
        p.add_argument(flag, default=None, help=text.replace("%", "%%"))
    p.add_argument(
        "--tool",
        default="msame",
        choices=TOOLS,
        help="the night's inference tool: missing, it FAILs; the other one only WARNs (default: msame)",
    )
    p.add_argument(
        "--images",
        type=_positive_int,
        default=DEFAULT_IMAGES,
        help=f"images of the next night, for the free space it needs (default: {DEFAULT_IMAGES})",
    )
    add_run_options(p, *DOCTOR_OPTIONS)
    p.add_argument(
        "--smtp-port", type=int, default=None, help="default: 465 with --smtp-security ssl, else 25"
    )
    p.add_argument(
        "--smtp-security", default="plain", choices=SMTP_SECURITY, help="with --smtp-host (default: plain)"
    )
    p.add_argument(
        "--timeout",
        type=_positive_float,
        default=DEFAULT_TIMEOUT_S,
        help=f"seconds per network operation (default: {DEFAULT_TIMEOUT_S:g})",
    )
    groups = ", ".join(dict.fromkeys(check.group for check in CHECKS))
    p.add_argument(
        "--only",
        action="append",
        default=None,
        help=f"comma-separated checks or groups ({groups}); repeatable (default: all)",
    )
    p.add_argument(
        "--json", action="store_true", help="also print the results as JSON (stdout; lines: stderr)"
    )
    p.set_defaults(func=cmd_doctor)


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_export,
    add_preprocess_and_convert,
    add_infer,
    add_eval,
    add_results,
    add_gc,
    add_doctor,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gfocal", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        result = args.func(args)
        if result is not None:
            _print_json(result)
    except GfocalError as exc:
        print(f"gfocal {args.command}: error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 2)
    except OSError as exc:  # disk full, read-only folder, a directory given for a file, ...
        print(f"gfocal {args.command}: error: {describe_os_error(exc, args.command)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gfocal {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
