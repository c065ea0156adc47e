"""Emulated `msame`: getopt-style flags, msame's log lines, exit codes and output layout."""

from __future__ import annotations

import datetime as dt
import os
import sys
import time

import numpy as np

from gfocal_emulator.common import MSAME_VERSION_VARIABLE, faults, msame_folder_name, record_call
from gfocal_emulator.model import EmulatedModel
from gfocal_emulator.om import OmError

FLAGS = {
    "model",
    "input",
    "output",
    "outfmt",
    "loop",
    "debug",
    "profiler",
    "dump",
    "device",
    "dymBatch",
    "dymHW",
    "dymDims",
    "dymShape",
    "outputSize",
    "help",
}
USAGE = """usage:./msame --model <om> --input <bin|dir|a.bin,b.bin> --output <dir> [--outfmt TXT|BIN]
         [--loop 1..100] [--debug true|false] [--profiler true|false] [--dump true|false]
         [--device 0..255] [--dymBatch n] [--dymHW h,w] [--dymDims ...] [--dymShape ...]
         [--outputSize a,b]"""


def info(text: str) -> None:
    print(f"[INFO] {text}", flush=True)


def error(text: str) -> None:
    print(f"[ERROR] {text}", flush=True)


def parse(argv: list[str]) -> dict[str, str] | None:
    options: dict[str, str] = {}
    items = iter(argv)
    for item in items:
        if not item.startswith("--"):
            return None
        name, eq, value = item[2:].partition("=")
        if name not in FLAGS or name == "help":
            return None
        if not eq:
            value = next(items, None)
            if value is None:
                return None
        options[name] = value
    return options


def format_txt(array: np.ndarray) -> str:
    """Default iostream formatting (6 significant digits), one line per last-dimension row."""
    rows = array.reshape(-1, array.shape[-1]) if array.ndim else array.reshape(1, 1)
    if np.issubdtype(rows.dtype, np.integer):
        return "".join(" ".join(str(int(v)) for v in row) + " \n" for row in rows)
    return "".join(" ".join(f"{float(v):g}" for v in row) + " \n" for row in rows)


def write_outputs(folder: str, stem: str, outputs: list[np.ndarray], txt: bool) -> list[str]:
    written = []
    for index, array in enumerate(outputs):
        path = os.path.join(folder, f"{stem}_output_{index}.{'txt' if txt else 'bin'}")
        if txt:
            with open(path, "w") as handle:
                handle.write(format_txt(array))
        else:
            np.ascontiguousarray(array).tofile(path)
        written.append(path)
    return written


def main(argv: list[str]) -> int:
    record_call("msame", argv)
    active = faults()
    options = parse(argv)
    if options is None or "model" not in options:
        print(USAGE, flush=True)
        return 0  # msame prints its help and exits 0 on unknown or missing flags
    model_path = options["model"]
    if ".om" not in model_path or "msame_not_om" in active:
        error("input model file type is not .om , please check your model type!")
        return 0
    try:
        device = int(options.get("device", "0"))
    except ValueError:
        device = -1
    if not 0 <= device <= 255:
        error(f"device id {options.get('device')} is out of range [0, 255]")
        return 0
    version = os.environ.get(MSAME_VERSION_VARIABLE, "2022")
    info("acl init success")
    info(f"open device {device} success")
    info("create context success")
    info("create stream success")
    info("get run mode success")
    if "msame_hang" in active:
        time.sleep(600)
    try:
        model = EmulatedModel(model_path)
    except (OmError, OSError) as exc:
        error(f"load model from file failed, model file is {model_path}: {exc}")
        error("Sample process failed")
        return 1
    info(f"load model {model_path} success")
    info("create model description success")
    info("create model output success")
    output_root = options.get("output", "./")
    os.makedirs(output_root, exist_ok=True)
    folder = os.path.join(output_root, msame_folder_name(dt.datetime.now(), version))
    os.makedirs(folder, exist_ok=True)
    print(folder, flush=True)
    txt = options.get("outfmt", "BIN") == "TXT"
    dym = int(options["dymBatch"]) if options.get("dymBatch") else None
    given = options.get("input")
    if given and os.path.isdir(given):
        files = [os.path.join(given, name) for name in sorted(os.listdir(given))]
        stems = [os.path.basename(f).split(".")[0] for f in files]
    elif given:
        files = given.split(",")
        stems = [os.path.basename(model_path).rsplit(".om", 1)[0]]
    else:
        files, stems = [], [os.path.basename(model_path).rsplit(".om", 1)[0]]
    if not files:
        error("no input file found")
        error("Sample process failed")
        return 1
    if "msame_fail" in active:
        error("execute model failed, modelId is 1")
        error("Sample process failed")
        return 1
    times: list[float] = []
    written: list[str] = []
    for path, stem in zip(files, stems, strict=False):
        info(f"start to process file:{path}")
        try:
            with open(path, "rb") as handle:
                raw = handle.read()
            outputs, ms = model.run(raw, dym)
        except (OSError, OmError) as exc:
            error(f"{exc}")
            error("Sample process failed")
            return 1
        info("model execute success")
        print(f"Inference time: {ms:.3f}ms", flush=True)
        info("get max dynamic batch size success")
        written += write_outputs(folder, stem, outputs, txt)
        info("output data success")
        times.append(ms)
    if "msame_drop_output" in active:
        os.remove(written[-1])
    if "msame_extra_output" in active:
        extra = written[-1].replace("_output_1.", "_output_2.")
        with open(extra, "w") as handle:
            handle.write("0 \n")
    if "msame_garbage_timing" in active:
        print("Inference average time : -nan(ind) ms", flush=True)
    else:
        print(f"Inference average time : {np.mean(times):.2f} ms", flush=True)
    if len(times) > 1:
        print(f"Inference average time without first time: {np.mean(times[1:]):.2f} ms", flush=True)
    info("destroy model input success")
    info("unload model success, model Id is 1")
    if "msame_exit0_no_success" not in active:
        info("Execute sample success" if version == "2021" else f"pid: {os.getpid()} Execute sample success")
    info("end to destroy stream")
    info("end to destroy context")
    info(f"end to reset device is {device}")
    info("end to finalize acl")
    sys.stdout.flush()
    return 0
