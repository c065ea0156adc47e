"""`gfocal` command line: every pipeline step without Airflow, with the same options as the operators."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from gfocal_pipeline.constants import DEFAULT_HEIGHT, DEFAULT_INPUT_NAME, DEFAULT_WIDTH
from gfocal_pipeline.errors import GfocalError
from gfocal_pipeline.manifest import load_manifest


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True, default=str))


def cmd_export(args: argparse.Namespace) -> Any:
    from gfocal_pipeline.export import export_onnx

    result = export_onnx(
        checkpoint=args.checkpoint,
        output=args.output,
        variant=args.variant,
        height=args.height,
        width=args.width,
        batch=args.batch,
        dynamic_batch=args.dynamic_batch,
        opset=args.opset,
        input_name=args.input_name,
        normalize_in_graph=args.normalize_in_graph,
        parity_threshold=args.parity_threshold,
    )
    return result.to_dict()


def cmd_random_checkpoint(args: argparse.Namespace) -> Any:
    from gfocal_pipeline.checkpoint import RANDOM_CHECKPOINT_NOTE, write_random_checkpoint

    path = write_random_checkpoint(args.output, seed=args.seed)
    return {"checkpoint": str(path), "seed": args.seed, "note": RANDOM_CHECKPOINT_NOTE}


def add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a checkpoint to ONNX (portable or ascend) and check parity")
    p.add_argument("--checkpoint", required=True, help="mmcv-style .pth (official layout)")
    p.add_argument("--output", required=True, help="path of the .onnx file to write")
    p.add_argument("--variant", default="portable", choices=["portable", "ascend"])
    p.add_argument("--height", type=int, default=DEFAULT_HEIGHT)
    p.add_argument("--width", type=int, default=DEFAULT_WIDTH)
    p.add_argument("--batch", type=int, default=1, help="static batch (ignored with --dynamic-batch)")
    p.add_argument("--dynamic-batch", action="store_true", help="make the batch axis dynamic")
    p.add_argument("--opset", type=int, default=None, help="default: 17 portable, 11 ascend")
    p.add_argument("--input-name", default=DEFAULT_INPUT_NAME)
    p.add_argument(
        "--normalize-in-graph",
        action="store_true",
        help="take NHWC uint8 BGR input and normalize inside the graph",
    )
    p.add_argument("--parity-threshold", type=float, default=1e-3)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "random-checkpoint", help="write a deterministic RANDOM-weight checkpoint (tests/demo)"
    )
    p.add_argument("--output", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_random_checkpoint)


def cmd_preprocess(args: argparse.Namespace) -> Any:
    from gfocal_pipeline.steps import preprocess_step

    return preprocess_step(
        args.coco_root,
        args.run_dir,
        policy=args.policy,
        dtype=args.dtype,
        height=args.height,
        width=args.width,
        shard_size=args.shard_size,
        max_images=args.max_images,
        skip_bad_images=args.skip_bad_images,
        workers=args.workers,
    )


def cmd_infer(args: argparse.Namespace) -> Any:
    from gfocal_pipeline.layout import RunLayout
    from gfocal_pipeline.manifest import load_manifest
    from gfocal_pipeline.steps import combined_timing, infer_step

    options: dict[str, Any] = {"batch_size": args.batch_size}
    if args.backend == "torch":
        options.update(checkpoint=args.model, device=args.device)
    else:
        options.update(model=args.model, providers=args.providers)
    shards = args.shard or sorted(load_manifest(RunLayout.at(args.run_dir).manifest).shards)
    results = [infer_step(args.run_dir, shard, args.backend, **options) for shard in shards]
    return {"shards": results, "timing": combined_timing(args.run_dir, args.backend)}


def cmd_eval(args: argparse.Namespace) -> Any:
    from gfocal_pipeline.steps import evaluate_step

    return evaluate_step(args.run_dir, args.backend, engine=args.engine, allow_missing=args.allow_missing)


def cmd_summary(args: argparse.Namespace) -> Any:
    from gfocal_pipeline.layout import RunLayout
    from gfocal_pipeline.steps import format_summary

    run_dir = args.run_dir
    if args.latest:
        candidates = sorted(Path(args.run_dir).glob("*/summary.json"), key=lambda p: p.stat().st_mtime)
        if not candidates:
            raise GfocalError(f"no finished run (summary.json) under {args.run_dir!r}")
        run_dir = candidates[-1].parent
    summary = json.loads(RunLayout.at(run_dir).summary.read_text())
    print(format_summary(summary))
    return None


def cmd_gate(args: argparse.Namespace) -> Any:
    """Record a finished run directory in the history and judge it, without Airflow."""
    from gfocal_pipeline.alerts import AlertDeliveryError, SmtpSettings, alert_on_failure
    from gfocal_pipeline.gate import GateThresholds, format_verdict_table, run_gate
    from gfocal_pipeline.history import HistoryStore, default_history_url
    from gfocal_pipeline.layout import RunLayout
    from gfocal_pipeline.steps import combined_timing, history_record

    layout = RunLayout.at(args.run_dir)
    stats_file = layout.eval_dir(args.backend) / "stats.json"
    if not stats_file.is_file():
        raise GfocalError(f"{str(stats_file)!r} not found; run `gfocal eval --backend {args.backend}` first")
    evaluation = {**json.loads(stats_file.read_text()), "timing": combined_timing(layout.root, args.backend)}
    manifest = load_manifest(layout.manifest)
    run_config = {
        "policy": manifest.policy,
        "dtype": manifest.dtype,
        "height": manifest.input_height,
        "width": manifest.input_width,
    }
    role = {"backend": args.backend, "device": args.device, "precision": args.precision}
    record = history_record(
        dag_id="gfocal-cli",
        run_id=args.run_id or layout.root.name,
        role=role,
        evaluation=evaluation,
        run_config=run_config,
        export_info={},
        convert_info={},
        ap_delta=None,
    )
    thresholds = GateThresholds.from_mapping(
        {k: getattr(args, k) for k in ("min_ap", "min_fps", "ap_tolerance", "fps_tolerance", "baseline_runs")}
    )
    with HistoryStore(args.history_url or default_history_url()) as store:
        store.record(record)
        verdict = run_gate(store, record, thresholds, fps_windows=evaluation["timing"].get("shard_fps"))
    print(format_verdict_table(verdict), file=sys.stderr)
    if args.smtp_host:
        try:
            settings = SmtpSettings.from_mapping(
                {"host": args.smtp_host, "port": args.smtp_port, "from": args.alert_from, "to": args.alert_to}
            )
            alert_on_failure(verdict, settings)
        except AlertDeliveryError as exc:  # the verdict stands; a lost alert is reported, not fatal
            print(f"gfocal gate: warning: alert not sent: {exc}", file=sys.stderr)
    if not verdict["passed"]:
        raise GateFailed(verdict)
    return verdict


class GateFailed(GfocalError):
    """The gate judged the run a regression (exit status 1)."""

    exit_code = 1

    def __init__(self, verdict: dict[str, Any]) -> None:
        super().__init__(f"regression: {', '.join(verdict.get('regressed') or ['floors'])}")


def cmd_demo_data(args: argparse.Namespace) -> Any:
    from gfocal_pipeline.config import ensure_demo_data

    return {k: str(v) for k, v in ensure_demo_data(args.work_dir).items()}


def add_steps(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("preprocess", help="COCO root -> manifest + sharded .bin inputs")
    p.add_argument("--coco-root", required=True)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--policy", default="letterbox", choices=["letterbox", "mmdet"])
    p.add_argument("--dtype", default="float32", choices=["float32", "uint8"])
    p.add_argument("--height", type=int, default=DEFAULT_HEIGHT)
    p.add_argument("--width", type=int, default=DEFAULT_WIDTH)
    p.add_argument("--shard-size", type=int, default=8)
    p.add_argument("--max-images", type=int, default=None)
    p.add_argument("--skip-bad-images", action="store_true")
    p.add_argument("--workers", type=int, default=None)
    p.set_defaults(func=cmd_preprocess)

    p = sub.add_parser("infer", help="run shards of a run directory through a backend")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "torch"])
    p.add_argument("--model", required=True, help="ONNX file (onnxruntime) or checkpoint (torch)")
    p.add_argument("--shard", action="append", help="shard name (repeatable); default: all")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--providers", default=None, help="onnxruntime providers, e.g. cpu or cuda,cpu")
    p.add_argument("--device", default="auto", help="torch device: auto, cpu, cuda")
    p.set_defaults(func=cmd_infer)

    p = sub.add_parser("eval", help="postprocess + COCO evaluation of a backend's outputs")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--backend", default="onnxruntime")
    p.add_argument("--engine", default="faster-coco-eval", choices=["faster-coco-eval", "pycocotools"])
    p.add_argument("--allow-missing", action="store_true", help="count images without output as empty")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("summary", help="print the summary table of a finished run")
    p.add_argument("run_dir")
    p.add_argument("--latest", action="store_true", help="run_dir is a DAG folder: show its newest run")
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser("gate", help="record a finished run in the history and apply the regression gate")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--backend", default="onnxruntime")
    p.add_argument("--run-id", default=None, help="default: the run directory's name")
    p.add_argument("--device", default="auto", help="auto: where the backend ran (torch: cpu or cuda)")
    p.add_argument("--precision", default="fp32")
    p.add_argument(
        "--history-url", default=None, help="SQLAlchemy URL (default: $GFOCAL_HISTORY_URL or SQLite)"
    )
    p.add_argument("--min-ap", type=float, default=None)
    p.add_argument("--min-fps", type=float, default=None)
    p.add_argument("--ap-tolerance", type=float, default=0.003)
    p.add_argument("--fps-tolerance", type=float, default=0.05)
    p.add_argument("--baseline-runs", type=int, default=5)
    p.add_argument("--smtp-host", default=None, help="send an alert on failure through this SMTP server")
    p.add_argument("--smtp-port", type=int, default=25)
    p.add_argument("--alert-from", default="gfocal@localhost")
    p.add_argument("--alert-to", default=None, help="comma-separated recipients")
    p.set_defaults(func=cmd_gate)

    p = sub.add_parser("demo-data", help="generate the demo COCO set and RANDOM checkpoint")
    p.add_argument("--work-dir", default=None)
    p.set_defaults(func=cmd_demo_data)


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [add_export, add_steps]


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
    return 0


if __name__ == "__main__":
    sys.exit(main())
