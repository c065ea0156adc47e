"""The `onnx` adapter: a bring-your-own graph takes the place of the export (checked, copied, recorded)."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import onnx
from torch import nn

from gfocal_pipeline.errors import ConfigError, ExportError
from gfocal_pipeline.export import ExportResult, export_target, rejected_path
from gfocal_pipeline.fileio import atomic_path, sha256_file, write_json
from gfocal_pipeline.model_spec import ModelSpec
from gfocal_pipeline.models.onnx.declaration import load_declaration
from gfocal_pipeline.models.onnx.graph_check import GraphFacts, check_graph
from gfocal_pipeline.models.onnx.spec import SPEC

log = logging.getLogger(__name__)
NO_NETWORK = (
    "model 'onnx' is a graph, not a PyTorch network: its reference is ONNX Runtime on the CPU running "
    "the same graph (backend onnxruntime), and it has no generated weights"
)


def _check_feed(facts: GraphFacts, variant: str, uint8_inputs: bool, source: str) -> None:
    """The run's inputs must be what the graph takes (AIPP turns uint8 into float only for atc)."""
    if facts.input_dtype == "uint8" and not uint8_inputs:
        raise ExportError(f"ONNX graph {source} takes uint8 NHWC inputs: set the run's dtype to uint8")
    if facts.input_dtype == "float32" and uint8_inputs and variant == "portable":
        raise ExportError(
            f"ONNX graph {source} takes float32 NCHW inputs (normalized on the host): set the run's dtype "
            "to float32 (on the Ascend path, uint8 inputs are normalized by AIPP instead)"
        )


def _result(graph: Path, target: Path, facts: GraphFacts, variant: str, spec: ModelSpec) -> ExportResult:
    batch = facts.input_dims[0] if isinstance(facts.input_dims[0], int) else "batch"
    outputs = facts.outputs.get("boxes") or facts.outputs.get("dets") or []
    return ExportResult(
        onnx_path=str(target),
        onnx_sha256=sha256_file(target),
        checkpoint_sha256=sha256_file(graph),
        variant=variant,
        input_name=facts.input_name,
        input_shape=[batch, *facts.input_dims[1:]],
        input_dtype=facts.input_dtype,
        output_names=list(facts.outputs),
        opset=facts.opset,
        parity_max_abs_err=0.0,
        candidates_per_image=outputs[1] if len(outputs) > 1 and isinstance(outputs[1], int) else 0,
        model=spec.to_dict(),
    )


def import_graph(
    graph: str | os.PathLike[str],
    output: str | os.PathLike[str],
    variant: str = "portable",
    height: int = 800,
    width: int = 1216,
    normalize_in_graph: bool = False,
    input_dtype: str | None = None,
    **ignored: Any,
) -> ExportResult:
    """Check `graph` against its declaration and the run, then copy it to `output` with its
    `.export.json` (the model spec); no parity check: the project did not export it."""
    started = time.perf_counter()
    graph, target = Path(graph), export_target(output)
    declared, declaration, digest = load_declaration(graph)
    try:
        proto = onnx.load(str(graph), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and others for a file that is not a graph
        raise ExportError(f"{str(graph)!r} is not a readable ONNX graph: {exc}") from None
    facts = check_graph(proto, declared, declaration, repr(str(graph)), (height, width))
    uint8_inputs = normalize_in_graph or input_dtype == "uint8"
    _check_feed(facts, variant, uint8_inputs, repr(str(graph)))
    with atomic_path(target) as tmp:
        shutil.copyfile(graph, tmp)
    result = _result(graph, target, facts, variant, declared.model_spec(digest))
    result.export_seconds = round(time.perf_counter() - started, 3)
    with contextlib.suppress(FileNotFoundError):
        rejected_path(target).unlink()
    write_json(target.with_suffix(".export.json"), result.to_dict())
    log.info(
        "imported %s (%s, %s outputs): no parity check, not exported here",
        graph,
        declared.name,
        declared.outputs,
    )
    return result


class OnnxGraphAdapter:
    """A graph exported elsewhere, described by the declaration beside it (`declaration.py`)."""

    spec: ModelSpec = SPEC

    def load_network(self, path: str | os.PathLike[str], strict: bool = True) -> nn.Module:
        raise ConfigError(NO_NETWORK)

    def reference_module(self, network: nn.Module, height: int, width: int) -> nn.Module:
        raise ConfigError(NO_NETWORK)

    def export(
        self, path: str | os.PathLike[str], output: str | os.PathLike[str], **options: Any
    ) -> ExportResult:
        return import_graph(path, output, **options)

    def write_random_checkpoint(self, path: str | os.PathLike[str], seed: int = 0) -> Path:
        raise ConfigError(NO_NETWORK)


ADAPTER = OnnxGraphAdapter()
