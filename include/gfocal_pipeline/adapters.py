"""The model adapter registry: every model the pipeline can run, by name, loaded lazily.

An adapter is a package `gfocal_pipeline.models.<name>` (or any importable package registered with
`register_adapter`) with two modules:

- `spec`: `SPEC`, a `ModelSpec` - pure data, imports neither torch nor onnx, so a DAG file or a form
  can read it at parse time; optionally `run_spec(checkpoint)`, the spec of one run when it depends
  on the file the run is given (the `onnx` adapter reads the declaration beside the graph);
- `adapter`: `ADAPTER`, a `ModelAdapter` - checkpoint loading, the PyTorch reference module, the
  export variants with their parity check, and the demo's random weights (imports torch).

Generic modules reach adapters only through this registry (by name, with `importlib`); the import
contract in pyproject.toml forbids them to import `gfocal_pipeline.models` directly.
"""

from __future__ import annotations

import difflib
import importlib
import os
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from gfocal_pipeline.errors import ConfigError
from gfocal_pipeline.model_spec import ModelSpec

if TYPE_CHECKING:
    from torch import nn

    from gfocal_pipeline.export import ExportResult

DEFAULT_MODEL = "gfocalv2"
_PACKAGES: dict[str, str] = {
    "gfocalv2": "gfocal_pipeline.models.gfocalv2",
    "onnx": "gfocal_pipeline.models.onnx",
    "retinanet": "gfocal_pipeline.models.retinanet",
    "yolox": "gfocal_pipeline.models.yolox",  # YOLOX-s, checked against mmdet 3.3 (docs/models.md)
}


class ModelAdapter(Protocol):
    """What a model brings beyond its `ModelSpec` (see docs/models.md)."""

    spec: ModelSpec

    def load_network(self, checkpoint: str | os.PathLike[str], strict: bool = True) -> nn.Module:
        """The detector in eval mode with the checkpoint's weights (strict layout check)."""

    def reference_module(self, network: nn.Module, height: int, width: int) -> nn.Module:
        """The portable forward in PyTorch: normalized NCHW float32 -> (boxes (N,K,4), scores (N,K,C));
        it has `mean` and `std` buffers (1,3,1,1) for inputs normalized in front of it."""

    def export(
        self, checkpoint: str | os.PathLike[str], output: str | os.PathLike[str], **options: Any
    ) -> ExportResult:
        """Export to ONNX (`variant` portable or ascend) and verify parity; writes `.export.json`."""

    def write_random_checkpoint(self, path: str | os.PathLike[str], seed: int = 0) -> Path:
        """Deterministic RANDOM weights in the official layout (tests and the demo)."""


def register_adapter(name: str, package: str) -> None:
    """Make the adapter package `package` (with `spec` and `adapter` modules) available as `name`."""
    _PACKAGES[name] = package
    model_spec.cache_clear()
    load_adapter.cache_clear()


def model_names() -> tuple[str, ...]:
    """The registered adapter names, sorted."""
    return tuple(sorted(_PACKAGES))


def check_model_name(name: object, source: str = "model") -> str:
    """`name` when it is a registered adapter; else a `ConfigError` listing them (and the nearest)."""
    if isinstance(name, str) and name in _PACKAGES:
        return name
    near = difflib.get_close_matches(str(name), list(_PACKAGES), n=1)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    raise ConfigError(
        f"{source} {name!r} is not a registered model adapter{hint}; choose one of: "
        f"{', '.join(model_names())} (`gfocal models` lists them with their specs)"
    )


@cache
def model_spec(name: str) -> ModelSpec:
    """The `ModelSpec` of adapter `name` (imports only its `spec` module: no torch)."""
    module = importlib.import_module(f"{_PACKAGES[check_model_name(name)]}.spec")
    return module.SPEC


def run_model_spec(name: str, checkpoint: str | os.PathLike[str] | None) -> ModelSpec:
    """The spec of a run of adapter `name` on `checkpoint`: the adapter's `run_spec(checkpoint)` where
    its spec module has one (a `ConfigError` names a bad or missing declaration), else its `SPEC`."""
    module = importlib.import_module(f"{_PACKAGES[check_model_name(name)]}.spec")
    run_spec = getattr(module, "run_spec", None)
    return run_spec(checkpoint) if run_spec is not None else module.SPEC


@cache
def load_adapter(name: str) -> ModelAdapter:
    """The adapter object of `name` (imports its network code, torch included)."""
    module = importlib.import_module(f"{_PACKAGES[check_model_name(name)]}.adapter")
    return module.ADAPTER
