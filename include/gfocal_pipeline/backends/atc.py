"""ONNX -> Ascend OM with `atc`, cached by content so an unchanged model is never converted twice.

The argument list follows the recipe (`atc --framework=5 --model=... --output=<stem> --input_format=NCHW
--input_shape="input.1:1,3,800,1216" --soc_version=Ascend<chip>`) plus optional precision mode,
dynamic batch, AIPP and output nodes. With AIPP (uint8 inputs) the ONNX input stays NCHW float, so
`--input_format`/`--input_shape` describe the ONNX input, and the AIPP file describes the bytes fed.

Success needs both the line `ATC run success, welcome to the next use.` and a produced `<stem>*.om`
(some CANN versions append `_linux_x86_64`/`_linux_aarch64`). Failures surface atc's `E#####` codes.

Cache: key = sha256 of {onnx sha256, every atc argument except paths, AIPP config text, CANN
version}. A conversion runs in a temporary directory inside the cache (atc's working files land
there too) which is renamed to `<cache>/<key>/` only when complete, so an entry is whole or absent.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Sequence
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
from gfocal_pipeline.constants import DEFAULT_INPUT_NAME
from gfocal_pipeline.errors import BackendError
from gfocal_pipeline.fileio import atomic_path, ensure_writable_dir, sha256_file, write_json

log = logging.getLogger(__name__)

SUCCESS_LINE = "ATC run success, welcome to the next use."
PRECISION_MODES = (
    "force_fp16",
    "allow_fp32_to_fp16",
    "must_keep_origin_dtype",
    "allow_mix_precision",
    "force_fp32",
    "cube_fp16in_fp32out",
    "allow_mix_precision_fp16",
    "allow_mix_precision_bf16",
)
LOG_LEVELS = ("debug", "info", "warning", "error", "null")
INPUT_FORMATS = ("NCHW", "NHWC", "ND")
INPUT_DTYPES = ("float32", "uint8")
CACHE_OM = "model.om"
CACHE_META = "convert.json"
CACHE_FORMAT = 1
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


def cache_key(onnx_sha256: str, args: Sequence[str], cann: str, aipp_text: str | None) -> str:
    """Content key of a conversion: same model, options and toolkit -> same OM."""
    options = [a for a in args if not a.startswith(_PATH_OPTIONS)]
    payload = {
        "format": CACHE_FORMAT,
        "onnx_sha256": onnx_sha256,
        "options": options,
        "aipp": aipp_text,
        "cann_version": cann,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


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


def _load_entry(entry: Path) -> dict[str, Any] | None:
    """A cache entry's metadata when its OM is intact, else None (the entry is removed)."""
    meta_file, om = entry / CACHE_META, entry / CACHE_OM
    if not entry.exists():
        return None
    if not (meta_file.is_file() and om.is_file()):
        log.warning("OM cache entry %s is incomplete; converting again", entry)
        shutil.rmtree(entry, ignore_errors=True)
        return None
    try:
        meta = json.loads(meta_file.read_text())
        if meta.get("om_sha256") == sha256_file(om):
            return meta
    except (OSError, ValueError):
        pass
    log.warning("OM cache entry %s is damaged; converting again", entry)
    shutil.rmtree(entry, ignore_errors=True)
    return None


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
    `output_dir` the OM is copied there as `<om_name>.om` beside a `convert.json` describing it;
    without, `om_path` is the cache entry's file.
    """
    onnx_path = check_safe_path(onnx_path, "ONNX model path")
    cache_dir = check_safe_path(cache_dir, "OM cache directory")
    if output_dir is not None:
        output_dir = check_safe_path(output_dir, "OM output directory")
    if not onnx_path.is_file():
        raise BackendError(f"ONNX model {str(onnx_path)!r} does not exist; run the export step first")
    if input_dtype not in INPUT_DTYPES:
        raise BackendError(f"input_dtype {input_dtype!r} is not one of {', '.join(INPUT_DTYPES)}")
    env = load_cann_env(set_env)
    atc = env.require_tool("atc")
    cann = cann_version(env)
    if soc_version is None:
        soc_version = detect_soc_version(env, handle=handle)
        log.info("detected soc_version %s from npu-smi", soc_version)

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
    if uint8_graph:  # NHWC uint8 BGR straight into the graph, which normalizes itself: no AIPP
        input_format, aipp_text = "NHWC", None
    else:  # float NCHW graph; uint8 inputs get static AIPP in front of it
        _, _, height, width = input_shape
        input_format = "NCHW"
        aipp_text = aipp_config(width, height) if input_dtype == "uint8" else None
    stem = om_name or (f"gfocal_bs{shape_batch}" if shape_batch > 0 else "gfocal_dynbatch")
    check_safe_value(stem, "OM name", "/")

    onnx_sha = sha256_file(onnx_path)
    cache_dir = ensure_writable_dir(cache_dir, "OM cache directory")
    options = dict(
        input_name=input_name,
        input_shape=input_shape,
        input_format=input_format,
        soc_version=soc_version,
        dynamic_batch_sizes=dynamic_batch_sizes,
        precision_mode=precision_mode,
        log_level=log_level,
        out_nodes=out_nodes,
    )
    key_args = build_atc_args(onnx_path, "model", **options)  # paths are dropped from the key
    key = cache_key(onnx_sha, key_args, cann, aipp_text)
    entry = cache_dir / key
    meta = _load_entry(entry)
    cached = meta is not None
    seconds = 0.0
    if meta is None:
        meta, seconds = _convert(
            atc, env, onnx_path, onnx_sha, entry, aipp_text, options, cann, timeout_s, handle
        )
    else:
        log.info("OM for %s found in cache %s (key %s); atc not run", onnx_path.name, entry, key[:12])
    om = entry / CACHE_OM
    om_path = _publish(om, output_dir, f"{stem}.om") if output_dir is not None else om
    result = {
        "om_path": str(om_path),
        "om_sha256": meta["om_sha256"],
        "soc_version": soc_version,
        "cann_version": cann,
        "atc_args": meta["atc_args"],
        "cached": cached,
        "convert_seconds": round(seconds, 3),
        "cache_key": key,
    }
    if output_dir is not None:
        write_json(
            output_dir / "convert.json",
            {
                **result,
                "onnx_path": str(onnx_path),
                "onnx_sha256": onnx_sha,
                "input_dtype": input_dtype,
                "aipp_config": aipp_text,
            },
        )
    return result


def _convert(
    atc: str,
    env: CannEnv,
    onnx_path: Path,
    onnx_sha: str,
    entry: Path,
    aipp_text: str | None,
    options: dict[str, Any],
    cann: str,
    timeout_s: float,
    handle: ProcessHandle | None,
) -> tuple[dict[str, Any], float]:
    work = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".tmp-{entry.name[:12]}-"))
    try:
        conf = None
        if aipp_text is not None:
            conf = work / "aipp.cfg"
            conf.write_text(aipp_text)
        stem = "model"
        args = build_atc_args(onnx_path.resolve(), work / stem, insert_op_conf=conf, **options)
        start = time.monotonic()
        result = run_tool(
            [atc, *args], env=env.environ(), name="atc", timeout_s=timeout_s, cwd=work, handle=handle
        )
        seconds = time.monotonic() - start
        if result.returncode != 0 or not any(SUCCESS_LINE in line for line in result.lines):
            raise atc_failure(result, onnx_path)
        produced = _find_om(work, stem)
        if produced is None:
            raise BackendError(
                f"atc reported success but wrote no {stem}*.om in {str(work)!r} for {str(onnx_path)!r}; "
                f"check free disk space and the atc log. Last output:\n{result.tail(10)}"
            )
        final_om = work / CACHE_OM
        if produced != final_om:
            produced.rename(final_om)
        meta = {
            "om_sha256": sha256_file(final_om),
            "om_file_written_by_atc": produced.name,
            "onnx_sha256": onnx_sha,
            "onnx_path": str(onnx_path),
            "atc_args": args,
            "soc_version": options["soc_version"],
            "cann_version": cann,
            "convert_seconds": round(seconds, 3),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        write_json(work / CACHE_META, meta)
        try:
            work.rename(entry)
        except OSError:
            if _load_entry(entry) is None:  # not a concurrent twin that finished first
                raise
            log.info("another conversion filled cache entry %s first; using it", entry)
            return json.loads((entry / CACHE_META).read_text()), seconds
        return meta, seconds
    finally:
        with contextlib.suppress(FileNotFoundError):
            if work.exists():
                shutil.rmtree(work, ignore_errors=True)
