"""What the adapters' export tests share: the matrix of exports one module fixture makes, and running a
graph in ONNX Runtime."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from gfocal_pipeline.export import _session


def portable_key(size: tuple[int, int]) -> str:
    """The `exports` key of the portable graph of `size` (height, width)."""
    return f"portable {size[0]}x{size[1]}"


def export_matrix(
    export: Callable[..., Any],
    model: Any,
    out: Path,
    portable: dict[tuple[int, int], bool],
    square: tuple[int, int],
) -> dict[str, Any]:
    """The portable graph of every size in `portable` (True: uint8 input normalized in the graph, with a
    dynamic batch) and the ascend graph of `square`, each exported by `export(model, path, variant, h, w)`."""
    found = {
        portable_key(size): export(
            model,
            out / f"{size[0]}x{size[1]}.onnx",
            "portable",
            *size,
            dynamic_batch=uint8,
            normalize_in_graph=uint8,
        )
        for size, uint8 in portable.items()
    }
    found["ascend"] = export(model, out / "ascend.onnx", "ascend", *square)
    return found


def run_graph(graph: onnx.ModelProto, feed: np.ndarray) -> list[np.ndarray]:
    """The graph's outputs for `feed` (its single input), in ONNX Runtime on the CPU."""
    session = _session(graph)
    return session.run(None, {session.get_inputs()[0].name: feed})
