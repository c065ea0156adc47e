"""Backends by name. Each entry imports its module only when used (torch is heavy; ORT workers skip it)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from gfocal_pipeline.backends.base import Backend
from gfocal_pipeline.errors import BackendError


def build(cls: type[Backend], **options: Any) -> Backend:
    """`cls(**options)`, with unknown or missing options reported as a BackendError."""
    try:
        inspect.signature(cls).bind(**options)
    except TypeError as exc:
        raise BackendError(
            f"bad options for backend {cls.name!r}: {exc}; it takes {inspect.signature(cls)}"
        ) from exc
    return cls(**options)


def _onnxruntime(**options: Any) -> Backend:
    from gfocal_pipeline.backends.onnxruntime import OnnxRuntimeBackend

    return build(OnnxRuntimeBackend, **options)


def _torch(**options: Any) -> Backend:
    from gfocal_pipeline.backends.torch_backend import TorchBackend

    return build(TorchBackend, **options)


def _msame(**options: Any) -> Backend:
    from gfocal_pipeline.backends.msame import MsameBackend

    return build(MsameBackend, **options)


def _ais_bench(**options: Any) -> Backend:
    from gfocal_pipeline.backends.ais_bench import AisBenchBackend

    return build(AisBenchBackend, **options)


BACKENDS: dict[str, Callable[..., Backend]] = {
    "onnxruntime": _onnxruntime,
    "torch": _torch,
    "msame": _msame,
    "ais_bench": _ais_bench,
}


def get_backend(name: str, **options: Any) -> Backend:
    """A ready backend, e.g. `get_backend('onnxruntime', model=path, batch_size=4)` or
    `get_backend('torch', checkpoint=path, device='auto')`."""
    factory = BACKENDS.get(name)
    if factory is None:
        raise BackendError(f"unknown backend {name!r}; choose one of: {', '.join(sorted(BACKENDS))}")
    return factory(**options)
