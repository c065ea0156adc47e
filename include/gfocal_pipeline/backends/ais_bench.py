"""NPU inference of one shard with `python3 -m ais_bench` (same code path as msame, other contract).

ais_bench writes `<output>/<%Y_%m_%d-%H_%M_%S>/<input stem>_<i>.<bin|txt|npy>` and, beside that folder,
`<output>/<timestr>_summary.json` with `NPU_compute_time` {min, max, mean, median, percentile(99%)},
`throughput` and `npu_compute_time_list`. Success = exit 0 and the "Performance Summary" log line;
the timings come from the (new) summary file. `python3` is the one on the CANN PATH, as on a host
where the ais_bench wheel is installed into the system Python.
"""

from __future__ import annotations

import json
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
    """`python3 -m ais_bench --model --input --output --outfmt --device [--dymBatch]`."""

    name = "ais_bench"
    outfmts = ("BIN", "TXT", "NPY")
    success_marker = re.compile(r"Performance Summary")
    success_hint = "[INFO] ---Performance Summary---"
    run_dir_pattern = re.compile(r"^\d{4}_\d{2}_\d{2}-\d{2}_\d{2}_\d{2}$")

    def command(self, env: CannEnv) -> list[str]:
        return [env.require_tool("python3"), "-m", "ais_bench"]

    def output_file_name(self, stem: str, index: int) -> str:
        return f"{stem}_{index}.{self.extension}"

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
