"""Backends by name. Each entry imports its module only when used (torch is heavy; ORT workers skip it),
and what a DAG needs to know at parse time (`cheap_to_build`) is stated here, without importing it."""

from __future__ import annotations

import importlib
import inspect
from typing import TYPE_CHECKING, Any

from gfocal_pipeline.errors import BackendError

if TYPE_CHECKING:
    from gfocal_pipeline.backends.base import Backend

# name -> "module:class"; every name here is a choice of `gfocal infer --backend` and the infer operator
BACKENDS: dict[str, str] = {
    "onnxruntime": "gfocal_pipeline.backends.onnxruntime:OnnxRuntimeBackend",
    "torch": "gfocal_pipeline.backends.torch_backend:TorchBackend",
    "msame": "gfocal_pipeline.backends.msame:MsameBackend",
    "ais_bench": "gfocal_pipeline.backends.ais_bench:AisBenchBackend",
}


# backends whose constructor only validates options (no file read, no session): a DAG builds them at
# parse time when their options are literal, so a bad option fails the parse, not a night
CHEAP_TO_BUILD = frozenset({"msame", "ais_bench"})


# tools that feed each input file as one whole inference (no file batching: batch 1 only), so a models
# file's tool + batch is checked at parse time without importing the backend (numpy); each class's
# `file_batching` says the same (tests/pipeline/backends/test_batch_rule.py)
ONE_FILE_PER_INFERENCE = frozenset({"msame"})


def check_batch_size(name: str, batch_size: int) -> None:
    """Backend `name`'s batch rule for a valid batch (an integer >= 1): a BackendError with the
    backend's own words when it cannot run it; imports the backend only then."""
    if batch_size != 1 and check_backend_name(name) in ONE_FILE_PER_INFERENCE:
        backend_class(name).check_batch_size(batch_size)


def check_backend_name(name: str) -> str:
    """`name` if it is registered, else a BackendError listing the choices (imports nothing)."""
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; choose one of: {', '.join(sorted(BACKENDS))}")
    return name


def backend_class(name: str) -> type[Backend]:
    """The class registered as `name` (imported on first use)."""
    module, _, cls = BACKENDS[check_backend_name(name)].partition(":")
    return getattr(importlib.import_module(module), cls)


# options of the in-process backends (onnxruntime, torch) for the host NMS run after each batch
POSTPROCESS_OPTIONS = ("keep_candidates", "score_thr", "iou_thr", "max_per_img")


def get_backend(name: str, **options: Any) -> Backend:
    """A ready backend, e.g. `get_backend('onnxruntime', model=path, batch_size=4)` or
    `get_backend('msame', model=om_path, device=0)`; unknown or missing options are a BackendError.

    onnxruntime and torch also take `POSTPROCESS_OPTIONS`: `score_thr`, `iou_thr`, `max_per_img` of the
    host NMS (defaults: the official test_cfg) and `keep_candidates` (also write the raw candidates).
    torch's GPU options are `precision`, `channels_last`, `compile` and `cuda_graphs` (see
    `backends.torch_backend` for their defaults)."""
    cls = backend_class(name)
    try:
        inspect.signature(cls).bind(**options)
    except TypeError as exc:
        raise BackendError(
            f"bad options for backend {name!r}: {exc}; it takes {inspect.signature(cls)}"
        ) from exc
    return cls(**options)
