"""Running an emulated OM: raw input bytes -> (AIPP) -> pre graph (ORT) -> NMS (numpy) -> post graph."""

from __future__ import annotations

import time

import numpy as np
import onnxruntime as ort

from gfocal_emulator import aipp
from gfocal_emulator.common import dropped_class
from gfocal_emulator.nms import batch_multiclass_nms
from gfocal_emulator.om import OmError, read_om


class EmulatedModel:
    def __init__(self, path: str) -> None:
        self.meta, parts = read_om(path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.log_severity_level = 3
        self.sessions = {
            name.removesuffix(".onnx"): ort.InferenceSession(
                data, options, providers=["CPUExecutionProvider"]
            )
            for name, data in parts.items()
        }
        self.input = self.meta["input"]
        self.output_names: list[str] = self.meta["outputs"]

    @property
    def per_image_shape(self) -> tuple[int, ...]:
        if self.input.get("aipp"):
            _, _, h, w = self.input["shape"]
            return aipp.source_shape(self.input["aipp"], h, w)
        return tuple(self.input["shape"][1:])

    @property
    def input_dtype(self) -> np.dtype:
        return np.dtype(np.uint8) if self.input.get("aipp") else np.dtype(self.input.get("dtype", "float32"))

    @property
    def image_bytes(self) -> int:
        return int(np.prod(self.per_image_shape)) * self.input_dtype.itemsize

    def batch_for(self, nbytes: int, dym_batch: int | None) -> int:
        static = self.input["shape"][0]
        if static == -1:
            if dym_batch is None:
                raise OmError("the model has a dynamic batch; pass --dymBatch")
            if dym_batch not in self.meta["dynamic_batch_sizes"]:
                raise OmError(f"dymBatch {dym_batch} not in {self.meta['dynamic_batch_sizes']}")
            batch = dym_batch
        else:
            batch = static
        if nbytes != batch * self.image_bytes:
            raise OmError(f"input size {nbytes} is not equal to model input size {batch * self.image_bytes}")
        return batch

    def run(self, raw: bytes, dym_batch: int | None = None) -> tuple[list[np.ndarray], float]:
        """Outputs in the OM's output order and the compute time in ms."""
        batch = self.batch_for(len(raw), dym_batch)
        x = np.frombuffer(raw, dtype=self.input_dtype).reshape(batch, *self.per_image_shape)
        start = time.perf_counter()
        if self.input.get("aipp"):
            _, _, h, w = self.input["shape"]
            x = aipp.apply(x, self.input["aipp"], h, w)
        feeds = {self.input["name"]: np.ascontiguousarray(x)}
        if "model" in self.sessions:
            values = self.sessions["model"].run(None, feeds)
            named = dict(zip([o.name for o in self.sessions["model"].get_outputs()], values, strict=True))
        else:
            named = self._run_split(feeds)
        elapsed = (time.perf_counter() - start) * 1000.0
        return [named[name] for name in self.output_names], elapsed

    def _run_split(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        links = self.meta["nms"]
        pre = self.sessions["pre"]
        values = dict(zip([o.name for o in pre.get_outputs()], pre.run(None, feeds), strict=True))
        attrs = links["attributes"]
        boxes, scores = (values[name] for name in links["nms_inputs"])
        drop = dropped_class()
        if drop is not None:  # the "regressed device" of the report tests: one class is never found
            scores = scores.copy()
            scores[..., drop] = 0.0
        nms_out = batch_multiclass_nms(
            boxes,
            scores,
            float(attrs["score_threshold"]),
            float(attrs["iou_threshold"]),
            int(attrs["max_size_per_class"]),
            int(attrs["max_total_size"]),
        )
        values.update(zip(links["nms_outputs"], nms_out, strict=True))
        post = self.sessions["post"]
        post_feeds = {i.name: values[i.name] for i in post.get_inputs()}
        values.update(zip([o.name for o in post.get_outputs()], post.run(None, post_feeds), strict=True))
        return values
