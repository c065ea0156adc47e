"""NPU inference of one shard with `python3 -m ais_bench` (same code path as msame, other contract).

ais_bench writes `<output>/<%Y_%m_%d-%H_%M_%S>/<input stem>_<i>.<bin|txt|npy>` and, beside that folder,
`<output>/<timestr>_summary.json` with `NPU_compute_time` {min, max, mean, median, percentile(99%)},
`throughput` and `npu_compute_time_list`. Success = exit 0 and the "Performance Summary" log line;
the timings come from the (new) summary file. `python3` is the one on the CANN PATH, as on a host
where the ais_bench wheel is installed into the system Python.

Batch N (files mode): ais_bench sizes its input buffer from the OM (times `--dymBatch N` for a
dynamic-batch OM), puts buffer / file-size consecutive files into one inference, pads the last
group with copies of that group's first file, and splits every output along
`--output_batchsize_axis` (default 0) into one `<stem>_<i>` file per real input (padding dropped).
So one-image inputs give one output file per image at any batch, and `npu_compute_time_list` holds
one time per inference = per batch of N; fps = chips * 1000 * N / mean_ms, the tool's own
throughput formula. The count of inferences is checked against ceil(images / N), which catches an
OM whose real batch differs from `batch_size` (ais_bench would group differently, silently).
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import numpy as np

from gfocal_pipeline.backends.cann_env import CannEnv
from gfocal_pipeline.backends.msame import AscendToolBackend, ToolTiming
from gfocal_pipeline.backends.process import ProcessResult
from gfocal_pipeline.errors import BackendError

_STATS = (("min", "min"), ("max", "max"), ("p50", "median"), ("p99", "percentile(99%)"))


class AisBenchBackend(AscendToolBackend):
    """`python3 -m ais_bench --model --input --output --outfmt --device [--dymBatch N]`."""

    name = "ais_bench"
    file_batching = True
    # lines real ais_bench (aclruntime) prints when --dymBatch does not fit the OM
    dym_batch_errors = (
        "dymBatch parameter is not correct",
        "model has dynamic batch size",
        "dynamic_batch_size parameter is not specified",
    )
    outfmts = ("BIN", "TXT", "NPY")
    success_marker = re.compile(r"Performance Summary")
    success_hint = "[INFO] ---Performance Summary---"
    run_dir_pattern = re.compile(r"^\d{4}_\d{2}_\d{2}-\d{2}_\d{2}_\d{2}$")

    def command(self, env: CannEnv) -> list[str]:
        return [env.require_tool("python3"), "-m", "ais_bench"]

    def output_file_name(self, stem: str, index: int) -> str:
        return f"{stem}_{index}.{self.extension}"

    def failure(self, result: ProcessResult) -> BackendError:
        lines = [line.strip() for line in result.lines if any(m in line for m in self.dym_batch_errors)]
        if lines:
            shown = "\n  ".join(lines[:4])
            return BackendError(
                f"ais_bench rejected the batch for OM {str(self.om_path)!r} (batch_size {self.batch_size}, "
                f"exit {result.returncode}):\n  {shown}\nUse a batch size the OM was converted with, or "
                "re-convert with dynamic_batch_sizes including it"
            )
        return super().failure(result)

    def check_timing(self, timing: ToolTiming, inputs: int) -> None:
        """One time per inference: ceil(inputs / batch) of them, else the tool batched differently."""
        expected = math.ceil(inputs / self.batch_size)
        if timing.per_input_ms and len(timing.per_input_ms) != expected:
            raise BackendError(
                f"ais_bench ran {len(timing.per_input_ms)} inferences for {inputs} inputs, expected "
                f"{expected} at batch_size {self.batch_size}; the OM {str(self.om_path)!r} takes another "
                "batch than batch_size (convert with that batch or pass the OM's batch)"
            )

    def parse_timing(self, result: ProcessResult, output_dir: Path, before: set[str]) -> ToolTiming:
        summaries = sorted(
            name for name in set(os.listdir(output_dir)) - before if name.endswith("_summary.json")
        )
        if len(summaries) != 1:
            raise BackendError(
                f"ais_bench should write one new <time>_summary.json in {str(output_dir)!r}, found "
                f"{summaries or 'none'}; check the ais_bench version and log:\n{result.tail(10)}"
            )
        path = output_dir / summaries[0]
        try:
            data = json.loads(path.read_text())
            npu = data["NPU_compute_time"]
            mean = float(npu["mean"])
            extra = {key: float(npu[source]) for key, source in _STATS if source in npu}
            per_input = [float(v) for v in data.get("npu_compute_time_list", [])]
            tool_fps = float(data["throughput"]) if "throughput" in data else None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise BackendError(f"cannot parse ais_bench summary {str(path)!r}: {exc}") from exc
        if not np.isfinite(mean):
            raise BackendError(f"ais_bench summary {str(path)!r} has a non-numeric mean time {mean}")
        return ToolTiming(mean, None, per_input, extra, tool_fps)
