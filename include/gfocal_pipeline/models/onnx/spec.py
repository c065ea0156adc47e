"""The `onnx` adapter's spec: each run's comes from the declaration beside its graph (`run_spec`)."""

from __future__ import annotations

import os

from gfocal_pipeline.errors import ConfigError
from gfocal_pipeline.model_spec import ModelSpec

# what `gfocal models` shows: the facts of a run come from the graph's declaration
SPEC = ModelSpec(
    name="onnx",
    display_name="your own ONNX graph (declared in <graph>.spec.yaml)",
    history_name="onnx",
    om_name="model",
    outputs="dets",
    reference_backend="onnxruntime",
)


def run_spec(graph: str | os.PathLike[str] | None) -> ModelSpec:
    """The spec of a run on `graph` (the `checkpoint` option holds the .onnx path)."""
    from gfocal_pipeline.models.onnx.declaration import load_declaration

    if not graph:
        raise ConfigError(
            "model 'onnx' runs your own graph: pass the path of the .onnx file as 'checkpoint' (with its "
            "declaration <graph>.spec.yaml beside it, see docs/models.md); it has no generated demo weights"
        )
    declaration, _, digest = load_declaration(graph)
    return declaration.model_spec(digest)
