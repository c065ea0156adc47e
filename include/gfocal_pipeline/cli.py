"""`gfocal` command line: every pipeline step without Airflow, with the same options as the operators."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from gfocal_pipeline.constants import DEFAULT_HEIGHT, DEFAULT_INPUT_NAME, DEFAULT_WIDTH
from gfocal_pipeline.errors import GfocalError


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True, default=str))


def cmd_export(args: argparse.Namespace) -> Any:
    from gfocal_pipeline.export import export_onnx

    result = export_onnx(
        checkpoint=args.checkpoint, output=args.output, variant=args.variant, height=args.height,
        width=args.width, batch=args.batch, dynamic_batch=args.dynamic_batch, opset=args.opset,
        input_name=args.input_name, normalize_in_graph=args.normalize_in_graph,
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
    p.add_argument("--normalize-in-graph", action="store_true",
                   help="take NHWC uint8 BGR input and normalize inside the graph")
    p.add_argument("--parity-threshold", type=float, default=1e-3)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("random-checkpoint", help="write a deterministic RANDOM-weight checkpoint (tests/demo)")
    p.add_argument("--output", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_random_checkpoint)


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [add_export]


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
        _print_json(args.func(args))
    except GfocalError as exc:
        print(f"gfocal {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
