"""The in-process inference loop (issue #12): ONNX Runtime through the product vs a bare loop, and
the whole `gfocal infer` command vs the model time it reports.

Generated data, once in setup: the RANDOM-weight checkpoint (`write_random_checkpoint`), its
portable ONNX graph with dynamic batch (exported as `bench_backends.py` does), random float32
inputs with a manifest in two run directories (`bench_backends.build_run`).

Contenders, per round:

- ``bare_ort``: a bare `onnxruntime.InferenceSession` loop over the same `.bin` files with the same
  session options (log level, intra-op threads; checked equal in the facts), timing only `run`;
- ``operator``: the product's path, `OnnxRuntimeBackend.infer_shard` shard by shard (read-ahead,
  host NMS, outputs, timing files); its fps is what the product reports (`steps.combined_timing`);
- ``gfocal_infer_cmd``: the `gfocal infer` command as a subprocess on a run of `CMD_IMAGES` images
  in one shard: wall seconds of the whole command (python start, imports, manifest, session,
  shard, writing) against the sum of the batch latencies it records.

``bare_ort`` and ``operator`` are measured as a pair, interleaved shard by shard in ABBA order
(bare, operator, operator, bare, ...) within one call, on a persistent session each; the call for
the second of them returns the figures measured with the first, so both figures of a round come
from the same seconds of a shared, loaded machine.
Run alone: ``.venv/bin/python benchmarks/bench_infer.py [--quick]``.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import Bound, Figures, Ratio, Suite, quiet_logging, run_suite

from gfocal_pipeline.layout import RunLayout, input_file_name
from gfocal_pipeline.manifest import Manifest

THREADS = 1  # intra-op threads of both fps contenders (see the notes)
FULL = {"size": (320, 320), "pair_images": 12, "pair_shard": 1, "cmd_images": 64, "rounds": 3}
QUICK = {"size": (64, 96), "pair_images": 8, "pair_shard": 1, "cmd_images": 6, "rounds": 1}
SESSION_FIELDS = (
    "intra_op_num_threads",
    "inter_op_num_threads",
    "graph_optimization_level",
    "execution_mode",
    "enable_cpu_mem_arena",
    "enable_mem_pattern",
    "log_severity_level",
)

# `gfocal infer` as the console script runs it (`from gfocal_pipeline.cli import main`), plus the
# seconds from the first statement to the end of main() written to a file (the in-process part)
_COMMAND = """
import json, sys, time
began = time.perf_counter()
from gfocal_pipeline.cli import main
imported = time.perf_counter()
code = main(sys.argv[2:])
ended = time.perf_counter()
figures = {"imports_s": imported - began, "main_s": ended - imported, "torch": "torch" in sys.modules}
with open(sys.argv[1], "w") as handle:
    json.dump(figures, handle)
sys.exit(code)
"""


def _generate(work: Path, config: dict[str, Any]) -> tuple[Path, Manifest, RunLayout, Manifest]:
    """Checkpoint, portable graph, and the two run directories (pair, command); returns the graph."""
    from bench_backends import build_run, export_portable

    from gfocal_pipeline.models.gfocalv2.checkpoint import write_random_checkpoint

    height, width = config["size"]
    checkpoint = write_random_checkpoint(work / "random.pth", seed=0)
    model = export_portable(checkpoint, work / "portable.onnx", height, width)
    pair = build_run(work / "pair", config["pair_images"], config["pair_shard"], height, width)
    command = build_run(work / "cmd", config["cmd_images"], config["cmd_images"], height, width)
    layout = RunLayout.at(work / "cmd")
    layout.model_dir.mkdir(parents=True, exist_ok=True)
    os.link(model, layout.onnx("portable"))  # the command's default model
    return model, pair, layout, command


def _bare_session(model: Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()  # what the backend sets: log level and intra-op threads
    options.log_severity_level = 3
    options.intra_op_num_threads = THREADS
    return ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])


def _same_options(a: Any, b: Any) -> bool:
    return all(getattr(a, f) == getattr(b, f) for f in SESSION_FIELDS)


class Pair:
    """bare_ort and operator measured together, interleaved shard by shard (ABBA)."""

    def __init__(self, model: Path, manifest: Manifest) -> None:
        from gfocal_pipeline.backends.registry import get_backend

        self.manifest = manifest
        self.layout = RunLayout.at(manifest.path.parent)
        self.session = _bare_session(model)
        self.input_name = self.session.get_inputs()[0].name
        self.backend = get_backend("onnxruntime", model=model, batch_size=1, intra_op_num_threads=THREADS)
        self.same_options = _same_options(
            self.session.get_session_options(), self.backend.session.get_session_options()
        )
        self.stash: dict[str, Figures] = {}

    def bare(self, shard: str) -> list[float]:
        """Seconds of each `run` over the shard (its files read as a bare loop reads them)."""
        seconds, shape = [], self.manifest.input_shape()
        for image_id in self.manifest.shards[shard]:
            path = self.manifest.input_dir(shard) / input_file_name(image_id)
            x = np.fromfile(path, dtype=np.float32).reshape(shape)
            start = time.perf_counter()
            self.session.run(None, {self.input_name: x})
            seconds.append(time.perf_counter() - start)
        return seconds

    def operator(self, shard: str) -> list[float]:
        """The product's shard run; the seconds of its timed batches, read from its timing file."""
        (self.layout.output_shard("onnxruntime", shard) / "done.json").unlink(missing_ok=True)
        self.backend.infer_shard(self.layout, self.manifest, shard)
        timing = json.loads(self.layout.timing_file("onnxruntime", shard).read_text())
        return [ms / 1000.0 for ms in timing["latencies_ms"]]

    def warm(self) -> None:
        """One run of each session (their first run is slower), untimed."""
        first = sorted(self.manifest.shards)[0]
        self.bare(first)
        self.operator(first)

    def measure(self) -> None:
        from gfocal_pipeline.steps import combined_timing

        bare: list[float] = []
        operator: list[float] = []
        for index, shard in enumerate(sorted(self.manifest.shards)):
            if index % 2:
                operator += self.operator(shard)
            bare += self.bare(shard)
            if not index % 2:
                operator += self.operator(shard)
        reported = combined_timing(self.layout.root, "onnxruntime")  # the product's fps
        self.stash = {
            "bare_ort": {"img_per_s": len(bare) / sum(bare), "img_per_s_median": 1 / statistics.median(bare)},
            "operator": {"img_per_s": reported["fps"], "img_per_s_median": 1 / statistics.median(operator)},
        }

    def contender(self, name: str) -> Any:
        def call() -> Figures:
            if name not in self.stash:
                self.measure()
            return self.stash.pop(name)

        return call


def _command(layout: RunLayout, facts: dict[str, Any]) -> Figures:
    """One `gfocal infer` run from scratch (its outputs and timing removed first, untimed); the
    first run also records whether the command imported torch and how long its imports took."""
    shutil.rmtree(layout.outputs_dir("onnxruntime"), ignore_errors=True)
    shutil.rmtree(layout.timing_dir("onnxruntime"), ignore_errors=True)
    report = layout.root / "command-timing.json"
    argv = [sys.executable, "-c", _COMMAND, str(report), "infer", "--run-dir", str(layout.root)]
    start = time.perf_counter()
    done = subprocess.run(argv, check=False, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"gfocal infer exited {done.returncode}: {done.stderr[-2000:]}")
    inside = json.loads(report.read_text())
    latency_s, nms_s = 0.0, 0.0
    for path in sorted(layout.timing_dir("onnxruntime").glob("*.json")):
        timing = json.loads(path.read_text())
        latency_s += sum(timing["latencies_ms"]) / 1000.0
        nms_s += timing["summary"].get("host_nms_ms_per_image", 0.0) * timing["summary"]["images"] / 1000.0
    facts.setdefault("torch imported by gfocal infer", inside["torch"])
    facts.setdefault("gfocal infer imports (s, first round)", round(inside["imports_s"], 3))
    return {
        "wall_s": wall,
        "sum_latency_s": latency_s,
        "wall_over_latency": wall / latency_s,
        "in_process_over_latency": (inside["imports_s"] + inside["main_s"]) / latency_s,
        "startup_s": wall - inside["imports_s"] - inside["main_s"],
        "imports_s": inside["imports_s"],
        "host_nms_s": nms_s,
        "main_other_s": inside["main_s"] - latency_s,  # session, manifest, NMS not overlapped, writing
    }


def suite(work: Path, quick: bool = False) -> Suite:
    """The suite at 320x320 (64x96 when `quick`) under `work`."""
    started = time.perf_counter()
    config = QUICK if quick else FULL
    model, pair_manifest, cmd_layout, _ = _generate(work, config)
    pair = Pair(model, pair_manifest)
    pair.warm()
    facts: dict[str, Any] = {"same session options (bare vs product)": pair.same_options}
    height, width = config["size"]
    result = Suite(
        name="infer",
        title=f"Inference loop: ONNX Runtime CPU, {height}x{width}, random-weight GFocalV2 (portable graph)",
        contenders={
            "bare_ort": pair.contender("bare_ort"),
            "operator": pair.contender("operator"),
            "gfocal_infer_cmd": lambda: _command(cmd_layout, facts),
        },
        metrics={
            "img_per_s": "img/s",
            "img_per_s_median": "img/s",
            "wall_s": "s",
            "sum_latency_s": "s",
            "wall_over_latency": "x",
            "in_process_over_latency": "x",
            "startup_s": "s",
            "imports_s": "s",
            "host_nms_s": "s (overlapped)",
            "main_other_s": "s",
        },
        ratios=[
            Ratio(
                "operator fps / bare ORT loop (every round)",
                "operator",
                "bare_ort",
                "img_per_s",
                goal=0.97,
                every_round=True,
            ),
            Ratio(
                "operator / bare ORT loop, from the median batch latency (every round)",
                "operator",
                "bare_ort",
                "img_per_s_median",
                goal=0.97,
                every_round=True,
            ),
        ],
        bounds=[
            Bound(
                f"gfocal infer wall / sum of batch latencies ({config['cmd_images']} images)",
                "gfocal_infer_cmd",
                "wall_over_latency",
                goal=1.05,
            )
        ],
        rounds=config["rounds"],
        warmup=False,  # setup ran each session once; the command starts a fresh process every round
        setup_s=time.perf_counter() - started,
        facts=facts,
        notes=[
            f"bare_ort/operator: {config['pair_images']} images per round in shards of "
            f"{config['pair_shard']}, batch 1, intra_op_num_threads={THREADS} for both, interleaved "
            "ABBA by shard on persistent sessions; operator fps is the product's (sum of its timed "
            "batch latencies, host NMS and writing excluded)",
            f"gfocal_infer_cmd: {config['cmd_images']} images in one shard, batch 1, ORT's default "
            "threads (the command has no thread option); wall includes python start, imports, "
            "manifest, session creation, the shard, host NMS and writing",
            "one intra-op thread for the fps pair: with ORT's default pool (one thread per core) on a "
            "2-core machine shared with other work, every parallel operator waits for the thread that "
            "another process descheduled, so a round's fps depends on the load of its seconds",
            "img_per_s_median (1 / median batch latency) is the same comparison with a statistic that "
            "one batch slowed by another process does not move; img_per_s is the product's formula",
        ],
    )
    return result


def main() -> None:
    quiet_logging()
    quick = "--quick" in sys.argv[1:]
    with tempfile.TemporaryDirectory(prefix="bench-infer-") as tmp:
        result = run_suite(suite(Path(tmp), quick=quick), log=lambda line: print(line, file=sys.stderr))
    print(json.dumps(result, indent=1, default=float))


if __name__ == "__main__":
    main()
