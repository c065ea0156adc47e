"""NPU inference of one shard with `msame` (and, sharing this code path, `ais_bench`).

The tool is given the shard's input directory (`Manifest.input_dir(shard)`, holding
`<image_id:012d>.bin`; in the inputs cache or `inputs/<shard>/` beside the manifest) and a fresh
per-attempt output directory. Its result is trusted only when all of these hold:
  - the tool's success marker was printed (msame exits 0 even on bad arguments, so the exit code
    alone proves nothing);
  - exactly one new run folder appeared in the output directory (folders that were there before
    the run are ignored, never parsed);
  - it holds exactly one file per input per model output, no more, no less;
  - the timing lines parse.
The outputs (`dets` float32 (100,5), `labels` int64 (100,) per image) are then written to the shared
layout (`layout.write_shard_outputs(kind="dets")`) and the raw tool folder is removed.

fps = chips * 1000 * batch / mean_ms, with mean_ms the tool's average time per inference (one
inference = one batch of `batch` images), times `chips` when one card has several chips that run
copies of the job. The recipe reports an Atlas 300I (310, four chips) at batch 1 as
4 x 1000 / 223.21 = 17.92 fps; a 310P card is one device: 1000 / 28.99 = 34.49 fps.

Batch: msame feeds each input file as one whole inference, and our inputs hold one image per file,
so msame runs batch 1 only. ais_bench groups `batch` consecutive files into one inference (the last
group padded) and splits each output back into one file per input, so it runs batch N on an OM
converted with a dynamic batch that includes N (`--dymBatch N`) or with static batch N. What the OM
supports is read from the `convert.json` that the convert step writes beside it (see `om_batch`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from gfocal_pipeline.backends.atc import CACHE_META
from gfocal_pipeline.backends.base import Backend, ShardResult, shard_result
from gfocal_pipeline.backends.cann_env import CannEnv, load_cann_env
from gfocal_pipeline.backends.process import (
    ProcessHandle,
    ProcessResult,
    check_safe_path,
    run_tool,
)
from gfocal_pipeline.constants import MAX_PER_IMG
from gfocal_pipeline.errors import BackendError, DatasetError, OmInputMismatchError
from gfocal_pipeline.fileio import sha256_file, write_json
from gfocal_pipeline.layout import RunLayout, input_file_name, shard_done, write_shard_outputs
from gfocal_pipeline.manifest import Manifest
from gfocal_pipeline.timing import latency_stats

log = logging.getLogger(__name__)

# (name, dtype, values per image) of the Ascend graph's outputs, in output order
# (name, dtype, values per row): an image's output holds max_per_img rows, the model's own (its spec's
# postprocess.max_per_img, stated in the exported graph); every output of an OM must agree on it
OUTPUTS = (("dets", np.dtype(np.float32), 5), ("labels", np.dtype(np.int64), 1))
# an OM of a graph ending in candidates (a bring-your-own graph): `scores` rows hold the classes, as
# many rows as `boxes` (0: the row width is read from the boxes); NMS then runs on the host
CANDIDATE_OUTPUTS = {
    "boxes": ("boxes", np.dtype(np.float32), 4),
    "scores": ("scores", np.dtype(np.float32), 0),
}
OutputSpec = tuple[tuple[str, np.dtype, int], ...]
MAX_DEVICE = 255
_NUMBER = r"([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)"


@dataclass
class ToolTiming:
    """What a tool reported about speed: its mean time per inference and whatever else it gives."""

    mean_ms: float
    mean_without_first_ms: float | None = None
    per_input_ms: list[float] = field(default_factory=list)
    extra_ms: dict[str, float] = field(default_factory=dict)
    tool_fps: float | None = None


@dataclass
class ToolRun:
    """One finished, validated tool run over an input directory."""

    run_dir: Path
    files: dict[str, list[Path]]  # input stem -> one file per model output, in output order
    timing: ToolTiming
    process: ProcessResult


@dataclass(frozen=True)
class OmBatch:
    """The batch an OM was converted for: `static` (-1 when dynamic) and its dynamic batch sizes."""

    static: int
    dynamic: tuple[int, ...] = ()
    source: str = ""

    def describe(self) -> str:
        if self.dynamic:
            return f"dynamic batch sizes {list(self.dynamic)}"
        return f"static batch {self.static} (no dynamic batch sizes)"


@dataclass(frozen=True)
class OmInput:
    """The input an OM was converted for, as the tool must be fed it: dtype, layout, size, batch."""

    dtype: str
    layout: str
    height: int
    width: int
    batch: OmBatch

    def describe(self) -> str:
        return f"{self.dtype} {self.layout} {self.height}x{self.width}, {self.batch.describe()}"


def _om_meta(om_path: Path, om_sha256: str) -> tuple[dict[str, Any], str] | None:
    """(the `convert.json` beside the OM, its path) when it describes this very file, else None."""
    meta_path = om_path.parent / CACHE_META
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("om_sha256") != om_sha256:
        return None
    return meta, str(meta_path)


def _batch_of(meta: dict[str, Any], source: str) -> OmBatch | None:
    try:
        static = int(meta["input_shape"][0])
        dynamic = tuple(int(b) for b in meta.get("dynamic_batch_sizes") or ())
    except (ValueError, KeyError, TypeError, IndexError):
        return None
    return OmBatch(static, dynamic, source)


def om_batch(om_path: Path, om_sha256: str) -> OmBatch | None:
    """The OM's batch from the `convert.json` beside it (the convert step's output folder, or the cache
    entry): its input shape's batch and dynamic batch sizes; None when there is none or it describes
    another file."""
    found = _om_meta(om_path, om_sha256)
    return None if found is None else _batch_of(*found)


def om_outputs(om_path: Path, om_sha256: str) -> OutputSpec:
    """The OM's outputs in file order: `boxes` + `scores` when its `convert.json` records a candidate
    graph's output names, else `dets` + `labels` (every exported Ascend graph)."""
    found = _om_meta(om_path, om_sha256)
    names = found[0].get("output_names") if found is not None else None
    if isinstance(names, list) and sorted(names) == sorted(CANDIDATE_OUTPUTS):
        return tuple(CANDIDATE_OUTPUTS[name] for name in names)
    return OUTPUTS


def _atc_option(meta: dict[str, Any], name: str) -> str | None:
    prefix = f"--{name}="
    return next((a[len(prefix) :] for a in meta.get("atc_args") or () if str(a).startswith(prefix)), None)


def om_input(om_path: Path, om_sha256: str) -> OmInput | None:
    """The OM's input from its `convert.json` (None when there is none for this file, see `om_batch`).

    uint8 inputs (static AIPP, or a uint8 graph) are fed NHWC, float32 ones in the ONNX input's
    format. A cache entry's `convert.json` lacks `input_dtype` / `input_format`: they are read from
    its atc arguments (an AIPP config or an NHWC input means uint8)."""
    found = _om_meta(om_path, om_sha256)
    batch = None if found is None else _batch_of(*found)
    if found is None or batch is None:
        return None
    meta = found[0]
    fmt = meta.get("input_format") or _atc_option(meta, "input_format") or "NCHW"
    dtype = meta.get("input_dtype") or (
        "uint8" if fmt == "NHWC" or _atc_option(meta, "insert_op_conf") else "float32"
    )
    try:
        dims = [int(d) for d in meta["input_shape"]]
        height, width = (dims[1], dims[2]) if fmt == "NHWC" else (dims[2], dims[3])
    except (ValueError, TypeError, IndexError):
        return None
    layout = "NHWC" if dtype == "uint8" else fmt
    return OmInput(str(dtype), layout, height, width, batch)


def check_device(device: object) -> int:
    if isinstance(device, bool) or not isinstance(device, int | str):
        raise BackendError(f"device id {device!r} must be an integer 0..{MAX_DEVICE}")
    try:
        value = int(device)
    except ValueError:
        raise BackendError(f"device id {device!r} must be an integer 0..{MAX_DEVICE}") from None
    if not 0 <= value <= MAX_DEVICE:
        raise BackendError(f"device id {value} is out of range: Ascend tools accept 0..{MAX_DEVICE}")
    return value


class AscendToolBackend(Backend):
    """Common code of the process-tool backends; subclasses describe their tool's contract."""

    outfmts: tuple[str, ...] = ("BIN", "TXT")
    success_marker: re.Pattern[str]
    success_hint: str  # the success line in words, for error messages
    run_dir_pattern: re.Pattern[str]
    # True when the tool groups `batch_size` one-image input files into one inference
    file_batching = False
    no_file_batching_reason = ""

    def __init__(
        self,
        model: str | os.PathLike[str],
        *,
        device: int = 0,
        outfmt: str = "BIN",
        set_env: str | os.PathLike[str] | None = None,
        batch_size: int = 1,
        chips: int = 1,
        dym_batch: bool | None = None,
        timeout_s: float | None = None,
        keep_raw: bool = False,
        handle: ProcessHandle | None = None,
    ) -> None:
        self.om_path = check_safe_path(model, "OM model path", ",")
        if self.om_path.suffix != ".om":
            raise BackendError(
                f"OM model path {str(self.om_path)!r} must end in .om; pass the file atc wrote"
            )
        self.device = check_device(device)
        if outfmt not in self.outfmts:
            raise BackendError(
                f"outfmt {outfmt!r} is not supported by {self.name}; use one of {', '.join(self.outfmts)}"
            )
        self.outfmt = outfmt
        self.check_batch_size(batch_size)
        if isinstance(chips, bool) or not isinstance(chips, int) or chips < 1:
            raise BackendError(f"chips must be >= 1, got {chips}")
        self.batch_size = batch_size
        self.chips = chips
        self.dym_batch = dym_batch  # None: decided from the OM's convert.json (see dym_batch_value)
        self.set_env = set_env
        self.timeout_s = timeout_s
        self.keep_raw = keep_raw
        self.handle = handle or ProcessHandle()
        self._outputs: OutputSpec | None = None

    @property
    def outputs(self) -> OutputSpec:
        """(name, dtype, values per row) of each output file, from the OM's `convert.json`."""
        if self._outputs is None:
            self._outputs = om_outputs(self.om_path, self.model_sha256)
        return self._outputs

    @property
    def kind(self) -> str:  # type: ignore[override]
        """What outputs.npz holds: "dets" (NMS in the graph) or "candidates" (NMS on the host)."""
        return "candidates" if self.outputs[0][0] in CANDIDATE_OUTPUTS else "dets"

    @classmethod
    def check_batch_size(cls, batch_size: object) -> None:
        """The tool's batch rule (the one place it is written): >= 1, and 1 without file batching."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise BackendError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if batch_size != 1 and not cls.file_batching:
            raise BackendError(
                f"{cls.name} batch_size must be 1 (got {batch_size}): {cls.no_file_batching_reason}"
            )

    # --- tool contract (subclasses) -------------------------------------------------------------
    def command(self, env: CannEnv) -> list[str]:
        """The tool's executable (and module) as resolved in the CANN environment."""
        raise NotImplementedError

    def dym_batch_value(self) -> int | None:
        """The `--dymBatch` to pass (None: none), checked against what the OM was converted for.

        `dym_batch=None` (auto): pass it when the OM has dynamic batch sizes, not when it has a
        static batch, and, when the OM's batch is unknown (no matching convert.json), only for
        batch_size > 1. True / False force it on / off; both are checked when the batch is known."""
        known = om_batch(self.om_path, self.model_sha256)
        where = f"OM {str(self.om_path)!r}"
        if known is None:
            wanted = self.dym_batch if self.dym_batch is not None else self.batch_size > 1
            return self.batch_size if wanted else None
        if known.dynamic:
            if self.batch_size not in known.dynamic:
                raise BackendError(
                    f"batch_size {self.batch_size} is not one of the {where}'s {known.describe()}; use one "
                    f"of them or re-convert with dynamic_batch_sizes including {self.batch_size}"
                )
            if self.dym_batch is False:
                raise BackendError(
                    f"{where} has {known.describe()}, so {self.name} needs --dymBatch; leave dym_batch "
                    "unset (auto) or set it true"
                )
            return self.batch_size
        if self.batch_size != known.static:
            raise BackendError(
                f"batch_size {self.batch_size} does not match the {where}'s {known.describe()}; re-convert "
                f"with dynamic_batch_sizes including {self.batch_size} (from an ONNX exported with "
                f"dynamic_batch=True) or use batch_size {known.static}"
            )
        if self.dym_batch:
            raise BackendError(
                f"dym_batch is set but the {where} has {known.describe()}; --dymBatch would be rejected. "
                "Leave dym_batch unset or re-convert with dynamic_batch_sizes"
            )
        return None

    def argv(
        self, env: CannEnv, input_dir: Path, output_dir: Path, dym_batch: int | None = None
    ) -> list[str]:
        """The tool's argument list; msame and ais_bench share these flags."""
        argv = [
            *self.command(env),
            "--model",
            str(self.om_path),
            "--input",
            str(input_dir),
            "--output",
            str(output_dir),
            "--outfmt",
            self.outfmt,
            "--device",
            str(self.device),
        ]
        if dym_batch is not None:
            argv += ["--dymBatch", str(dym_batch)]
        return argv

    def output_file_name(self, stem: str, index: int) -> str:
        raise NotImplementedError

    def parse_timing(self, result: ProcessResult, output_dir: Path, before: set[str]) -> ToolTiming:
        raise NotImplementedError

    def check_timing(self, timing: ToolTiming, inputs: int) -> None:
        """Hook: checks of the reported timing against the number of inputs (none by default)."""

    def failure(self, result: ProcessResult) -> BackendError:
        errors = [line for line in result.lines if "[ERROR]" in line or "Error" in line][:10]
        shown = "\n  ".join(errors) if errors else "(no [ERROR] lines)"
        if any("load model" in line for line in errors):
            fix = (
                f"the OM {str(self.om_path)!r} is damaged or not for this CANN / SoC: convert the ONNX again"
            )
        else:
            fix = "check the device (npu-smi info), the CANN environment (set_env.sh) and the tool log"
        return BackendError(
            f"{self.name} did not report success (exit {result.returncode}, no {self.success_hint!r} line):"
            f"\n  {shown}\n{fix}. Last output:\n{result.tail(15)}"
        )

    # --- shared code path ------------------------------------------------------------------------
    @property
    def extension(self) -> str:
        return self.outfmt.lower()

    def default_timeout(self, images: int) -> float:
        return self.timeout_s if self.timeout_s is not None else 300.0 + 10.0 * images

    def run_tool(self, input_dir: Path, output_dir: Path, stems: list[str]) -> ToolRun:
        """Run the tool over `input_dir` into `output_dir` and validate what it left (see module doc)."""
        if not self.om_path.is_file():
            raise BackendError(f"OM model {str(self.om_path)!r} does not exist; run the convert step first")
        check_safe_path(input_dir, "input directory", ",")
        check_safe_path(output_dir, "tool output directory", ",")
        dym_batch = self.dym_batch_value()
        env = load_cann_env(self.set_env)
        output_dir.mkdir(parents=True, exist_ok=True)
        before = set(os.listdir(output_dir))
        result = run_tool(
            self.argv(env, input_dir, output_dir, dym_batch),
            env=env.environ(),
            name=self.name,
            timeout_s=self.default_timeout(len(stems)),
            handle=self.handle,
        )
        if not any(self.success_marker.search(line) for line in result.lines) or result.returncode != 0:
            raise self.failure(result)
        run_dir = self.find_run_dir(output_dir, before, result)
        files = self.match_outputs(run_dir, stems)
        timing = self.parse_timing(result, output_dir, before)
        self.check_timing(timing, len(stems))
        return ToolRun(run_dir, files, timing, result)

    def find_run_dir(self, output_dir: Path, before: set[str], result: ProcessResult) -> Path:
        """The one run folder this run created (earlier runs' folders are ignored)."""
        new = sorted(
            name
            for name in set(os.listdir(output_dir)) - before
            if (output_dir / name).is_dir() and self.run_dir_pattern.match(name)
        )
        if len(new) > 1:  # prefer the folder the tool printed
            printed = [name for name in new if any(line.rstrip("/").endswith(name) for line in result.lines)]
            new = printed if len(printed) == 1 else new
        if len(new) != 1:
            ignored = sorted(before)
            raise BackendError(
                f"{self.name} run should create exactly one output folder in {str(output_dir)!r}, found "
                f"{new or 'none'} (ignored, present before the run: {ignored[:5]}); check the tool log:\n"
                f"{result.tail(10)}"
            )
        return output_dir / new[0]

    def match_outputs(self, run_dir: Path, stems: list[str]) -> dict[str, list[Path]]:
        """Exactly one file per input per model output; missing or extra files are named."""
        expected = {
            self.output_file_name(stem, i): (stem, i) for stem in stems for i in range(len(self.outputs))
        }
        present = {p.name for p in run_dir.iterdir() if p.is_file()}
        missing = sorted(set(expected) - present)
        extra = sorted(present - set(expected))
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"missing {len(missing)} file(s): {missing[:8]}")
            if extra:
                parts.append(f"unexpected {len(extra)} file(s): {extra[:8]}")
            raise BackendError(
                f"{self.name} output folder {str(run_dir)!r} does not hold exactly one file per input per "
                f"output ({len(stems)} inputs x {len(self.outputs)} outputs): {'; '.join(parts)}; the tool "
                "stopped early or the OM's outputs are not the model's (dets, labels): check the tool log "
                "and convert the Ascend ONNX again"
            )
        files: dict[str, list[Path]] = {stem: [Path()] * len(self.outputs) for stem in stems}
        for name, (stem, index) in expected.items():
            files[stem][index] = run_dir / name
        return files

    def read_output(self, path: Path, index: int) -> np.ndarray:
        """One image's output `index`: (rows, width) for a width > 1, else flat (labels; scores, whose
        rows `read_outputs` takes from the boxes)."""
        name, dtype, width = self.outputs[index]
        try:
            if self.outfmt == "BIN":
                size = path.stat().st_size
                if not size or size % (max(width, 1) * dtype.itemsize):
                    raise BackendError(
                        f"{path.name}: {size} bytes, expected rows of {max(width, 1)} x {dtype} "
                        f"({max(width, 1) * dtype.itemsize} bytes each, e.g. "
                        f"{MAX_PER_IMG * max(width, 1) * dtype.itemsize} "
                        f"for {MAX_PER_IMG} rows) for output {name!r}; the OM's outputs differ from the "
                        "exported Ascend graph"
                    )
                values = np.fromfile(path, dtype=dtype)
            elif self.outfmt == "NPY":
                values = np.load(path, allow_pickle=False).reshape(-1)
            else:
                values = np.loadtxt(path, dtype=np.float64, ndmin=1).reshape(-1)
        except (OSError, ValueError) as exc:
            raise BackendError(f"cannot read {self.name} output {str(path)!r}: {exc}") from exc
        if not values.size or values.size % max(width, 1):
            raise BackendError(
                f"{path.name} holds {values.size} values, expected rows of {max(width, 1)} for output "
                f"{name!r} (one image, e.g. {MAX_PER_IMG * max(width, 1)} for {MAX_PER_IMG} rows)"
            )
        return values.astype(dtype).reshape((-1, width) if width > 1 else (-1,))

    def stage_inputs(
        self, layout: RunLayout, manifest: Manifest, shard: str, attempt: Path
    ) -> tuple[Path, list[int]]:
        """The directory to feed the tool: the shard directory itself when it holds exactly the
        shard's inputs, else a directory of links to them (the tools read every file given)."""
        ids = manifest.shards.get(shard)
        if ids is None:
            raise DatasetError(f"shard {shard!r} is not in manifest {str(manifest.path)!r}")
        if not ids:
            raise DatasetError(f"shard {shard!r} of manifest {str(manifest.path)!r} has no images")
        source = manifest.input_dir(shard)
        names = [input_file_name(i) for i in ids]
        for name in names:
            path = source / name
            if not path.is_file():
                raise DatasetError(f"preprocessed input {str(path)!r} is missing; re-run preprocessing")
            if path.stat().st_size != manifest.bytes_per_image:
                raise DatasetError(
                    f"preprocessed input {str(path)!r} has {path.stat().st_size} bytes, expected "
                    f"{manifest.bytes_per_image} for {manifest.dtype} {manifest.input_shape()[1:]}"
                )
        if sorted(os.listdir(source)) == sorted(names):
            return source, ids
        staged = attempt / "input"
        staged.mkdir(parents=True)
        for name in names:
            (staged / name).symlink_to((source / name).resolve())
        log.info("shard %s: input folder holds other files; feeding %d linked inputs", shard, len(names))
        return staged, ids

    @cached_property
    def model_sha256(self) -> str:
        if not self.om_path.is_file():
            raise BackendError(f"OM model {str(self.om_path)!r} does not exist; run the convert step first")
        return sha256_file(self.om_path)

    def marker(self, manifest: Manifest, shard: str) -> dict[str, Any]:
        # the NMS runs inside the OM (BatchMultiClassNMS with the thresholds of the export)
        return {
            **super().marker(manifest, shard),
            "model_sha256": self.model_sha256,
            "postprocess": {"nms": "graph"},
        }

    def reuse(self, layout: RunLayout, manifest: Manifest, shard: str) -> ShardResult | None:
        """Finished outputs count only if they came from this very OM (a re-converted model reruns)."""
        marker = shard_done(layout.output_shard(self.name, shard))
        if marker is None or marker.get("model_sha256") != self.model_sha256:
            return None
        return super().reuse(layout, manifest, shard)

    def check_input(self, manifest: Manifest) -> None:
        """The run's input (manifest dtype, layout, height, width; `batch_size`) against the OM's
        recorded one (`om_input`), before the tool runs: the tools compare byte counts only, so e.g.
        uint8 640x640 (1228800 bytes) on a float32 320x320 OM would run, exit 0 and score AP 0."""
        known = om_input(self.om_path, self.model_sha256)
        run = f"{manifest.dtype} {manifest.layout} {manifest.input_height}x{manifest.input_width}"
        if known is None:
            log.warning(
                "OM %s has no matching %s beside it: the run's input (%s) cannot be checked against it",
                self.om_path,
                CACHE_META,
                run,
            )
            return
        fed = (manifest.dtype, manifest.layout, manifest.input_height, manifest.input_width)
        if fed != (known.dtype, known.layout, known.height, known.width):
            raise OmInputMismatchError(
                f"the run's input ({run}, batch {self.batch_size}; manifest {str(manifest.path)!r}) does not "
                f"match the input of OM {str(self.om_path)!r} ({known.describe()}; {known.batch.source}): "
                f"{self.name} would read the bytes as another tensor and score garbage. Convert the OM "
                "from this run's export (same dtype, height and width), or preprocess for the OM's input"
            )

    def infer_shard(self, layout: RunLayout, manifest: Manifest, shard: str) -> ShardResult:
        self.check_input(manifest)
        reused = self.reuse(layout, manifest, shard)
        if reused is not None:
            return reused
        out_dir = layout.output_shard(self.name, shard)
        raw_root = out_dir / "raw"
        shutil.rmtree(raw_root, ignore_errors=True)  # leftovers of failed attempts
        attempt = raw_root / f"attempt-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
        attempt.mkdir(parents=True)
        input_dir, ids = self.stage_inputs(layout, manifest, shard, attempt)
        stems = [input_file_name(i).removesuffix(".bin") for i in ids]
        run = self.run_tool(input_dir, attempt / "out", stems)
        arrays = read_outputs(self, run.files, stems)
        summary = self.summary(run, len(ids))
        write_json(
            layout.timing_file(self.name, shard),
            {
                "latencies_ms": run.timing.per_input_ms,
                "batch_size": self.batch_size,
                "summary": summary,
                "argv": run.process.argv,
                "tool_seconds": round(run.process.duration_s, 3),
            },
        )
        write_shard_outputs(out_dir, np.asarray(ids), arrays, self.kind, self.marker(manifest, shard))
        if not self.keep_raw:
            shutil.rmtree(raw_root, ignore_errors=True)
        log.info(
            "shard %s: %d images, %.2f ms mean, %.2f fps", shard, len(ids), run.timing.mean_ms, summary["fps"]
        )
        return shard_result(self.name, shard, len(ids), out_dir, summary, self.kind, reused=False)

    def summary(self, run: ToolRun, images: int) -> dict[str, Any]:
        timing = run.timing
        if not timing.mean_ms > 0:
            raise BackendError(f"{self.name} reported a non-positive mean time {timing.mean_ms} ms")
        latency: dict[str, float | None] = {
            "mean": timing.mean_ms,
            "mean_without_first": timing.mean_without_first_ms,
        }
        if timing.per_input_ms:
            stats = latency_stats(timing.per_input_ms)
            latency.update({k: v for k, v in stats.items() if k != "mean"})
        latency.update(timing.extra_ms)
        return {
            "fps": self.chips * 1000.0 * self.batch_size / timing.mean_ms,
            "fps_formula": "chips * 1000 * batch / mean_ms",
            "latency_per": "inference of batch_size images",
            "latency_ms": latency,
            "batch_size": self.batch_size,
            "inferences": math.ceil(images / self.batch_size),
            "chips": self.chips,
            "images": images,
            "device": self.device,
            "tool": self.name,
            "tool_reported_fps": timing.tool_fps,
        }


class MsameBackend(AscendToolBackend):
    """`msame --model <om> --input <dir> --output <dir> --outfmt BIN|TXT --device N`."""

    name = "msame"
    outfmts = ("BIN", "TXT")
    no_file_batching_reason = (
        "msame feeds each input file as one whole inference and has no file batching, while the "
        "preprocessed inputs hold one image per .bin; use tool 'ais_bench' for batch N (it groups N "
        "files per inference) or keep batch 1 for msame"
    )
    success_marker = re.compile(r"\[INFO\]\s+(?:pid:\s*\d+\s+)?Execute sample success")
    success_hint = "[INFO] Execute sample success"
    # 20210622_114034 (<= 2021-08) or 2022827_9_5_3_123456 (unpadded, newer)
    run_dir_pattern = re.compile(r"^(?:2\d{7}_\d{6}|2\d{5,7}_\d{1,2}_\d{1,2}_\d{1,2}_\d{1,6})$")
    timing_line = re.compile(r"Inference average time( without first time)?\s*:\s*" + _NUMBER + r"\s*ms")
    per_input_line = re.compile(r"^Inference time\s*:\s*" + _NUMBER + r"\s*ms")
    not_om = "input model file type is not .om"

    def command(self, env: CannEnv) -> list[str]:
        return [env.require_tool("msame")]

    def output_file_name(self, stem: str, index: int) -> str:
        return f"{stem}_output_{index}.{self.extension}"

    def failure(self, result: ProcessResult) -> BackendError:
        if any(self.not_om in line for line in result.lines):
            return BackendError(
                f"msame rejected the model {str(self.om_path)!r}: '[ERROR] {self.not_om}' (msame exits "
                f"{result.returncode} even so); pass the .om file written by atc"
            )
        return super().failure(result)

    def parse_timing(self, result: ProcessResult, output_dir: Path, before: set[str]) -> ToolTiming:
        mean = without_first = None
        for line in result.lines:
            if "Inference average time" not in line:
                continue
            match = self.timing_line.search(line)
            if match is None:
                raise BackendError(
                    f"cannot parse msame timing line {line.strip()!r}; expected 'Inference average time : "
                    "<number> ms' (a NaN time: the model did not run on the device; check the msame log "
                    "and npu-smi info)"
                )
            if match.group(1):
                without_first = float(match.group(2))
            else:
                mean = float(match.group(2))
        if mean is None:
            raise BackendError(
                f"msame printed no 'Inference average time' line, so no performance can be reported:\n"
                f"{result.tail(10)}"
            )
        per_input = [
            float(m.group(1)) for line in result.lines if (m := self.per_input_line.match(line.strip()))
        ]
        return ToolTiming(mean, without_first, per_input)


def read_outputs(
    backend: AscendToolBackend, files: dict[str, list[Path]], stems: list[str]
) -> dict[str, np.ndarray]:
    """Every image's outputs stacked: dets (N, R, 5) + labels (N, R), or boxes (N, K, 4) + scores
    (N, K, C); every image with the same rows, and the two outputs of an image too."""
    arrays: dict[str, np.ndarray] = {}
    for index, (name, _, _) in enumerate(backend.outputs):
        per_image = [backend.read_output(files[stem][index], index) for stem in stems]
        rows = {len(values) for values in per_image}
        if len(rows) > 1:
            raise BackendError(f"output {name!r} has different row counts across images: {sorted(rows)}")
        arrays[name] = np.stack(per_image)
    first, second = (arrays[name] for name, _, _ in backend.outputs)
    if "boxes" in arrays:
        first, second = arrays["boxes"], arrays["scores"]
        if second.shape[1] % max(first.shape[1], 1):
            raise BackendError(
                f"scores hold {second.shape[1]} values per image, not a multiple of the {first.shape[1]} "
                "boxes; the OM's outputs differ from the exported graph"
            )
        arrays["scores"] = second = second.reshape(len(second), first.shape[1], -1)
    if first.shape[1] != second.shape[1]:
        names = [name for name, _, _ in backend.outputs]
        raise BackendError(
            f"{names[0]} has {first.shape[1]} rows per image but {names[1]} {second.shape[1]}; "
            "the OM's outputs differ from the exported graph"
        )
    return arrays
