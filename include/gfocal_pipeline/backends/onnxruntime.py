"""ONNX Runtime backend: runs the portable graph (or a graph ending in dets/labels) in this process.

The portable graph's candidates go through the host NMS after each batch (see `backends.base`), so
the shard is written as kind "dets"; a graph that already ends in dets/labels passes through as is.

The graph is checked when it is loaded (one input of rank 4, known output names, static batch versus
`batch_size`) and again against the manifest before a shard runs (dtype, layout, height x width), so a
mismatch fails with a message instead of producing garbage. A graph with a static batch larger than
the number of images in a batch (the last partial batch) is fed a padded batch and the padding rows
are dropped from the outputs.

Session options come from `session_options` (ONNX Runtime's defaults: full graph optimization; plus
the log level and an optional intra-op thread count), so a bare loop can build the very same session.
The model file is hashed (its `identity`) in a thread while the session is created.

On the CPU the graph ONNX Runtime optimized is kept beside the model
(`.ort-optimized/<stem>-<key>.onnx`, keyed by the model file's size and mtime, the ORT version and
the CPU's features) and later sessions load it with optimizations off: creating a session of the
ResNet-50-FPN graph then takes a fraction of the time (each inference task creates one). The same
kernels run on the same fused graph, so outputs are unchanged (tested bit for bit). The model's
sha256 is kept there too (`<stem>-<key>.sha256`, the same key), so it is not hashed again. A damaged
or unwritable copy only costs the time it would have saved.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import platform
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from gfocal_pipeline.backends.base import InProcessBackend, ShardResult
from gfocal_pipeline.errors import BackendError
from gfocal_pipeline.fileio import owner_tag, sha256_file
from gfocal_pipeline.layout import KINDS, RunLayout
from gfocal_pipeline.manifest import Manifest
from gfocal_pipeline.model_spec import spec_beside

log = logging.getLogger(__name__)

PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "gpu": "CUDAExecutionProvider",
    "cann": "CANNExecutionProvider",
    "npu": "CANNExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "dml": "DmlExecutionProvider",
}
ORT_DTYPES = {"tensor(float)": "float32", "tensor(uint8)": "uint8", "tensor(float16)": "float16"}
OUTPUT_DTYPES = {"boxes": np.float32, "scores": np.float32, "dets": np.float32, "labels": np.int64}

ProviderSpec = str | tuple[str, dict[str, Any]]


def resolve_providers(
    providers: str | Sequence[ProviderSpec] | None, available: Sequence[str] | None = None
) -> list[ProviderSpec]:
    """Short names ('cpu', 'cuda', 'cann', ...) or full provider names -> full names, checked against
    what this onnxruntime build offers. CPU is appended as the fallback for nodes other providers lack.
    """
    available = list(ort.get_available_providers() if available is None else available)
    if providers is None:
        providers = ["CPUExecutionProvider"]
    elif isinstance(providers, str):
        providers = [p.strip() for p in providers.split(",") if p.strip()]
    if not providers:
        raise BackendError(f"no onnxruntime provider given; available here: {', '.join(available)}")
    resolved: list[ProviderSpec] = []
    for spec in providers:
        name, options = (spec, None) if isinstance(spec, str) else (spec[0], dict(spec[1]))
        full = PROVIDER_ALIASES.get(name.lower(), name)
        if full not in available:
            raise BackendError(
                f"onnxruntime provider {name!r} ({full}) is not available in this onnxruntime build "
                f"(onnxruntime {ort.__version__}); available: {', '.join(available)}. Install the matching "
                "package (onnxruntime-gpu for CUDA, the CANN build for Ascend) or choose one of those"
            )
        resolved.append(full if options is None else (full, options))
    names = [p if isinstance(p, str) else p[0] for p in resolved]
    if "CPUExecutionProvider" not in names:
        resolved.append("CPUExecutionProvider")
    return resolved


def _provider_name(spec: ProviderSpec) -> str:
    return spec if isinstance(spec, str) else spec[0]


def session_options(intra_op_num_threads: int | None = None) -> ort.SessionOptions:
    """The session options the backend runs with: ORT's defaults (graph optimization level "all"),
    warnings off the log, and `intra_op_num_threads` when given (None or 0: ORT's choice)."""
    if intra_op_num_threads is not None and (
        isinstance(intra_op_num_threads, bool)
        or not isinstance(intra_op_num_threads, int)
        or intra_op_num_threads < 0
    ):
        raise BackendError(f"intra_op_num_threads must be an integer >= 0, got {intra_op_num_threads!r}")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if intra_op_num_threads is not None:
        options.intra_op_num_threads = intra_op_num_threads
    return options


OPTIMIZED_DIR = ".ort-optimized"


@functools.cache
def _cpu_signature() -> str:
    """The CPU's architecture and feature flags: an optimized CPU graph may use kernels for them."""
    flags = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    return f"{platform.machine()} {flags}"


def _read_digest(path: Path | None) -> str | None:
    """The model's sha256 kept beside its optimized graph (same key: size, mtime), if intact."""
    if path is None:
        return None
    try:
        text = path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return text if len(text) == 64 and all(c in "0123456789abcdef" for c in text) else None


def optimized_graph_path(model: Path) -> Path:
    """Where ONNX Runtime's optimized CPU graph of `model` is kept (see the module docstring)."""
    stat = model.stat()
    text = f"{stat.st_size}|{stat.st_mtime_ns}|{ort.__version__}|{_cpu_signature()}"
    key = hashlib.sha256(text.encode()).hexdigest()[:20]
    return model.parent / OPTIMIZED_DIR / f"{model.stem}-{key}.onnx"


class OnnxRuntimeBackend(InProcessBackend):
    """Run an ONNX graph with ONNX Runtime, one batch of preprocessed inputs at a time."""

    name = "onnxruntime"

    def __init__(
        self,
        model: str | os.PathLike[str],
        batch_size: int = 1,
        providers: str | Sequence[ProviderSpec] | None = None,
        intra_op_num_threads: int | None = None,
        warmup: int = 0,
        keep_candidates: bool = False,
        score_thr: float | None = None,
        iou_thr: float | None = None,
        max_per_img: int | None = None,
        cache_optimized_graph: bool = True,
    ) -> None:
        spec = spec_beside(model)  # the export's record of the model: its classes and NMS settings
        super().__init__(  # sets num_classes and class_aware from the spec (COCO's 80, class-aware without)
            spec=spec,
            batch_size=batch_size,
            warmup=warmup,
            keep_candidates=keep_candidates,
            score_thr=score_thr,
            iou_thr=iou_thr,
            max_per_img=max_per_img,
        )
        self.model_path = Path(model)
        if not self.model_path.is_file():
            raise BackendError(
                f"ONNX model {str(self.model_path)!r} does not exist; run the export step first or pass "
                "the path of a .onnx file"
            )
        self.providers = resolve_providers(providers)
        options = session_options(intra_op_num_threads)
        cpu_only = [_provider_name(p) for p in self.providers] == ["CPUExecutionProvider"]
        self._open_session(options, keep=cache_optimized_graph and cpu_only)
        wanted = [_provider_name(p) for p in self.providers]
        active = self.session.get_providers()
        missing = [p for p in wanted if p not in active]
        if missing:
            raise BackendError(
                f"onnxruntime could not start provider(s) {missing} for {str(self.model_path)!r} "
                f"(active: {active}); check the driver/runtime libraries of that device (for CUDA: a "
                "CUDA/cuDNN version matching onnxruntime-gpu, and a visible GPU)"
            )
        self._inspect_graph()
        self.check_keep_candidates(f"ONNX model {str(self.model_path)!r}")
        log.info(
            "onnxruntime %s: %s on %s, batch %d (graph batch %s)",
            ort.__version__,
            self.model_path,
            active,
            self.batch_size,
            self.static_batch or "dynamic",
        )

    def _open_session(self, options: ort.SessionOptions, keep: bool) -> None:
        """`self.session` (from the optimized-graph cache when `keep`) and the model's sha256, hashed
        beside the session's creation (its digest is cached beside the optimized graph)."""
        digest_file = optimized_graph_path(self.model_path).with_suffix(".sha256") if keep else None
        known = _read_digest(digest_file)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="onnx-model-hash") as pool:
            digest = None if known else pool.submit(sha256_file, self.model_path)  # releases the GIL
            self.session = self._cached_session(options) if keep else self._create_session(options)
            self._model_sha256 = known or digest.result()
        if digest_file is not None and not known:
            with contextlib.suppress(OSError):
                digest_file.write_text(self._model_sha256 + "\n")

    def _cached_session(self, options: ort.SessionOptions) -> ort.InferenceSession:
        """A session from the kept optimized graph, or a new one that keeps its optimized graph."""
        cached = optimized_graph_path(self.model_path)
        if cached.is_file():
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            try:
                return self._create_session(options, cached)
            except BackendError as exc:
                log.warning(
                    "optimized graph %s is unusable (%s); optimizing %s again", cached, exc, self.model_path
                )
                cached.unlink(missing_ok=True)
                options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        tmp = cached.with_name(f".{cached.name}.{owner_tag()}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            cached.parent.mkdir(exist_ok=True)
        except OSError as exc:
            log.info("cannot keep the optimized graph of %s (%s)", self.model_path, exc)
            return self._create_session(options)
        options.optimized_model_filepath = str(tmp)
        session = self._create_session(options)
        try:
            os.replace(tmp, cached)  # whole or absent; a concurrent task's copy is as good
        except OSError as exc:
            log.info("cannot keep the optimized graph of %s (%s)", self.model_path, exc)
            tmp.unlink(missing_ok=True)
        return session

    def _create_session(self, options: ort.SessionOptions, path: Path | None = None) -> ort.InferenceSession:
        try:
            return ort.InferenceSession(str(path or self.model_path), options, providers=self.providers)
        except Exception as exc:  # onnxruntime raises its own exception classes (Fail, InvalidGraph, ...)
            raise BackendError(
                f"onnxruntime cannot load {str(self.model_path)!r}: {exc}. Is it the portable graph? "
                "The ascend graph (in-graph BatchMultiClassNMS) runs only on the NPU"
            ) from exc

    def _inspect_graph(self) -> None:
        """One rank-4 input, outputs named as one of the shared layout's kinds, static batch fits."""
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise BackendError(
                f"ONNX model {str(self.model_path)!r} has {len(inputs)} inputs "
                f"({[i.name for i in inputs]}); the pipeline feeds exactly one image tensor"
            )
        self.input = inputs[0]
        if len(self.input.shape) != 4:
            raise BackendError(
                f"input {self.input.name!r} of {str(self.model_path)!r} has rank {len(self.input.shape)} "
                f"(shape {self.input.shape}); expected a rank-4 image batch (NCHW or NHWC)"
            )
        self.input_dtype = ORT_DTYPES.get(self.input.type, self.input.type)
        names = [o.name for o in self.session.get_outputs()]
        self.output_names = names
        kinds = [kind for kind, wanted in KINDS.items() if sorted(names) == sorted(wanted)]
        if not kinds:
            expected = " or ".join(str(list(v)) for v in KINDS.values())
            raise BackendError(
                f"ONNX model {str(self.model_path)!r} has outputs {names}; expected exactly {expected}. "
                "Export the portable variant (outputs boxes, scores)"
            )
        self.model_kind = kinds[0]
        if self.model_kind == "candidates":
            scores = next(o for o in self.session.get_outputs() if o.name == "scores")
            classes = scores.shape[-1] if scores.shape else None
            if isinstance(classes, int) and classes != self.num_classes:
                raise BackendError(
                    f"output 'scores' of {str(self.model_path)!r} has {classes} classes, expected "
                    f"{self.num_classes}; re-export the portable graph (it drops the padding class)"
                )
        batch = self.input.shape[0]
        self.static_batch = batch if isinstance(batch, int) and batch > 0 else None
        if self.static_batch is not None and self.batch_size > self.static_batch:
            raise BackendError(
                f"ONNX model {str(self.model_path)!r} has static batch {self.static_batch} but batch_size is "
                f"{self.batch_size}; re-export with dynamic batch or use batch_size {self.static_batch}"
            )

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), "model_sha256": self._model_sha256}

    def check_manifest(self, manifest: Manifest) -> None:
        """The graph's input must take what preprocessing wrote: dtype, layout and height x width."""
        where = f"ONNX model {str(self.model_path)!r} and manifest {str(manifest.path)!r}"
        if self.input_dtype != manifest.dtype:
            raise BackendError(
                f"{where} disagree: the graph input {self.input.name!r} is {self.input_dtype} "
                f"{self.input.shape} but the inputs are {manifest.dtype} {manifest.layout}. Export with "
                f"normalize_in_graph={manifest.dtype == 'uint8'} for {manifest.dtype} inputs, or re-run "
                f"preprocessing with dtype {self.input_dtype}"
            )
        expected = manifest.input_shape(self.static_batch or 1)
        for axis in range(1, 4):
            dim = self.input.shape[axis]
            if isinstance(dim, int) and dim != expected[axis]:
                raise BackendError(
                    f"{where} disagree: the graph input {self.input.name!r} has shape {self.input.shape}, "
                    f"the inputs are {manifest.layout} {list(expected[1:])} "
                    f"({manifest.input_height}x{manifest.input_width}). Export the model at "
                    f"{manifest.input_height}x{manifest.input_width} or preprocess at the graph's size"
                )

    def infer_shard(self, layout: RunLayout, manifest: Manifest, shard: str) -> ShardResult:
        self.check_manifest(manifest)
        return super().infer_shard(layout, manifest, shard)

    def run_batch(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        count = len(batch)
        if self.static_batch is not None and count < self.static_batch:
            # a static-batch graph only takes full batches: pad with copies of the last image, drop later
            pad = np.repeat(batch[-1:], self.static_batch - count, axis=0)
            batch = np.concatenate([batch, pad])
        feed = np.ascontiguousarray(batch, dtype=np.dtype(self.input_dtype))  # no copy for read batches
        names = self.output_names
        try:
            values = self.session.run(names, {self.input.name: feed})
        except Exception as exc:  # onnxruntime's own exception classes
            raise BackendError(
                f"onnxruntime failed on {str(self.model_path)!r} for a batch {feed.shape}: {exc}"
            ) from exc
        outputs = {}
        for name, value in zip(names, values, strict=True):
            if value.shape[0] != len(batch):
                raise BackendError(
                    f"output {name!r} of {str(self.model_path)!r} has first axis {value.shape[0]} for a "
                    f"batch of {len(batch)}; the graph must keep the batch as its first output axis"
                )
            outputs[name] = np.asarray(value[:count], dtype=OUTPUT_DTYPES[name])
        if self.model_kind == "candidates" and (
            outputs["boxes"].shape[-1] != 4 or outputs["scores"].shape[-1] != self.num_classes
        ):
            raise BackendError(
                f"{str(self.model_path)!r} returned boxes {outputs['boxes'].shape} and scores "
                f"{outputs['scores'].shape}; expected (N,K,4) and (N,K,{self.num_classes})"
            )
        return outputs
