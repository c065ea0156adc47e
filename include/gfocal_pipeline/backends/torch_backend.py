"""PyTorch reference backend (AP_pytorch): a model adapter's portable forward run in PyTorch.

On CPU it runs in float32 and is the reference the ONNX graph is compared with. On CUDA the options
choose how the network runs (defaults in brackets):

- `precision` ["fp16" on CUDA, "fp32" on CPU]: "fp16" runs backbone, neck and head towers under fp16
  autocast; the DGQP quality branch, score x quality, the distribution integral, top-k and box decode
  stay in float32 (see `models.gfocalv2.head.full_precision`), as does the host NMS, so the ranking is decided
  in full precision. fp16 on CPU is refused.
- `channels_last` [True on CUDA, False on CPU]: NHWC memory format for the network (allowed on CPU).
- `compile` ["off"]: `torch.compile` with mode "default" or "max-autotune" (True means "default");
  off by default because compiling takes minutes (allowed on CPU too: inductor's C++ backend). Inductor's
  own CUDA graphs are never used: that is `cuda_graphs`' job.
- `cuda_graphs` [False]: capture the forward once per input size and replay it (CUDA only); off by
  default until measured on a card (benchmarks/bench_gpu.py), since it fixes the batch shape.

Compile and CUDA graphs need static shapes: a last partial batch is padded to `batch_size` with zero
images and the padded rows are dropped (`pad_batch`). Both are prepared (compiled, captured) in
`prepare`, outside the timed batches; the seconds it took are reported as `prepare_s`. The options
are part of `identity()` (so a shard made with other options is recomputed) and of the timing facts.
The candidates go through the host NMS after each batch (overlapped with the next batch, see
`backends.base`); the shard is written as kind "dets". Outputs are copied to the host before
`run_batch` returns, so a CUDA graph's next replay cannot overwrite what the NMS thread reads.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gfocal_pipeline.adapters import DEFAULT_MODEL, check_model_name, load_adapter
from gfocal_pipeline.backends.base import InProcessBackend, ShardResult
from gfocal_pipeline.errors import BackendError
from gfocal_pipeline.fileio import sha256_file
from gfocal_pipeline.layout import RunLayout
from gfocal_pipeline.manifest import Manifest

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "fp16")
COMPILE_MODES = ("off", "default", "max-autotune")
# torch.compile mode per option value; inductor never captures CUDA graphs itself (see CudaGraphRunner)
INDUCTOR_MODES = {"default": "default", "max-autotune": "max-autotune-no-cudagraphs"}
GRAPH_WARMUP = 2  # eager (or compiled) runs on a side stream before a CUDA graph is captured

Forward = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class TorchOptions:
    """How the network runs; see the module docstring for the defaults."""

    precision: str
    channels_last: bool
    compile: str
    cuda_graphs: bool

    @property
    def static_shapes(self) -> bool:
        """Compiled or captured forwards take one batch shape: partial batches are padded."""
        return self.compile != "off" or self.cuda_graphs


def _flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise BackendError(f"{name} must be true or false, got {value!r}")
    return value


def _compile_mode(value: object) -> str:
    if isinstance(value, bool):
        return "default" if value else "off"
    if value not in COMPILE_MODES:
        raise BackendError(f"compile must be true, false or one of {', '.join(COMPILE_MODES)}, got {value!r}")
    return str(value)


def resolve_options(
    device: torch.device,
    precision: str | None = None,
    channels_last: bool | None = None,
    compile: bool | str = False,
    cuda_graphs: bool = False,
) -> TorchOptions:
    """The options for `device` with the defaults filled in, or a BackendError naming the bad one."""
    cuda = device.type == "cuda"
    precision = precision if precision is not None else ("fp16" if cuda else "fp32")
    if precision not in PRECISIONS:
        raise BackendError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp16" and not cuda:
        raise BackendError(f"precision='fp16' needs a CUDA device (device is {device}); use precision='fp32'")
    graphs = _flag("cuda_graphs", cuda_graphs)
    if graphs and not cuda:
        raise BackendError(f"cuda_graphs=True needs a CUDA device (device is {device}); drop cuda_graphs")
    layout = _flag("channels_last", cuda if channels_last is None else channels_last)
    return TorchOptions(precision, layout, _compile_mode(compile), graphs)


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


class NetworkRunner(nn.Module):
    """A detector fed in the chosen memory format, optionally under fp16 autocast, handing float32
    head outputs to the decode. `autocast_cache=False` is what CUDA graph capture needs."""

    def __init__(
        self,
        model: nn.Module,
        half: bool,
        channels_last: bool,
        device_type: str = "cuda",
        autocast_cache: bool = True,
    ) -> None:
        super().__init__()
        self.inner = model
        self.bbox_head = model.bbox_head  # GFocalV2's deploy reads the integral projection from here
        if hasattr(model, "spec"):  # RetinaNet's deploy reads its spec
            self.spec = model.spec
        self.half = half
        self.channels_last = channels_last
        self.device_type = device_type
        self.autocast_cache = autocast_cache

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.half:
            with torch.autocast(self.device_type, torch.float16, cache_enabled=self.autocast_cache):
                cls_scores, bbox_preds = self.inner(x)
        else:
            cls_scores, bbox_preds = self.inner(x)
        return [c.float() for c in cls_scores], [b.float() for b in bbox_preds]


class HalfPrecisionNetwork(NetworkRunner):
    """The network under CUDA fp16 autocast (on CPU tensors it changes nothing)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model, half=True, channels_last=False)


def wrap_network(model: nn.Module, options: TorchOptions, device_type: str) -> nn.Module:
    """The network as `options` run it; the plain module for fp32 without channels_last."""
    if options.channels_last:
        model = model.to(memory_format=torch.channels_last)
    half = options.precision == "fp16"
    if not half and not options.channels_last:
        return model
    return NetworkRunner(
        model, half, options.channels_last, device_type, autocast_cache=not options.cuda_graphs
    )


class NormalizedInput(nn.Module):
    """NHWC uint8 BGR -> NCHW float32 normalized input ahead of a reference module (with `mean` and
    `std` buffers, and `swaps_channels` when its network wants RGB) built without it: the same numbers
    as the export's in-graph normalization, with a flip instead of its list index (a list index is
    copied from host memory on every call, which a CUDA graph capture refuses)."""

    def __init__(self, deploy: nn.Module) -> None:
        super().__init__()
        self.deploy = deploy
        self.swap = bool(getattr(deploy, "swaps_channels", True))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.permute(0, 3, 1, 2)
        if self.swap:
            x = x.flip(1)
        x = x.contiguous().float()  # NCHW-contiguous, as the export's index gives
        return self.deploy((x - self.deploy.mean) / self.deploy.std)


def pad_batch(batch: np.ndarray, size: int) -> np.ndarray:
    """`batch` with zero images appended up to `size` rows (unchanged when already full)."""
    rows = len(batch)
    if rows > size:
        raise BackendError(f"a batch of {rows} images is larger than batch_size {size}")
    if rows == size:
        return batch
    padded = np.zeros((size, *batch.shape[1:]), batch.dtype)
    padded[:rows] = batch
    return padded


class CudaGraphRunner:
    """Replays one captured forward on a static input buffer (CUDA graphs need fixed shapes and
    addresses); the outputs are the graph's own buffers, overwritten by the next call."""

    def __init__(self, forward: Forward, example: torch.Tensor, warmup: int = GRAPH_WARMUP) -> None:
        self.static_input = example.clone()
        side = torch.cuda.Stream(device=example.device)
        side.wait_stream(torch.cuda.current_stream(example.device))
        with torch.cuda.stream(side):  # warm-up (and compilation) off the capture, as torch requires
            for _ in range(warmup):
                forward(self.static_input)
        torch.cuda.current_stream(example.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_output = forward(self.static_input)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.shape != self.static_input.shape or x.dtype != self.static_input.dtype:
            raise BackendError(
                f"CUDA graph captured for {self.static_input.dtype} {tuple(self.static_input.shape)}, "
                f"got {x.dtype} {tuple(x.shape)}; pad the batch to batch_size"
            )
        self.static_input.copy_(x, non_blocking=True)
        self.graph.replay()
        return self.static_output


def build_forward(deploy: nn.Module, options: TorchOptions, example: torch.Tensor) -> Forward:
    """The callable run per batch: eager, compiled and/or a CUDA graph, warmed up on `example`."""
    forward: Forward = deploy  # type: ignore[assignment]
    if options.compile != "off":
        forward = torch.compile(deploy, mode=INDUCTOR_MODES[options.compile], dynamic=False)
    if options.cuda_graphs:
        return CudaGraphRunner(forward, example)
    if options.compile != "off":
        forward(example)  # compile now, not in the first timed batch
    return forward


class TorchBackend(InProcessBackend):
    """An adapter's network + decode in PyTorch (`adapter`, default GFocalV2), in
    `torch.inference_mode`; outputs numpy boxes/scores float32."""

    name = "torch"
    model_kind = "candidates"

    def __init__(
        self,
        model: str | os.PathLike[str],
        batch_size: int = 1,
        device: str = "auto",
        precision: str | None = None,
        channels_last: bool | None = None,
        compile: bool | str = False,
        cuda_graphs: bool = False,
        num_threads: int | None = None,
        warmup: int = 0,
        keep_candidates: bool = False,
        score_thr: float | None = None,
        iou_thr: float | None = None,
        max_per_img: int | None = None,
        adapter: str = DEFAULT_MODEL,
    ) -> None:
        self.adapter = load_adapter(check_model_name(adapter, "torch backend adapter"))
        super().__init__(
            batch_size=batch_size,
            warmup=warmup,
            keep_candidates=keep_candidates,
            score_thr=score_thr,
            iou_thr=iou_thr,
            max_per_img=max_per_img,
            spec=self.adapter.spec,
        )
        self.checkpoint = Path(model)
        self.device = resolve_device(device)
        self.options = resolve_options(self.device, precision, channels_last, compile, cuda_graphs)
        if num_threads is not None:
            if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
                raise BackendError(f"num_threads must be an integer >= 1, got {num_threads!r}")
            torch.set_num_threads(num_threads)
        self._checkpoint_sha256 = sha256_file(self.checkpoint) if self.checkpoint.is_file() else ""
        network = self.adapter.load_network(self.checkpoint)  # CheckpointError names file and problem
        self.network = wrap_network(network, self.options, self.device.type).to(self.device).eval()
        self._deploy: nn.Module | None = None
        self._forward: Forward | None = None
        self._deploy_key: tuple[int, int, str] | None = None
        self.prepare_s = 0.0  # seconds the last prepare() took (compilation, graph capture)
        log.info(
            "torch %s: %s on %s (%s), batch %d",
            torch.__version__,
            self.checkpoint,
            self.device,
            ", ".join(f"{k}={v}" for k, v in asdict(self.options).items()),
            self.batch_size,
        )

    @property
    def amp(self) -> bool:
        """True when the network runs under fp16 autocast (the former `amp` flag)."""
        return self.options.precision == "fp16"

    def timing_facts(self) -> dict[str, Any]:
        facts: dict[str, Any] = {"device": str(self.device), **asdict(self.options)}
        if self.device.type == "cuda":
            facts["device_name"] = torch.cuda.get_device_name(self.device)
        if self.options.static_shapes:
            facts["prepare_s"] = round(self.prepare_s, 3)
        return facts

    def identity(self) -> dict[str, Any]:
        return {
            **super().identity(),
            "model_sha256": self._checkpoint_sha256,
            "adapter": self.adapter.spec.name,
            "device": self.device.type,
            "torch_options": asdict(self.options),
        }

    def prepare(self, manifest: Manifest) -> nn.Module:
        """The eager deploy forward for the manifest's input size and dtype (built once per size/dtype;
        uint8 inputs are normalized by `NormalizedInput`); with compile or CUDA graphs its compiled or
        captured form for batches of `batch_size` is what `run_batch` then runs."""
        key = (manifest.input_height, manifest.input_width, manifest.dtype)
        if self._deploy is None or self._forward is None or self._deploy_key != key:
            began = time.perf_counter()
            # the network or a NetworkRunner around it
            deploy = self.adapter.reference_module(self.network, manifest.input_height, manifest.input_width)
            if manifest.dtype == "uint8":
                deploy = NormalizedInput(deploy)  # type: ignore[arg-type]
            deploy = deploy.to(self.device).eval()
            forward: Forward = deploy  # type: ignore[assignment]
            if self.options.static_shapes:
                shape = (self.batch_size, *manifest.input_shape()[1:])
                example = torch.zeros(shape, dtype=getattr(torch, manifest.dtype), device=self.device)
                with torch.inference_mode():
                    forward = build_forward(deploy, self.options, example)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
            self._deploy, self._forward, self._deploy_key = deploy, forward, key
            self.prepare_s = time.perf_counter() - began
        return self._deploy

    def infer_shard(self, layout: RunLayout, manifest: Manifest, shard: str) -> ShardResult:
        if self.reuse(layout, manifest, shard) is None:  # no compile or capture for a reused shard
            self.prepare(manifest)
        return super().infer_shard(layout, manifest, shard)

    def device_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The prepared forward on a batch already on the device: boxes and scores as device tensors,
        no padding, no copies (what a model-only benchmark times). Call `prepare` first."""
        if self._forward is None:
            raise BackendError("TorchBackend.run_batch called before prepare(manifest); use infer_shard")
        return self._forward(x)

    def run_batch(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        if self._forward is None:
            raise BackendError("TorchBackend.run_batch called before prepare(manifest); use infer_shard")
        rows = len(batch)
        if self.options.static_shapes:
            batch = pad_batch(batch, self.batch_size)
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device)
            boxes, scores = self.device_forward(x)
            return {  # .cpu() synchronizes CUDA, so timing is honest; padded rows are dropped
                "boxes": boxes[:rows].float().cpu().numpy(),
                "scores": scores[:rows].float().cpu().numpy(),
            }
