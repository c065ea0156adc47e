"""`AtcConvertOperator`: the Ascend ONNX graph -> the run's OM with atc, through the OM cache."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseOperator

from gfocal_pipeline.constants import DEFAULT_INPUT_NAME
from operators.base import KillableMixin, attributes, project_errors


class AtcConvertOperator(KillableMixin, BaseOperator):
    """Convert the Ascend ONNX graph to `model/gfocal.om` with atc (cached by content).

    For: the Ascend DAG's convert step, on the NPU worker. `batch_size` > 1 converts a dynamic-batch
    OM (sizes 1 and batch_size) for ais_bench; `soc_version=None` detects it with `npu-smi info`;
    `input_dtype="uint8"` adds static AIPP (normalization on the NPU). Killing the task stops atc.
    XCom: `om_path`, `om_sha256`, `soc_version`, `cann_version`, `atc_args`, `cached`,
    `convert_seconds`, `cache_key`.
    """

    template_fields: Sequence[str] = (
        "run_dir",
        "onnx_path",
        "cache_dir",
        "batch_size",
        "soc_version",
        "input_dtype",
        "precision_mode",
        "set_env",
        "input_name",
    )
    ui_color = "#fde2c8"

    def __init__(
        self,
        *,
        run_dir: str,
        onnx_path: str,
        cache_dir: str,
        batch_size: int = 1,
        soc_version: str | None = None,
        input_dtype: str = "float32",
        precision_mode: str = "force_fp16",
        set_env: str | None = None,
        input_name: str = DEFAULT_INPUT_NAME,
        log_level: str = "error",
        timeout_s: float = 3600.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.run_dir, self.onnx_path, self.cache_dir, self.batch_size = (
            run_dir,
            onnx_path,
            cache_dir,
            batch_size,
        )
        self.soc_version, self.input_dtype, self.precision_mode = soc_version, input_dtype, precision_mode
        self.set_env, self.input_name, self.log_level, self.timeout_s = (
            set_env,
            input_name,
            log_level,
            timeout_s,
        )

    @project_errors
    def execute(self, context: Any) -> dict[str, Any]:
        from gfocal_pipeline import steps

        names = ("batch_size", "soc_version", "input_name", "input_dtype", "precision_mode", "log_level")
        options = attributes(self, (*names, "set_env", "timeout_s"))
        result = steps.convert_step(
            self.run_dir, self.onnx_path, self.cache_dir, handle=self._new_handle(), **options
        )
        self.log.info(
            "OM %s (%s, sha256 %s) %s",
            result["om_path"],
            result["soc_version"],
            result["om_sha256"][:12],
            "from cache" if result["cached"] else "converted",
        )
        return result
