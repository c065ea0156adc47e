"""Ascend operators: ONNX -> OM with atc, and one shard of NPU inference with msame or ais_bench.

Thin on purpose: they coerce and validate the (possibly templated) arguments, call
`gfocal_pipeline.backends`, and return small XCom dicts. Killing the task (`on_kill`) stops the
running tool's whole process group.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseOperator

from gfocal_pipeline.backends.ais_bench import AisBenchBackend
from gfocal_pipeline.backends.atc import INPUT_DTYPES, LOG_LEVELS, PRECISION_MODES, convert_onnx
from gfocal_pipeline.backends.msame import MsameBackend, check_device
from gfocal_pipeline.backends.process import ProcessHandle, check_safe_path
from gfocal_pipeline.constants import DEFAULT_INPUT_NAME
from gfocal_pipeline.errors import BackendError
from gfocal_pipeline.layout import RunLayout
from gfocal_pipeline.manifest import load_manifest
from operators.params import as_bool, as_int

TOOLS = {"msame": MsameBackend, "ais_bench": AisBenchBackend}


def _literal(value: Any) -> bool:
    """True when `value` is final at DAG-parse time (not a Jinja template rendered later)."""
    return value is not None and not (isinstance(value, str) and "{{" in value)


def _optional(value: Any) -> Any:
    return None if value in (None, "", "None", "none") else value


def _batch_sizes(value: Any) -> tuple[int, ...]:
    """`"1,2,4,8"`, `[1, 2, 4, 8]` or empty -> a tuple of ints."""
    if _optional(value) is None:
        return ()
    items = value.split(",") if isinstance(value, str) else list(value)
    return tuple(as_int("dynamic_batch_sizes", item) for item in items if str(item).strip())


class _KillableMixin:
    """Holds the running tool's handle so `on_kill` can stop it (created per execution)."""

    _handle: ProcessHandle | None = None

    def _new_handle(self) -> ProcessHandle:
        self._handle = ProcessHandle()
        return self._handle

    def on_kill(self) -> None:
        if self._handle is not None:
            self._handle.kill()


class AtcConvertOperator(_KillableMixin, BaseOperator):
    """Convert the Ascend ONNX graph to an OM with atc (cached by content).

    XCom: `om_path`, `om_sha256`, `soc_version`, `cann_version`, `atc_args`, `cached`,
    `convert_seconds`, `cache_key`. `soc_version=None` detects it with `npu-smi info`;
    `input_dtype="uint8"` adds static AIPP (normalization on the NPU).
    """

    template_fields: Sequence[str] = (
        "onnx_path",
        "cache_dir",
        "output_dir",
        "om_name",
        "soc_version",
        "batch",
        "dynamic_batch_sizes",
        "input_dtype",
        "precision_mode",
        "log_level",
        "set_env",
    )
    ui_color = "#fde2c8"

    def __init__(
        self,
        *,
        onnx_path: str,
        cache_dir: str,
        output_dir: str | None = None,
        om_name: str | None = None,
        soc_version: str | None = None,
        input_name: str = DEFAULT_INPUT_NAME,
        batch: int | str | None = None,
        dynamic_batch_sizes: str | Sequence[int] | None = None,
        input_dtype: str = "float32",
        precision_mode: str | None = "force_fp16",
        log_level: str = "error",
        set_env: str | None = None,
        timeout_s: float = 3600.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.onnx_path, self.cache_dir, self.output_dir, self.om_name = (
            onnx_path,
            cache_dir,
            output_dir,
            om_name,
        )
        self.soc_version, self.input_name, self.batch = soc_version, input_name, batch
        self.dynamic_batch_sizes, self.input_dtype = dynamic_batch_sizes, input_dtype
        self.precision_mode, self.log_level, self.set_env = precision_mode, log_level, set_env
        self.timeout_s = timeout_s
        self._validate(parse_time=True)

    def _validate(self, parse_time: bool) -> None:
        for name in ("onnx_path", "cache_dir", "output_dir", "set_env", "om_name", "soc_version"):
            value = _optional(getattr(self, name))
            if value is not None and (not parse_time or _literal(value)):
                check_safe_path(value, name)
        checks = (
            ("input_dtype", INPUT_DTYPES),
            ("log_level", LOG_LEVELS),
            ("precision_mode", PRECISION_MODES),
        )
        for name, allowed in checks:
            value = _optional(getattr(self, name))
            if value is not None and (not parse_time or _literal(value)) and value not in allowed:
                raise BackendError(f"{name} {value!r} is not one of {', '.join(allowed)}")

    def execute(self, context: Any) -> dict[str, Any]:
        self._validate(parse_time=False)
        batch = _optional(self.batch)
        result = convert_onnx(
            self.onnx_path,
            self.cache_dir,
            output_dir=_optional(self.output_dir),
            om_name=_optional(self.om_name),
            soc_version=_optional(self.soc_version),
            input_name=self.input_name,
            batch=None if batch is None else as_int("batch", batch),
            dynamic_batch_sizes=_batch_sizes(self.dynamic_batch_sizes),
            input_dtype=str(self.input_dtype),
            precision_mode=_optional(self.precision_mode),
            log_level=str(self.log_level),
            set_env=_optional(self.set_env),
            timeout_s=float(self.timeout_s),
            handle=self._new_handle(),
        )
        self.log.info(
            "OM %s (%s, sha256 %s) %s",
            result["om_path"],
            result["soc_version"],
            result["om_sha256"][:12],
            "from cache" if result["cached"] else "converted",
        )
        return result


class MsameInferOperator(_KillableMixin, BaseOperator):
    """Run one shard on the NPU with `msame` (default) or `ais_bench`; mapped over shards.

    XCom: `backend`, `shard`, `images`, `output_dir`, `fps`, `latency_ms`, `device`, `reused`,
    `batch_size`. Outputs land in the shared layout under `outputs/<tool>/<shard>/`.
    `batch_size` > 1 needs `tool="ais_bench"` (msame has no file batching) and an OM converted with
    dynamic_batch_sizes including it (or static batch = batch_size); fps = chips*1000*batch/mean_ms.
    `dym_batch` unset = decided from the OM's convert.json; true/false force `--dymBatch` on/off.
    """

    template_fields: Sequence[str] = (
        "run_dir",
        "shard",
        "om_path",
        "tool",
        "device",
        "outfmt",
        "set_env",
        "chips",
        "batch_size",
        "dym_batch",
        "keep_raw",
    )
    ui_color = "#fbd3b0"

    def __init__(
        self,
        *,
        run_dir: str,
        shard: str,
        om_path: str,
        tool: str = "msame",
        device: int | str = 0,
        outfmt: str = "BIN",
        set_env: str | None = None,
        chips: int | str = 1,
        batch_size: int | str = 1,
        dym_batch: bool | str | None = None,
        timeout_s: float | None = None,
        keep_raw: bool | str = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.run_dir, self.shard, self.om_path, self.tool = run_dir, shard, om_path, tool
        self.device, self.outfmt, self.set_env, self.chips = device, outfmt, set_env, chips
        self.batch_size = batch_size
        self.dym_batch, self.timeout_s, self.keep_raw = dym_batch, timeout_s, keep_raw
        self._validate(parse_time=True)

    def _validate(self, parse_time: bool) -> None:
        def ready(value: Any) -> bool:
            return value is not None and (not parse_time or _literal(value))

        if ready(self.tool) and self.tool not in TOOLS:
            raise BackendError(f"tool {self.tool!r} is not one of {', '.join(TOOLS)}")
        if ready(self.device):
            check_device(self.device)
        if ready(self.outfmt) and ready(self.tool):
            allowed = TOOLS[self.tool].outfmts
            if self.outfmt not in allowed:
                raise BackendError(f"outfmt {self.outfmt!r} is not supported by {self.tool}; use {allowed}")
        for name in ("run_dir", "shard", "om_path", "set_env"):
            value = _optional(getattr(self, name))
            if ready(value):
                check_safe_path(value, name, ",")
        if ready(self.batch_size):
            batch = as_int("batch_size", self.batch_size)
            if batch < 1:
                raise BackendError(f"batch_size must be >= 1, got {batch}")
            tool = TOOLS.get(self.tool) if ready(self.tool) else None
            if batch > 1 and tool is not None and not tool.file_batching:
                raise BackendError(
                    f"{self.tool} batch_size must be 1 (got {batch}): {tool.no_file_batching_reason}"
                )

    def _dym_batch(self) -> bool | None:
        value = _optional(self.dym_batch)
        return None if value is None else as_bool("dym_batch", value)

    def execute(self, context: Any) -> dict[str, Any]:
        self._validate(parse_time=False)
        backend = TOOLS[self.tool](
            self.om_path,
            device=check_device(self.device),
            outfmt=str(self.outfmt),
            set_env=_optional(self.set_env),
            chips=as_int("chips", self.chips),
            batch_size=as_int("batch_size", self.batch_size),
            dym_batch=self._dym_batch(),
            timeout_s=None if _optional(self.timeout_s) is None else float(self.timeout_s),
            keep_raw=as_bool("keep_raw", self.keep_raw),
            handle=self._new_handle(),
        )
        layout = RunLayout.at(self.run_dir)
        result = backend.infer_shard(layout, load_manifest(layout.manifest), str(self.shard))
        timing = result.timing
        self.log.info(
            "shard %s on device %s with %s: %d images, %.2f fps",
            result.shard,
            timing.get("device"),
            self.tool,
            result.images,
            timing["fps"],
        )
        return {
            "backend": result.backend,
            "shard": result.shard,
            "images": result.images,
            "output_dir": result.output_dir,
            "fps": timing["fps"],
            "latency_ms": timing["latency_ms"],
            "device": timing.get("device", backend.device),
            "batch_size": timing.get("batch_size", backend.batch_size),
            "reused": result.reused,
        }
