"""One inference operator for every backend of the registry (onnxruntime, torch, msame, ais_bench)."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

from airflow.sdk import BaseOperator

from gfocal_pipeline.backends.registry import CHEAP_TO_BUILD, backend_class, check_backend_name, get_backend
from operators.base import KillableMixin, fail_without_retry, manifest_images, project_errors
from operators.timeout_mixin import SizedTimeoutMixin


def _literal(value: Any) -> bool:
    """True when `value` is final at DAG-parse time (not a Jinja template rendered later)."""
    if isinstance(value, Mapping):
        return all(_literal(v) for v in value.values())
    return not (isinstance(value, str) and "{{" in value)


class InferOperator(KillableMixin, SizedTimeoutMixin, BaseOperator):
    """Run one shard of a run through `backend` into the shared output layout; mapped over shards.

    For: every inference task. `model` is what the backend loads (ONNX file, checkpoint or OM);
    `options` are the backend's own (e.g. `providers`, `device`, `outfmt`, `set_env`, `chips`). The
    backend's constructor is where its options are checked: at DAG-parse time when every value is
    final and the backend is cheap to build (the Ascend tools), else when the task runs. Killing the
    task stops a running tool; its timeout is sized for the shard's images (`infer_reference`
    budget for the PyTorch reference, `infer` else). XCom: `backend`, `shard`, `images`,
    `output_dir`, `timing`, `reused`, and from the timing `fps`, `latency_ms`, `batch_size`, `device`.
    """

    template_fields: Sequence[str] = ("backend", "run_dir", "shard", "model", "batch_size", "options")
    ui_color = "#fbd3b0"
    default_backend = "onnxruntime"

    def __init__(
        self,
        *,
        run_dir: str,
        shard: str,
        model: str,
        backend: str | None = None,
        batch_size: int = 1,
        options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.backend = backend or self.default_backend
        self.run_dir, self.shard, self.model = run_dir, shard, model
        self.batch_size, self.options = batch_size, dict(options or {})
        if _literal(self.backend):
            check_backend_name(self.backend)
            final = all(_literal(v) for v in (self.model, self.batch_size, self.options))
            if self.backend in CHEAP_TO_BUILD and final:  # building it is the validation
                get_backend(self.backend, **self._backend_options())

    @property
    def timeout_kind(self) -> str:  # type: ignore[override]
        return "infer_reference" if self.backend == "torch" else "infer"

    def timeout_images(self) -> int | None:
        return manifest_images(self.run_dir, self.shard)

    def _backend_options(self) -> dict[str, Any]:
        options = {"model": self.model, "batch_size": self.batch_size, **self.options}
        if "handle" in inspect.signature(backend_class(self.backend)).parameters:
            options["handle"] = self._new_handle()
        return options

    @project_errors
    def execute(self, context: Any) -> dict[str, Any]:
        from gfocal_pipeline import steps

        with fail_without_retry():  # e.g. an OM converted for another input
            result = steps.infer_step(self.run_dir, self.shard, self.backend, **self._backend_options())
        timing = result["timing"]
        self.log.info(
            "shard %s with %s: %d images, %.2f fps",
            result["shard"],
            self.backend,
            result["images"],
            timing["fps"],
        )
        facts = {key: timing.get(key) for key in ("fps", "latency_ms", "batch_size", "device")}
        return {**result, **facts}


class MsameInferOperator(InferOperator):
    """`InferOperator` on the NPU: `backend` msame (default, the recipe) or ais_bench, `model` the OM.

    For: the Ascend DAG's per-shard inference on the `ascend` queue. Options: `device`, `outfmt`,
    `set_env`, `chips`, `dym_batch`, `timeout_s`, `keep_raw` (see `backends.msame`).
    """

    default_backend = "msame"
