"""Where a run keeps its artifacts, and the one output layout every backend writes.

Run directory (`<base>/<dag_id>/<run_id>/`, or any directory for the CLI):

    run.json                   dag/run ids, creation time, the validated options, the model spec
    uses/<kind>-<key>          the cache entries (`<work_dir>/cache/<kind>/<key>/`) the run used
    model/                     <name>.om + convert.json; <name>_<variant>.onnx only when the ONNX
                               cache is off (else the graph stays in the cache); <name> is the
                               model spec's `om_name` (gfocal for GFocalV2)
    manifest.json              see `gfocal_pipeline.manifest`; its `inputs_root` points into the
                               inputs cache (no copy here)
    inputs/<shard>/<image_id:012d>.bin   only for `gfocal preprocess` without a cache; with the
                               DAGs' inputs cache off each inference task builds its shard in
                               `inputs/<backend>/<shard>/` and deletes it when done
    outputs/<backend>/<shard>/outputs.npz + done.json (+ candidates.npz with keep_candidates)
    timing/<backend>/<shard>.json
    .locks/<step>.lock         held while a step writes (a second writer fails fast naming the holder)
    eval/<backend>/detections.json, stats.json, per_class.csv
    summary.json               (+ pruned.json once retention pruned the run to its small results)
    variants/<name>/           a models file entry's variant: its model/, outputs/, timing/, eval/;
                               one that changes the inputs also has its run.json, manifest.json,
                               inputs/ and uses/ (`RunLayout.run_root`)

Shared output layout (`outputs/<backend>/<shard>/`):
    outputs.npz  `image_ids` int64 (N,) plus one array per output, first axis = image. Every
                 backend writes kind "dets": `dets` float32 (N,max_per_img,5) x1,y1,x2,y2,score in
                 input pixels, `labels` int64 (N,max_per_img), padding rows score 0 / label -1 (the
                 in-process backends run the host NMS per batch; the Ascend graph has it inside).
                 Kind "candidates" (`boxes` (N,K,4), `scores` (N,K,80)) is still read by evaluation
                 (older outputs); `candidates.npz` holds them when `keep_candidates` is on.
    done.json    written last: {"backend", "shard", "kind", "output_names", "images", "policy",
                 "dtype", "input_height", "input_width", "shard_digest", "manifest_sha256",
                 "postprocess", "model_kind", model identity}; a shard without it is not finished
                 and is recomputed on retry; one whose shard_digest differs from the manifest's is
                 stale (an image changed) and is recomputed, the others are reused.
"""

from __future__ import annotations

import json
import logging
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gfocal_pipeline.errors import DatasetError
from gfocal_pipeline.fileio import atomic_path, read_state_json, read_state_npz, write_json

if TYPE_CHECKING:  # numpy loads with the steps that read and write arrays, not with a DAG file
    import numpy as np

log = logging.getLogger(__name__)

OUTPUTS_FILE = "outputs.npz"
DONE_FILE = "done.json"
KINDS = {"candidates": ("boxes", "scores"), "dets": ("dets", "labels")}


def shard_name(index: int) -> str:
    return f"{index:05d}"


def input_file_name(image_id: int) -> str:
    return f"{int(image_id):012d}.bin"


OM_NAME = "gfocal"  # the OM's name when the run records no model (runs made before model adapters)


VARIANTS_DIR = "variants"  # <run>/variants/<name>/: one folder per variant of a zoo entry's night


def om_cache_dir(work_dir: str | Path) -> Path:
    """The OM cache of a work directory (shared by its runs, so an unchanged model converts once)."""
    return Path(work_dir) / "cache" / "om"


@dataclass(frozen=True)
class RunLayout:
    """Every path inside one run directory (see the module docstring)."""

    root: Path

    @classmethod
    def at(cls, root: str | Path) -> RunLayout:
        return cls(Path(root))

    def variant(self, name: str) -> RunLayout:
        """The folder of variant `name` of this run (`variants/<name>/`): its own OM, outputs,
        timing and evaluation; the run's manifest, inputs, run.json and uses/ are shared, unless the
        variant owns its inputs (a `run.json` of its own there: see `run_root`)."""
        return RunLayout(self.run_root / VARIANTS_DIR / name)

    @property
    def run_folder(self) -> Path:
        """The run directory this folder belongs to: `root`, or for a variant's folder its run."""
        parent = self.root.parent
        if parent.name == VARIANTS_DIR and (parent.parent / "run.json").is_file():
            return parent.parent
        return self.root

    @property
    def run_root(self) -> Path:
        """Where this folder's run.json, manifest, inputs and cache uses are: the run's (`run_folder`),
        or for a variant that changes the inputs (height, dtype, ...: it has a `run.json` of its own)
        its own folder."""
        return self.root if (self.root / "run.json").is_file() else self.run_folder

    @property
    def model_dir(self) -> Path:
        return self.root / "model"

    def onnx(self, variant: str) -> Path:
        """The exported graph of `variant` (portable or ascend): `<om_name>_<variant>.onnx`, the model
        spec's name (gfocal_portable.onnx for GFocalV2 and for runs that record no model)."""
        return self.model_dir / f"{self.om_name()}_{variant}.onnx"

    @property
    def om(self) -> Path:
        """The converted OM (written beside its convert.json), `<model's om_name>.om`."""
        return self.model_dir / f"{self.om_name()}.om"

    def recorded_model(self) -> dict[str, Any]:
        """The model spec `prepare` recorded in `run.json` ({} for a run without one: the CLI's, or
        one made before model adapters; GFocalV2's facts apply there)."""
        try:
            recorded = json.loads(self.run_json.read_text(encoding="utf-8")).get("model")
        except (OSError, ValueError, AttributeError):
            return {}
        return recorded if isinstance(recorded, dict) else {}

    def om_name(self) -> str:
        """The OM's name from the recorded model spec (`OM_NAME` when there is none)."""
        recorded = self.recorded_model().get("om_name")
        return (
            recorded
            if isinstance(recorded, str) and re.fullmatch(r"[A-Za-z0-9_-]{1,60}", recorded)
            else OM_NAME
        )

    @property
    def manifest(self) -> Path:
        return self.run_root / "manifest.json"

    @property
    def inputs_dir(self) -> Path:
        return self.run_root / "inputs"

    def input_shard(self, shard: str) -> Path:
        return self.inputs_dir / shard

    def output_shard(self, backend: str, shard: str) -> Path:
        return self.root / "outputs" / backend / shard

    def outputs_dir(self, backend: str) -> Path:
        return self.root / "outputs" / backend

    def timing_dir(self, backend: str) -> Path:
        return self.root / "timing" / backend

    def timing_file(self, backend: str, shard: str) -> Path:
        return self.timing_dir(backend) / f"{shard}.json"

    def eval_dir(self, backend: str) -> Path:
        return self.root / "eval" / backend

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def run_json(self) -> Path:
        """Written by the run's first task: ids, creation time, options (what retention orders by)."""
        return self.run_root / "run.json"

    @property
    def uses_dir(self) -> Path:
        """One file `<kind>-<key>` per cache entry the run uses (retention never evicts those of a
        run in progress; the summary lists which were reused)."""
        return self.run_root / "uses"


def write_shard_outputs(
    out_dir: Path,
    image_ids: np.ndarray,
    arrays: dict[str, np.ndarray],
    kind: str,
    marker: dict[str, Any],
) -> Path:
    """Write one shard's outputs in the shared layout: `outputs.npz` atomically, then `done.json`."""
    import numpy as np

    if kind not in KINDS:
        raise ValueError(f"unknown output kind {kind!r}; expected one of {sorted(KINDS)}")
    missing = [name for name in KINDS[kind] if name not in arrays]
    if missing:
        raise DatasetError(f"outputs of kind {kind!r} need arrays {KINDS[kind]}, missing {missing}")
    image_ids = np.asarray(image_ids, dtype=np.int64)
    for name, array in arrays.items():
        if len(array) != len(image_ids):
            raise DatasetError(
                f"output {name!r} has {len(array)} rows for {len(image_ids)} images in {str(out_dir)!r}"
            )
    out_dir.mkdir(parents=True, exist_ok=True)
    done = out_dir / DONE_FILE
    done.unlink(missing_ok=True)
    with atomic_path(out_dir / OUTPUTS_FILE) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, image_ids=image_ids, **arrays)
    write_json(done, {**marker, "kind": kind, "output_names": list(KINDS[kind]), "images": len(image_ids)})
    return out_dir


def shard_done(out_dir: Path) -> dict[str, Any] | None:
    """The done marker of a finished shard, or None when the shard must be (re)computed: no marker,
    or a marker or outputs file that a killed writer or a full disk left damaged (logged)."""
    if not (out_dir / OUTPUTS_FILE).is_file():
        return None
    marker = read_state_json(out_dir / DONE_FILE, "done marker")
    if not isinstance(marker, dict) or not isinstance(marker.get("images"), int):
        if marker is not None:
            log.warning("done marker %s is not a marker; recomputing the shard", out_dir / DONE_FILE)
        return None
    import numpy as np

    try:  # the zip directory is at the end: a truncated or overwritten file fails here
        with np.load(out_dir / OUTPUTS_FILE, allow_pickle=False) as data:
            complete = "image_ids" in data.files
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        log.warning("outputs %s are damaged (%s); recomputing the shard", out_dir / OUTPUTS_FILE, exc)
        return None
    return marker if complete else None


def read_shard_outputs(out_dir: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(done marker, arrays) of a finished shard; a clear error if it is not finished or damaged."""
    marker = shard_done(out_dir)
    arrays = read_state_npz(out_dir / OUTPUTS_FILE, "outputs") if marker is not None else None
    if marker is None or arrays is None:
        raise DatasetError(
            f"shard outputs {str(out_dir)!r} are missing, unfinished or damaged; run inference of that "
            "shard again (a retried infer task redoes exactly the shards not complete)"
        )
    return marker, arrays
