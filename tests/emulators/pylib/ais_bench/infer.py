"""The emulated ais_bench inference run: flags, `[LEVEL] msg` logging, output folder and summary.

Files mode as in ais_bench: the input buffer (static batch, or `--dymBatch N` on a dynamic-batch OM,
checked against the OM's sizes) divided by the first file's size gives the files per inference;
the last group is padded with copies of its first file, every output is split along
`--output_batchsize_axis` into `<stem>_<i>` files and the padded ones are dropped. One time per
inference (= per batch) goes into the summary; warm-up runs on the first group and is not timed.
"""

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
    p.add_argument("--output_batchsize_axis", type=int, default=0)
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


class RunError(Exception):
    """ais_bench's own failure: `[ERROR]` lines were logged, the run raises (traceback, exit 1)."""


def model_batch(model: EmulatedModel, dym_batch: int) -> int:
    """Images per inference, validated like aclruntime's CheckDynamicBatchSize."""
    sizes = model.meta.get("dynamic_batch_sizes") or []
    if dym_batch:
        if not sizes:
            logger.error("the dynamic_batch_size parameter is not specified for model conversion")
            raise RunError("set dynamic batch failed")
        if dym_batch not in sizes:
            logger.error("the dymBatch parameter is not correct")
            logger.error(
                "model has dynamic batch size:{%s}, please set correct dynamic batch size",
                "".join(f"[{b}]" for b in sizes),
            )
            raise RunError("set dynamic batch failed")
        return dym_batch
    if sizes:  # the real tool then sizes the buffer for the largest batch and fails at execution
        logger.error("the model has a dynamic batch; pass --dymBatch")
        raise RunError("dynamic batch not set")
    return max(1, int(model.input["shape"][0]))


def groups(files: list[str], tensor_bytes: int) -> list[list[str | None]]:
    """Files per inference (None = padding, fed as the group's first file)."""
    file_bytes = os.path.getsize(files[0])
    if file_bytes == 0 or tensor_bytes % file_bytes:
        logger.error("arg0 tensorsize: %s filesize: %s not match", tensor_bytes, file_bytes)
        raise RunError("input size mismatch")
    per = tensor_bytes // file_bytes
    chunks: list[list[str | None]] = [list(files[i : i + per]) for i in range(0, len(files), per)]
    chunks[-1] += [None] * (per - len(chunks[-1]))
    logger.info(
        "get filesperbatch files0 size:%s tensor0size:%s filesperbatch:%s runcount:%s",
        file_bytes,
        tensor_bytes,
        per,
        len(chunks),
    )
    return chunks


def read_group(group: list[str | None]) -> bytes:
    data = []
    for path in group:
        with open(path or group[0], "rb") as handle:  # type: ignore[arg-type]
            data.append(handle.read())
    return b"".join(data)


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
    batch = model_batch(model, args.dymBatch)
    dym = args.dymBatch or None
    chunks = groups(files, batch * model.image_bytes) if files else []
    for _ in range(args.warmup_count):
        if chunks:
            model.run(read_group(chunks[0]), dym)
    times: list[float] = []
    written: list[str] = []
    ext = {"NPY": "npy", "BIN": "bin", "TXT": "txt"}[args.outfmt]
    for group in chunks:
        outputs, ms = model.run(read_group(group), dym)
        times.append(ms)
        if not folder:
            continue
        axis = args.output_batchsize_axis
        for index, array in enumerate(outputs):
            if axis >= array.ndim or array.shape[axis] % len(group):
                logger.error("save out files error shape:%s files per batch:%s", array.shape, len(group))
                raise RunError("cannot split outputs")
            parts = np.array_split(array, len(group), axis)
            for path, part in zip(group, parts, strict=True):
                if path is None:  # padding: its outputs are not saved
                    continue
                stem = os.path.basename(path).split(".")[0]
                target = os.path.join(folder, f"{stem}_{index}.{ext}")
                save(part, target, args.outfmt)
                written.append(target)
    if written and "ais_drop_output" in active:
        os.remove(written[-1])
    if written and "ais_extra_output" in active:
        save(np.zeros((1, 1), np.float32), os.path.join(folder, f"stray_0.{ext}"), args.outfmt)
    batch = args.batchsize or batch
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
