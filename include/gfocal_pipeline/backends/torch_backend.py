"""PyTorch reference backend (AP_pytorch): the exported forward (`DeployModel`, portable) run eagerly.

On CPU it runs in float32 and is the reference the ONNX graph is compared with. On CUDA the backbone,
neck and head run under fp16 autocast while the decode (softmax integral, top-k, box clamp) stays in
float32, so the candidates keep full precision where the ranking is decided. The candidates go through the
host NMS after each batch (see `backends.base`) and the shard is written as kind "dets".
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gfocal_pipeline.backends.base import InProcessBackend, ShardResult
from gfocal_pipeline.checkpoint import load_model
from gfocal_pipeline.constants import MAX_PER_IMG, NMS_IOU, SCORE_THR
from gfocal_pipeline.errors import BackendError
from gfocal_pipeline.fileio import sha256_file
from gfocal_pipeline.layout import RunLayout
from gfocal_pipeline.manifest import Manifest
from gfocal_pipeline.model import DeployModel, GFocalV2

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")


class HalfPrecisionNetwork(nn.Module):
    """Runs a GFocalV2 under CUDA fp16 autocast and hands float32 head outputs to the decode."""

    def __init__(self, model: GFocalV2) -> None:
        super().__init__()
        self.inner = model
        self.bbox_head = model.bbox_head  # DeployModel reads the integral projection from here

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        with torch.autocast(device_type="cuda", dtype=torch.float16):
            cls_scores, bbox_preds = self.inner(x)
        return [c.float() for c in cls_scores], [b.float() for b in bbox_preds]


def resolve_device(device: str) -> torch.device:
    """'auto' -> CUDA when available else CPU; 'cuda' (or 'cuda:N') without CUDA is an error."""
    kind = device.split(":", 1)[0]
    if kind not in DEVICES:
        raise BackendError(f"unknown torch device {device!r}; choose one of {', '.join(DEVICES)} (or cuda:N)")
    if kind == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        raise BackendError(
            f"torch device {device!r} requested but CUDA is not available to torch {torch.__version__}; "
            "use device='cpu' or 'auto', or install a CUDA build of torch"
        )
    return torch.device(device)


class TorchBackend(InProcessBackend):
    """GFocalV2 + decode in PyTorch, in `torch.inference_mode`, outputs numpy boxes/scores float32."""

    name = "torch"
    model_kind = "candidates"

    def __init__(
        self,
        model: str | os.PathLike[str],
        batch_size: int = 1,
        device: str = "auto",
        amp: bool = True,
        num_threads: int | None = None,
        warmup: int = 1,
        keep_candidates: bool = False,
        score_thr: float = SCORE_THR,
        iou_thr: float = NMS_IOU,
        max_per_img: int = MAX_PER_IMG,
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            warmup=warmup,
            keep_candidates=keep_candidates,
            score_thr=score_thr,
            iou_thr=iou_thr,
            max_per_img=max_per_img,
        )
        self.checkpoint = Path(model)
        self.device = resolve_device(device)
        self.amp = bool(amp) and self.device.type == "cuda"
        if num_threads is not None:
            if num_threads < 1:
                raise BackendError(f"num_threads must be >= 1, got {num_threads}")
            torch.set_num_threads(num_threads)
        self._checkpoint_sha256 = sha256_file(self.checkpoint) if self.checkpoint.is_file() else ""
        network = load_model(self.checkpoint)  # CheckpointError names the file and the problem
        self.network: nn.Module = HalfPrecisionNetwork(network) if self.amp else network
        self.network.to(self.device).eval()
        self._deploy: DeployModel | None = None
        self._deploy_key: tuple[int, int, str] | None = None
        log.info(
            "torch %s: %s on %s (fp16 autocast %s), batch %d",
            torch.__version__,
            self.checkpoint,
            self.device,
            "on" if self.amp else "off",
            self.batch_size,
        )

    def timing_facts(self) -> dict[str, Any]:
        return {"device": str(self.device), "precision": "fp16" if self.amp else "fp32"}

    def identity(self) -> dict[str, Any]:
        return {
            **super().identity(),
            "model_sha256": self._checkpoint_sha256,
            "device": self.device.type,
            "amp": self.amp,
        }

    def prepare(self, manifest: Manifest) -> DeployModel:
        """The deploy forward for the manifest's input size and dtype (built once per size/dtype)."""
        key = (manifest.input_height, manifest.input_width, manifest.dtype)
        if self._deploy is None or self._deploy_key != key:
            self._deploy = (
                DeployModel(
                    self.network,
                    "portable",
                    manifest.input_height,
                    manifest.input_width,  # type: ignore[arg-type]
                    normalize_in_graph=manifest.dtype == "uint8",
                )
                .to(self.device)
                .eval()
            )
            self._deploy_key = key
        return self._deploy

    def infer_shard(self, layout: RunLayout, manifest: Manifest, shard: str) -> ShardResult:
        self.prepare(manifest)
        return super().infer_shard(layout, manifest, shard)

    def run_batch(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        if self._deploy is None:
            raise BackendError("TorchBackend.run_batch called before prepare(manifest); use infer_shard")
        with torch.inference_mode():
            boxes, scores = self._deploy(torch.from_numpy(np.ascontiguousarray(batch)).to(self.device))
            return {
                "boxes": boxes.float().cpu().numpy(),  # .cpu() synchronizes CUDA, so timing is honest
                "scores": scores.float().cpu().numpy(),
            }
