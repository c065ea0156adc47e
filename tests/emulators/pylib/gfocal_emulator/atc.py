"""Emulated `atc` (ONNX only): validates the options like ATC, writes an emulated `.om`."""

from __future__ import annotations

import json
import os
import sys
import time

import onnx

from gfocal_emulator import aipp
from gfocal_emulator.common import faults, record_call
from gfocal_emulator.om import OmError, split_at_nms, write_om

START = "ATC start working now, please wait for a moment."
SUCCESS = "ATC run success, welcome to the next use."
FAILED = "ATC run failed, Please check the detail log, Try 'atc --help' for more information"
SOCS = {
    "Ascend310",
    "Ascend310B1",
    "Ascend310P1",
    "Ascend310P3",
    "Ascend910A",
    "Ascend910B",
    "Ascend910B1",
    "Ascend910B2",
    "Ascend910B3",
    "Ascend910B4",
    "Ascend910ProB",
}
PRECISION = {
    "force_fp16",
    "allow_fp32_to_fp16",
    "must_keep_origin_dtype",
    "allow_mix_precision",
    "force_fp32",
    "cube_fp16in_fp32out",
    "allow_mix_precision_fp16",
    "allow_mix_precision_bf16",
}
KNOWN = {
    "framework",
    "model",
    "output",
    "input_format",
    "input_shape",
    "soc_version",
    "log",
    "precision_mode",
    "insert_op_conf",
    "dynamic_batch_size",
    "out_nodes",
    "mode",
    "output_type",
}


class AtcError(Exception):
    def __init__(self, code: str, text: str, solution: str = "Try again with a valid argument.") -> None:
        super().__init__(text)
        self.code, self.text, self.solution = code, text, solution


def invalid(value: str, parameter: str, reason: str) -> AtcError:
    return AtcError("E10001", f"Value [{value}] for parameter [{parameter}] is invalid. Reason: {reason}")


def parse_args(argv: list[str]) -> dict[str, str]:
    options: dict[str, str] = {}
    items = iter(argv)
    for item in items:
        if not item.startswith("--"):
            raise invalid(item, "argv", "options must look like --name=value")
        name, eq, value = item[2:].partition("=")
        if not eq:
            value = next(items, "")
        if name not in KNOWN:
            raise AtcError("E10016", f"Input parameter [--{name}] is not supported by this atc.")
        options[name] = value
    return options


def convert(options: dict[str, str]) -> str:
    if options.get("mode", "0") != "0":
        raise invalid(options["mode"], "--mode", "only mode 0 (build an om) is emulated")
    if options.get("framework") != "5":
        raise invalid(options.get("framework", ""), "--framework", "the emulator converts ONNX (5) only")
    for required in ("model", "output", "soc_version"):
        if not options.get(required):
            raise AtcError("E10004", f"Argument [--{required}] is required.")
    if options["soc_version"] not in SOCS:
        raise invalid(options["soc_version"], "--soc_version", "the soc_version is not supported")
    if not os.path.isfile(options["model"]):
        raise invalid(options["model"], "--model", "the model file does not exist")
    precision = options.get("precision_mode", "force_fp16")
    if precision not in PRECISION:
        raise invalid(precision, "--precision_mode", "unknown precision mode")
    try:
        model = onnx.load(options["model"])
    except Exception as exc:
        raise AtcError("E19999", f"Inner Error! parse onnx model failed: {exc}") from exc
    initializers = {init.name for init in model.graph.initializer}
    inputs = {v.name: v for v in model.graph.input if v.name not in initializers}
    if len(inputs) != 1:
        raise invalid(",".join(inputs), "Inputs", "the emulator supports single-input models")
    ((name, value),) = inputs.items()
    dims = [
        d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1
        for d in value.type.tensor_type.shape.dim
    ]
    shape_text = options.get("input_shape")
    if not shape_text:
        if -1 in dims:
            raise invalid("-1", "Inputs", "maybe you should set input_shape to specify its shape")
        shape = dims
    else:
        given_name, colon, dims_text = shape_text.rpartition(":")
        if not colon or ";" in shape_text:
            raise invalid(shape_text, "--input_shape", "expected name:n,c,h,w for the single input")
        if given_name != name:
            raise invalid(given_name, "--input_shape", f"the model has no input named {given_name}")
        try:
            shape = [int(d) for d in dims_text.split(",")]
        except ValueError:
            raise invalid(shape_text, "--input_shape", "dims must be integers") from None
        if len(shape) != len(dims) or any(s != d for s, d in zip(shape, dims, strict=True) if d != -1):
            raise invalid(shape_text, "--input_shape", f"does not match the model input {dims}")
    batch_sizes: list[int] = []
    if options.get("dynamic_batch_size"):
        batch_sizes = [int(b) for b in options["dynamic_batch_size"].split(",")]
        if shape[0] != -1:
            raise invalid(
                options["dynamic_batch_size"], "--dynamic_batch_size", "needs batch -1 in input_shape"
            )
    if any(d < 1 for d in shape[1:]) or (shape[0] == -1 and not batch_sizes) or shape[0] == 0:
        raise invalid("-1", "Inputs", "maybe you should set input_shape to specify its shape")
    elem = value.type.tensor_type.elem_type
    dtypes = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.UINT8: "uint8"}
    if elem not in dtypes:
        raise invalid(name, "Inputs", "the emulator supports float32 or uint8 model inputs")
    dtype = dtypes[elem]
    fmt = options.get("input_format", "NCHW")
    if fmt not in ("NCHW", "NHWC", "ND"):
        raise invalid(fmt, "--input_format", "must be NCHW, NHWC or ND")
    aipp_cfg = None
    if options.get("insert_op_conf"):
        try:
            with open(options["insert_op_conf"]) as handle:
                aipp_cfg = aipp.parse(handle.read())
            if dtype != "float32":
                raise aipp.AippError("AIPP needs a float model input")
            aipp.check(aipp_cfg, shape[2], shape[3])
        except (OSError, aipp.AippError) as exc:
            raise AtcError(
                "E10001",
                f"Value [{options['insert_op_conf']}] for parameter [--insert_op_conf] "
                f"is invalid. Reason: {exc}",
            ) from exc
    try:
        pre, post, links = split_at_nms(model)
    except OmError as exc:
        raise AtcError("E19999", f"Inner Error! {exc}") from exc
    outputs = [v.name for v in model.graph.output]
    if options.get("out_nodes"):
        wanted = options["out_nodes"].split(";")
        missing = [w for w in wanted if w not in outputs]
        if missing:
            raise invalid(options["out_nodes"], "--out_nodes", f"unknown output(s) {missing}")
        outputs = wanted
    meta = {
        "soc_version": options["soc_version"],
        "framework": 5,
        "precision_mode": precision,
        "input": {"name": name, "shape": shape, "format": fmt, "aipp": aipp_cfg, "dtype": dtype},
        "dynamic_batch_sizes": batch_sizes,
        "outputs": outputs,
        "nms": links or None,
        "atc_options": options,
        "created": time.time(),
    }
    parts = {"pre.onnx": pre, "post.onnx": post} if post is not None else {"model.onnx": pre}
    suffix = "_linux_x86_64" if "atc_arch_suffix" in faults() else ""
    target = f"{options['output']}{suffix}.om"
    write_om(target, meta, parts)
    return target


def main(argv: list[str]) -> int:
    record_call("atc", argv)
    active = faults()
    print(START, flush=True)
    if "atc_hang" in active:
        time.sleep(600)
    try:
        if "atc_e10001" in active:
            raise invalid("-1", "Inputs", "maybe you should set input_shape to specify its shape")
        if "atc_e19999" in active:
            raise AtcError("E19999", "Inner Error!", "Contact technical support.")
        options = parse_args(argv)
        if "atc_no_om" in active:
            print(SUCCESS, flush=True)
            return 0
        convert(options)
    except AtcError as exc:
        print(FAILED, flush=True)
        print(f"{exc.code}: {exc.text}", flush=True)
        print(f"        Solution: {exc.solution}", flush=True)
        return 1
    with open("fusion_result.json", "w") as handle:  # real atc leaves this in its working directory
        json.dump({"session_and_graph_id": "0_0", "graph_fusion": {}}, handle)
    print(
        "W11001: Op [BatchMultiClassNMS] does not hit the high-priority operator information library, "
        "which might result in compromised performance.",
        file=sys.stderr,
        flush=True,
    )
    print(SUCCESS, flush=True)
    return 0
