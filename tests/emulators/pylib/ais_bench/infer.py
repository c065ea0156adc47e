"""The emulated ais_bench inference run: flags, `[LEVEL] msg` logging, output folder and summary."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import sys

import numpy as np
from gfocal_emulator.common import ais_folder_name, faults, record_call
from gfocal_emulator.model import EmulatedModel

logger = logging.getLogger("ais_bench")


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true"):
        return True
    if text.lower() in ("0", "false"):
        return False
    raise argparse.ArgumentTypeError(f"{text} is not a boolean (1/0/true/false)")


def _device(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 255:
        raise argparse.ArgumentTypeError(f"device:{value} is out of range [0, 255]")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ais_bench")
    p.add_argument("--model", "-m", required=True)
    p.add_argument("--input", "-i", default=None)
    p.add_argument("--output", "-o", default=None)
    p.add_argument("--output_dirname", default=None)
    p.add_argument("--outfmt", default="BIN", choices=["NPY", "BIN", "TXT"])
    p.add_argument("--loop", "-l", type=int, default=1)
    p.add_argument("--debug", type=_bool, default=False)
    p.add_argument("--device", "-d", type=_device, default=0)
    p.add_argument("--dymBatch", type=int, default=0)
    p.add_argument("--batchsize", type=int, default=None)
    p.add_argument("--warmup_count", type=int, default=1)
    p.add_argument("--display_all_summary", type=_bool, default=False)
    return p


def save(array: np.ndarray, path: str, fmt: str) -> None:
    if fmt == "NPY":
        np.save(path, array)
    elif fmt == "TXT":
        np.savetxt(path, array.reshape(-1, array.shape[-1]))
    else:
        np.ascontiguousarray(array).tofile(path)


def main(argv: list[str]) -> int:
    record_call("ais_bench", argv)
    logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="[%(levelname)s] %(message)s")
    active = faults()
    args = parser().parse_args(argv)
    if not args.model.endswith(".om"):
        logger.error("model:%s is not an om file", args.model)
        return 1
    if "ais_fail" in active:
        raise RuntimeError("[ERROR] acl.mdl.execute failed ret=507011 (emulated fault)")
    model = EmulatedModel(args.model)
    logger.info("load model %s success", args.model)
    files: list[str] = []
    if args.input:
        for item in args.input.split(","):
            if os.path.isdir(item):
                files += [os.path.join(item, n) for n in sorted(os.listdir(item))]
            else:
                files.append(item)
    now = dt.datetime.now()
    timestr = ais_folder_name(now)
    folder = None
    if args.output:
        folder = os.path.join(args.output, args.output_dirname or timestr)
        os.makedirs(folder, exist_ok=True)
        logger.info("output path:%s", folder)
    dym = args.dymBatch or None
    for _ in range(args.warmup_count):
        if files:
            with open(files[0], "rb") as handle:
                model.run(handle.read(), dym)
    times: list[float] = []
    written: list[str] = []
    ext = {"NPY": "npy", "BIN": "bin", "TXT": "txt"}[args.outfmt]
    for path in files:
        with open(path, "rb") as handle:
            outputs, ms = model.run(handle.read(), dym)
        times.append(ms)
        if folder:
            stem = os.path.basename(path).split(".")[0]
            for index, array in enumerate(outputs):
                target = os.path.join(folder, f"{stem}_{index}.{ext}")
                save(array, target, args.outfmt)
                written.append(target)
    if written and "ais_drop_output" in active:
        os.remove(written[-1])
    if written and "ais_extra_output" in active:
        save(np.zeros((1, 1), np.float32), os.path.join(folder, f"stray_0.{ext}"), args.outfmt)
    batch = args.batchsize or (dym or max(1, model.input["shape"][0]))
    t = np.asarray(times or [0.0])
    stats = {
        "min": float(t.min()),
        "max": float(t.max()),
        "mean": float(t.mean()),
        "median": float(np.median(t)),
        "percentile(99%)": float(np.percentile(t, 99)),
        "count": len(times),
    }
    throughput = 1000.0 * batch / stats["mean"] if stats["mean"] > 0 else 0.0
    logger.info("-----------------Performance Summary------------------")
    logger.info(
        "NPU_compute_time (ms): min = %s, max = %s, mean = %s, median = %s, percentile(99%%) = %s",
        stats["min"],
        stats["max"],
        stats["mean"],
        stats["median"],
        stats["percentile(99%)"],
    )
    logger.info(
        "throughput 1000*batchsize.mean(%s)/NPU_compute_time.mean(%s): %s", batch, stats["mean"], throughput
    )
    logger.info("------------------------------------------------------")
    if args.output and "ais_no_summary" not in active:
        summary = {
            "NPU_compute_time": stats,
            "H2D_latency": {"mean": 0.0},
            "D2H_latency": {"mean": 0.0},
            "throughput": throughput,
            "npu_compute_time_list": times,
            "filesinfo": {str(i): {"infiles": [f], "outfiles": []} for i, f in enumerate(files)},
            "args": sys.argv,
            "pid": os.getpid(),
        }
        with open(os.path.join(args.output, f"{timestr}_summary.json"), "w") as handle:
            json.dump(summary, handle)
    return 0
