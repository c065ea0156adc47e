"""ONNX -> Ascend OM with `atc`, cached by content so an unchanged model is never converted twice.

The argument list follows the recipe (`atc --framework=5 --model=... --output=<stem> --input_format=NCHW
--input_shape="input.1:1,3,800,1216" --soc_version=Ascend<chip>`) plus optional precision mode,
dynamic batch, AIPP and output nodes. With AIPP (uint8 inputs) the ONNX input stays NCHW float, so
`--input_format`/`--input_shape` describe the ONNX input, and the AIPP file describes the bytes fed.

Success needs both the line `ATC run success, welcome to the next use.` and a produced `<stem>*.om`
(some CANN versions append `_linux_x86_64`/`_linux_aarch64`). Failures surface atc's `E#####` codes.

Cache: an entry of the project's cache store (`cache_store.CacheEntry`, kind `om`:
`<work_dir>/cache/om/<key>/` holding `model.om`, its `convert.json` and the store's `cache.json`),
keyed by {onnx sha256, every atc argument except paths, AIPP config text, CANN version}. So the OM
cache has what every cache of the project has: built in a temporary directory (atc runs in a folder
of its own inside it, its working files are not kept) and renamed into place only when complete, a
lock so one conversion of a key runs at a time, every file checked (sha256) on reuse with a damaged
entry rebuilt, a read-only cache served, a killed conversion's leftovers (`.build-*`) reclaimed, and
least-recently-used eviction by `gfocal gc` (never an entry a run in use names in `uses/om-<key>`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gfocal_pipeline.backends.aipp import aipp_config
from gfocal_pipeline.backends.cann_env import CannEnv, cann_version, load_cann_env
from gfocal_pipeline.backends.npu_smi import detect_soc_version
from gfocal_pipeline.backends.process import (
    ProcessHandle,
    ProcessResult,
    check_safe_path,
    check_safe_value,
    run_tool,
)
from gfocal_pipeline.cache_store import SHA256, CacheEntry
from gfocal_pipeline.cache_store import cache_key as store_key
from gfocal_pipeline.constants import DEFAULT_INPUT_NAME
from gfocal_pipeline.errors import BackendError
from gfocal_pipeline.fileio import atomic_path, ensure_writable_dir, sha256_file, write_json
from gfocal_pipeline.model_spec import spec_beside
from gfocal_pipeline.options import Dtype, PrecisionMode
from gfocal_pipeline.pixels import PixelFormat, pixels_of

log = logging.getLogger(__name__)

SUCCESS_LINE = "ATC run success, welcome to the next use."
PRECISION_MODES = PrecisionMode.values()
LOG_LEVELS = ("debug", "info", "warning", "error", "null")
INPUT_FORMATS = ("NCHW", "NHWC", "ND")
INPUT_DTYPES = Dtype.values()
CACHE_OM = "model.om"
CACHE_META = "convert.json"
CACHE_FORMAT = 3  # 2: convert.json holds input_shape and dynamic_batch_sizes; 3: a cache-store entry
_SOC = re.compile(r"^Ascend[0-9A-Za-z]+$")
_ERROR_CODE = re.compile(r"\b(E[0-9A-Z]\d{4})\b")
_PATH_OPTIONS = ("--model=", "--output=", "--insert_op_conf=")
# characters atc parses inside its own option values (input_shape, out_nodes, batch lists)
_ATC_SEPARATORS = ",;:"


def onnx_input(onnx_path: Path, input_name: str) -> tuple[tuple[int | None, ...], bool]:
    """(static dims of the ONNX input `input_name` (None for a symbolic dim), whether it is uint8)."""
    import onnx

    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as exc:
        raise BackendError(f"{str(onnx_path)!r} is not a readable ONNX model ({exc})") from exc
    initializers = {init.name for init in model.graph.initializer}
    inputs = {value.name: value for value in model.graph.input if value.name not in initializers}
    if input_name not in inputs:
        raise BackendError(
            f"ONNX model {str(onnx_path)!r} has no input named {input_name!r} (inputs: "
            f"{', '.join(sorted(inputs)) or 'none'}); pass input_name accordingly"
        )
    tensor = inputs[input_name].type.tensor_type
    dims = tuple(
        d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tensor.shape.dim
    )
    return dims, tensor.elem_type == onnx.TensorProto.UINT8


def _check_shape(
    input_shape: Sequence[int], dynamic_batch_sizes: Sequence[int]
) -> tuple[list[int], list[int]]:
    """4 positive dims (batch -1 exactly when dynamic batch sizes are given); distinct positive sizes."""
    shape = [int(d) for d in input_shape]
    if len(shape) != 4 or any(d == 0 or d < -1 for d in shape[1:]) or shape[0] == 0 or shape[0] < -1:
        raise BackendError(f"input_shape {tuple(input_shape)} must be 4 positive dims (batch may be -1)")
    sizes = [int(b) for b in dynamic_batch_sizes]
    if (shape[0] == -1) != bool(sizes):
        raise BackendError(
            "a dynamic batch needs both batch -1 in input_shape and dynamic_batch_sizes (e.g. 1,2,4,8); "
            f"got shape {tuple(shape)} and sizes {sizes}"
        )
    if any(b < 1 for b in sizes) or len(set(sizes)) != len(sizes):
        raise BackendError(f"dynamic_batch_sizes {sizes} must be distinct positive integers")
    return shape, sizes


def build_atc_args(
    onnx_path: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    input_name: str,
    input_shape: Sequence[int],
    soc_version: str,
    input_format: str = "NCHW",
    dynamic_batch_sizes: Sequence[int] = (),
    precision_mode: str | None = "force_fp16",
    log_level: str = "error",
    insert_op_conf: str | os.PathLike[str] | None = None,
    out_nodes: Sequence[str] = (),
) -> list[str]:
    """The atc options (without the program) for one ONNX -> OM conversion; values are validated."""
    check_safe_path(onnx_path, "ONNX model path")
    check_safe_path(output, "atc output path")
    check_safe_value(input_name, "ONNX input name", _ATC_SEPARATORS)
    if not _SOC.match(soc_version):
        raise BackendError(
            f"soc_version {soc_version!r} is not like 'Ascend310P3'; use 'Ascend' + the npu-smi Name column"
        )
    if input_format not in INPUT_FORMATS:
        raise BackendError(f"input_format {input_format!r} is not one of {', '.join(INPUT_FORMATS)}")
    if log_level not in LOG_LEVELS:
        raise BackendError(f"atc log level {log_level!r} is not one of {', '.join(LOG_LEVELS)}")
    if precision_mode is not None and precision_mode not in PRECISION_MODES:
        raise BackendError(f"precision_mode {precision_mode!r} is not one of {', '.join(PRECISION_MODES)}")
    shape, sizes = _check_shape(input_shape, dynamic_batch_sizes)
    args = [
        "--framework=5",
        f"--model={onnx_path}",
        f"--output={output}",
        f"--input_format={input_format}",
        f"--input_shape={input_name}:{','.join(str(d) for d in shape)}",
        f"--soc_version={soc_version}",
        f"--log={log_level}",
    ]
    if precision_mode is not None:
        args.append(f"--precision_mode={precision_mode}")
    if sizes:
        args.append(f"--dynamic_batch_size={','.join(str(b) for b in sizes)}")
    if insert_op_conf is not None:
        check_safe_path(insert_op_conf, "AIPP config path")
        args.append(f"--insert_op_conf={insert_op_conf}")
    if out_nodes:
        for node in out_nodes:
            check_safe_value(node, "output node name", _ATC_SEPARATORS)
        args.append(f"--out_nodes={';'.join(out_nodes)}")
    return args


def om_key_inputs(onnx_sha256: str, args: Sequence[str], cann: str, aipp_text: str | None) -> dict[str, Any]:
    """What determines a conversion's OM (the cache entry's key inputs): same model, options and
    toolkit -> same OM."""
    return {
        "format": CACHE_FORMAT,
        "onnx_sha256": onnx_sha256,
        "options": [a for a in args if not a.startswith(_PATH_OPTIONS)],
        "aipp": aipp_text,
        "cann_version": cann,
    }


def om_cache_entry(cache_dir: Path, key_inputs: dict[str, Any]) -> CacheEntry:
    """The cache-store entry of one conversion: `<cache_dir>/<key>/`, where `cache_dir` is the kind
    folder (`om_cache_dir(work_dir)` = `<work_dir>/cache/om`), every file checked by sha256."""
    return CacheEntry(cache_dir.parent, cache_dir.name, store_key(key_inputs), dict(key_inputs), SHA256)


def atc_failure(result: ProcessResult, onnx_path: Path) -> BackendError:
    """A BackendError quoting atc's error codes (with their text) and the output tail."""
    coded: list[str] = []
    for index, line in enumerate(result.lines):
        if _ERROR_CODE.search(line):
            coded.append(line.strip())
            follow = result.lines[index + 1].strip() if index + 1 < len(result.lines) else ""
            if follow.lower().startswith(("solution", "reason", "possible cause")):
                coded.append(follow)
    codes = sorted(set(_ERROR_CODE.findall("\n".join(coded))))
    summary = "\n  ".join(coded[:12]) if coded else "(atc printed no error code)"
    return BackendError(
        f"atc failed converting {str(onnx_path)!r} (exit {result.returncode}, error codes: "
        f"{', '.join(codes) or 'none'}):\n  {summary}\nLast output:\n{result.tail(20)}"
    )


def _find_om(directory: Path, stem: str) -> Path | None:
    found = sorted(directory.glob(f"{stem}*.om"))
    if len(found) > 1:
        raise BackendError(
            f"atc wrote several OM files for {stem!r} in {str(directory)!r}: {[p.name for p in found]}"
        )
    return found[0] if found else None


def _publish(om: Path, output_dir: Path, name: str) -> Path:
    """Copy the cached OM to `output_dir/name` atomically (hard link when possible)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    target = output_dir / name
    with atomic_path(target) as tmp:
        tmp.unlink()
        try:
            os.link(om, tmp)
        except OSError:
            shutil.copyfile(om, tmp)
    return target


def convert_onnx(
    onnx_path: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str],
    *,
    output_dir: str | os.PathLike[str] | None = None,
    om_name: str | None = None,
    soc_version: str | None = None,
    input_name: str = DEFAULT_INPUT_NAME,
    batch: int | None = None,
    dynamic_batch_sizes: Sequence[int] = (),
    input_dtype: str = "float32",
    precision_mode: str | None = "force_fp16",
    log_level: str = "error",
    out_nodes: Sequence[str] = (),
    set_env: str | os.PathLike[str] | None = None,
    timeout_s: float = 3600.0,
    handle: ProcessHandle | None = None,
) -> dict[str, Any]:
    """Convert `onnx_path` to an OM (or reuse the cached one) and describe the result.

    `input_dtype="uint8"` adds static AIPP (uint8 BGR NHWC in, normalized RGB to the model), unless
    the ONNX input itself is uint8 NHWC (exported with `normalize_in_graph`): then it is fed as is.
    Returns {om_path, om_sha256, soc_version, cann_version, atc_args, cached, convert_seconds,
    cache_key}; `convert_seconds` is the time atc ran in this call (0 when cached). With
    `output_dir` the OM is copied there as `<om_name>.om` beside a `convert.json` describing it (its
    input: `input_shape` in `input_format`, the `input_dtype` fed, `dynamic_batch_sizes`: what the
    msame / ais_bench backends check a run against); without, `om_path` is the cache entry's file.
    """
    onnx_path, cache_dir, output_dir = _check_paths(onnx_path, cache_dir, output_dir, input_dtype)
    tool = _load_tool(set_env, timeout_s, handle)
    soc_version = _soc_version(tool, soc_version)
    spec = spec_beside(onnx_path)  # the model the export recorded beside the graph (None: not recorded)
    pixels = pixels_of(spec.to_dict() if spec is not None else None)  # AIPP's; none recorded: ImageNet RGB
    plan = _plan(onnx_path, input_name, input_dtype, batch, dynamic_batch_sizes, pixels)
    stem = om_name or plan.default_stem
    check_safe_value(stem, "OM name", "/")

    onnx_sha = sha256_file(onnx_path)
    options = _atc_options(
        plan, input_name, soc_version, dynamic_batch_sizes, precision_mode, log_level, out_nodes
    )
    key_args = build_atc_args(onnx_path, "model", **options)  # paths are dropped from the key
    entry = om_cache_entry(cache_dir, om_key_inputs(onnx_sha, key_args, tool.cann, plan.aipp_text))
    meta, seconds, cached = _cached_or_convert(tool, onnx_path, onnx_sha, entry, plan.aipp_text, options)
    om = entry.path / CACHE_OM
    om_path = _publish(om, output_dir, f"{stem}.om") if output_dir is not None else om
    result = _conversion_result(om_path, meta, soc_version, tool.cann, cached, seconds, entry.key)
    if output_dir is not None:
        source = {
            "onnx_path": str(onnx_path),
            "onnx_sha256": onnx_sha,
            "input_dtype": input_dtype,  # what the tool is fed (uint8: AIPP or a uint8 graph)
            "input_format": plan.input_format,  # of input_shape (the ONNX input)
            **_recorded_outputs(onnx_path),  # what msame / ais_bench read back (dets or candidates)
            **({"model": spec.to_dict()} if spec is not None else {}),
        }
        _write_output_meta(output_dir, result, meta, source, plan.aipp_text)
    return result


@dataclass(frozen=True)
class _AtcTool:
    """The atc program with its CANN environment and version, and the bounds of one run of it."""

    atc: str
    env: CannEnv
    cann: str
    timeout_s: float
    handle: ProcessHandle | None


def _load_tool(
    set_env: str | os.PathLike[str] | None, timeout_s: float, handle: ProcessHandle | None
) -> _AtcTool:
    """The CANN environment from `set_env`, its atc program and CANN version."""
    env = load_cann_env(set_env)
    atc = env.require_tool("atc")
    return _AtcTool(atc, env, cann_version(env), timeout_s, handle)


def _soc_version(tool: _AtcTool, soc_version: str | None) -> str:
    """`soc_version` as given, or detected with npu-smi when None."""
    if soc_version is None:
        soc_version = detect_soc_version(tool.env, handle=tool.handle)
        log.info("detected soc_version %s from npu-smi", soc_version)
    return soc_version


def _atc_options(
    plan: _Plan,
    input_name: str,
    soc_version: str,
    dynamic_batch_sizes: Sequence[int],
    precision_mode: str | None,
    log_level: str,
    out_nodes: Sequence[str],
) -> dict[str, Any]:
    """The keyword arguments of `build_atc_args` besides the paths and the AIPP config."""
    return dict(
        input_name=input_name,
        input_shape=plan.input_shape,
        input_format=plan.input_format,
        soc_version=soc_version,
        dynamic_batch_sizes=dynamic_batch_sizes,
        precision_mode=precision_mode,
        log_level=log_level,
        out_nodes=out_nodes,
    )


def _cached_or_convert(
    tool: _AtcTool,
    onnx_path: Path,
    onnx_sha: str,
    entry: CacheEntry,
    aipp_text: str | None,
    options: dict[str, Any],
) -> tuple[dict[str, Any], float, bool]:
    """(the entry's convert.json, seconds atc ran in this call, whether it was cached); converts on a
    miss. A valid entry is reused from a read-only cache too; only a conversion needs it writable."""
    record, cached = entry.record(), True  # every file checked (sha256); a damaged entry set aside
    if record is not None:
        entry.touch()
    else:  # a conversion (or a concurrent one's result): the cache must be writable
        ensure_writable_dir(entry.path.parent, "OM cache directory")
        record, cached = entry.get_or_build(
            lambda work: _convert(tool, onnx_path, onnx_sha, work, aipp_text, options)
        )
    meta = record.get("info") or {}
    if cached:
        log.info("OM for %s found in cache %s; atc not run", onnx_path.name, entry.path)
        return meta, 0.0, True
    return meta, float(meta.get("convert_seconds", 0.0)), False


def _conversion_result(
    om_path: Path,
    meta: dict[str, Any],
    soc_version: str,
    cann: str,
    cached: bool,
    seconds: float,
    key: str,
) -> dict[str, Any]:
    """The dict `convert_onnx` returns."""
    return {
        "om_path": str(om_path),
        "om_sha256": meta["om_sha256"],
        "soc_version": soc_version,
        "cann_version": cann,
        "atc_args": meta["atc_args"],
        "cached": cached,
        "convert_seconds": round(seconds, 3),
        "cache_key": key,
    }


def _recorded_outputs(onnx_path: Path) -> dict[str, list[str]]:
    """{"output_names": [...]} as the export recorded them beside the graph (`.export.json`), or {}."""
    try:
        names = json.loads(onnx_path.with_suffix(".export.json").read_text(encoding="utf-8"))["output_names"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    ok = isinstance(names, list) and all(isinstance(name, str) for name in names)
    return {"output_names": names} if ok else {}


def _write_output_meta(
    output_dir: Path,
    result: dict[str, Any],
    meta: dict[str, Any],
    source: dict[str, Any],
    aipp_text: str | None,
) -> None:
    """Write `output_dir/convert.json`: the result, the ONNX source, the input shapes and AIPP config."""
    shapes = {key: meta[key] for key in ("input_shape", "dynamic_batch_sizes")}
    write_json(output_dir / CACHE_META, {**result, **source, **shapes, "aipp_config": aipp_text})


def _check_paths(
    onnx_path: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str],
    output_dir: str | os.PathLike[str] | None,
    input_dtype: str,
) -> tuple[Path, Path, Path | None]:
    """The conversion's paths checked (safe, the ONNX file exists) and the input dtype known."""
    onnx = check_safe_path(onnx_path, "ONNX model path")
    cache = check_safe_path(cache_dir, "OM cache directory")
    output = None if output_dir is None else check_safe_path(output_dir, "OM output directory")
    if not onnx.is_file():
        raise BackendError(f"ONNX model {str(onnx)!r} does not exist; run the export step first")
    if input_dtype not in INPUT_DTYPES:
        raise BackendError(f"input_dtype {input_dtype!r} is not one of {', '.join(INPUT_DTYPES)}")
    return onnx, cache, output


@dataclass(frozen=True)
class _Plan:
    """How an ONNX input is described to atc: shape, format, the AIPP config (uint8 inputs) and name."""

    input_shape: tuple[int, ...]
    input_format: str
    aipp_text: str | None
    default_stem: str


def _plan(
    onnx_path: Path,
    input_name: str,
    input_dtype: str,
    batch: int | None,
    dynamic_batch_sizes: Sequence[int],
    pixels: PixelFormat,
) -> _Plan:
    dims, uint8_graph = onnx_input(onnx_path, input_name)
    if len(dims) != 4 or any(d is None for d in dims[1:]):
        raise BackendError(
            f"ONNX input {input_name!r} of {str(onnx_path)!r} has shape {dims}; atc needs 4 dims with "
            "static C,H,W (or H,W,C) - re-export with a fixed input size"
        )
    if uint8_graph and input_dtype != "uint8":
        raise BackendError(
            f"ONNX input {input_name!r} of {str(onnx_path)!r} is uint8 (normalized in the graph); convert it "
            "with input_dtype='uint8' and feed uint8 inputs"
        )
    if dynamic_batch_sizes:
        shape_batch = -1
    elif batch is not None:
        shape_batch = int(batch)
    else:
        shape_batch = dims[0] if dims[0] is not None else 1
    if dims[0] is not None and shape_batch not in (-1, dims[0]):
        raise BackendError(
            f"batch {shape_batch} differs from the ONNX model's static batch {dims[0]}; re-export with "
            "dynamic_batch=True or use the model's batch"
        )
    input_shape = (shape_batch, *dims[1:])
    stem = f"gfocal_bs{shape_batch}" if shape_batch > 0 else "gfocal_dynbatch"
    if uint8_graph:  # NHWC uint8 BGR straight into the graph, which normalizes itself: no AIPP
        return _Plan(input_shape, "NHWC", None, stem)
    # float NCHW graph; uint8 inputs get static AIPP in front of it
    _, _, height, width = input_shape
    aipp = aipp_config(width, height, pixels) if input_dtype == "uint8" else None
    return _Plan(input_shape, "NCHW", aipp, stem)


def _convert(
    tool: _AtcTool,
    onnx_path: Path,
    onnx_sha: str,
    work: Path,
    aipp_text: str | None,
    options: dict[str, Any],
) -> dict[str, Any]:
    """Run atc for a new cache entry built in `work` (`model.om` + `convert.json`); returns the
    metadata, which the store also records as the entry's info."""
    args, seconds, written_name = _run_atc(tool, onnx_path, work, aipp_text, options)
    meta = {
        "om_sha256": sha256_file(work / CACHE_OM),
        "om_file_written_by_atc": written_name,
        "onnx_sha256": onnx_sha,
        "onnx_path": str(onnx_path),
        "atc_args": args,
        "input_shape": [int(d) for d in options["input_shape"]],
        "dynamic_batch_sizes": [int(b) for b in options["dynamic_batch_sizes"]],
        "soc_version": options["soc_version"],
        "cann_version": tool.cann,
        "convert_seconds": round(seconds, 3),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_json(work / CACHE_META, meta)
    return meta


def _run_atc(
    tool: _AtcTool, onnx_path: Path, work: Path, aipp_text: str | None, options: dict[str, Any]
) -> tuple[list[str], float, str]:
    """Run atc in `work/atc/` (its working files stay there and are removed), leaving the OM as
    `work/model.om`. Returns (the atc arguments, seconds atc ran, the name of the OM file atc wrote)."""
    scratch = work / "atc"
    scratch.mkdir()
    conf = None
    if aipp_text is not None:
        conf = scratch / "aipp.cfg"
        conf.write_text(aipp_text)
    stem = "model"
    args = build_atc_args(onnx_path.resolve(), scratch / stem, insert_op_conf=conf, **options)
    start = time.monotonic()
    result = run_tool(
        [tool.atc, *args],
        env=tool.env.environ(),
        name="atc",
        timeout_s=tool.timeout_s,
        cwd=scratch,
        handle=tool.handle,
    )
    seconds = time.monotonic() - start
    if result.returncode != 0 or not any(SUCCESS_LINE in line for line in result.lines):
        raise atc_failure(result, onnx_path)
    produced = _find_om(scratch, stem)
    if produced is None:
        raise BackendError(
            f"atc reported success but wrote no {stem}*.om in {str(scratch)!r} for {str(onnx_path)!r}; "
            f"check free disk space and the atc log. Last output:\n{result.tail(10)}"
        )
    produced.rename(work / CACHE_OM)
    shutil.rmtree(scratch, ignore_errors=True)
    return args, seconds, produced.name
