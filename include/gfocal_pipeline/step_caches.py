"""What a nightly reuses from `<work_dir>/cache/`: preprocessed inputs, exported graphs, the reference.

Each function below computes the entry's key from the content it depends on (never from paths or
times), builds it through `cache_store.CacheEntry.get_or_build` when absent, and notes the use in the
run directory (`uses/<kind>-<key>`, a small JSON saying whether it was reused). Keys:

- `inputs`:    every image file's sha256 (with its id and name), the annotation file's sha256,
               policy, dtype, input size, shard size, skip_bad_images, the pixel budget
               (max_pixels), the preprocessing version. Its files are recorded with a CRC-32 each
               and checked on reuse (`cache_store.VERIFY_MODES`); the ONNX and reference entries with a
               sha256 each.
- `onnx`:      checkpoint sha256, variant, input size, dtype/normalization, batch mode, opset,
               torch + onnx versions, the parity limits, the export version.
- `reference`: one entry per shard: checkpoint sha256, the shard's digest (its images' hashes and
               geometry + the input format), torch version, device type, batch size and the NMS
               thresholds. A changed image re-runs the reference of its shard only.

Bump a `*_VERSION` when a change of code changes what an entry would hold.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gfocal_pipeline.cache_store import CRC32, SHA256, VERIFY_MODES, Cache, CacheEntry
from gfocal_pipeline.constants import DEFAULT_MAX_PIXELS
from gfocal_pipeline.errors import CheckpointError, GfocalError
from gfocal_pipeline.fileio import atomic_path, sha256_file, write_json
from gfocal_pipeline.layout import DONE_FILE, RunLayout
from gfocal_pipeline.manifest import MANIFEST_VERSION, Manifest, load_manifest
from gfocal_pipeline.pixels import DEFAULT_PIXELS
from gfocal_pipeline.sharding import ShardPlan, resolve_shard_size

if TYPE_CHECKING:
    from gfocal_pipeline.dataset import CocoDataset

log = logging.getLogger(__name__)

# 2: truncated images are refused (or skipped), not preprocessed; 3: the pixel budget, and a CRC-32
# of every input in the record (older entries are never reused, nor linked from: not verifiable)
PREPROCESS_VERSION = 3
EXPORT_VERSION = 1
REFERENCE_VERSION = 1
KINDS = ("inputs", "onnx", "reference")


def note_use(run_dir: str | Path, entry: CacheEntry, cached: bool, **facts: Any) -> None:
    """Record in the run directory that it uses `entry` (and whether it was reused)."""
    note_key_use(run_dir, entry.kind, entry.key, cached, **facts)


def note_key_use(run_dir: str | Path, kind: str, key: str, cached: bool, **facts: Any) -> None:
    """`note_use` of the entry `kind`/`key` (e.g. the OM cache's, which `backends.atc` builds):
    `uses/<kind>-<key>`, so `gc` never evicts it while the run is in use."""
    uses = RunLayout.at(run_dir).uses_dir
    uses.mkdir(parents=True, exist_ok=True)
    write_json(uses / f"{kind}-{key}", {"kind": kind, "key": key, "cached": cached, **facts})
    log.info("%s cache entry %s: %s", kind, key[:16], "reused" if cached else "built")


def uses(run_dir: str | Path) -> list[dict[str, Any]]:
    """The cache uses noted in a run directory (see `note_use`)."""
    folder = RunLayout.at(run_dir).uses_dir
    found = []
    for path in sorted(folder.glob("*-*")) if folder.is_dir() else []:
        try:
            found.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return found


def reuse_summary(run_dir: str | Path) -> dict[str, dict[str, int]]:
    """{kind: {"reused": n, "built": m}} over a run's cache uses (the summary's "cache" block)."""
    counts: dict[str, dict[str, int]] = {}
    for use in uses(run_dir):
        slot = counts.setdefault(str(use.get("kind")), {"reused": 0, "built": 0})
        slot["reused" if use.get("cached") else "built"] += 1
    return counts


# --------------------------------------------------------------------------------------------------
# inputs


def _images_digest(images: list[tuple[int, str, str]]) -> str:
    text = json.dumps(sorted(images), separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class _Donor:
    """An inputs entry whose unchanged inputs a new entry links: its manifest and per-file record."""

    path: Path
    manifest: Manifest
    files: dict[str, dict[str, Any]]

    def check(self, source: Path) -> bool:
        """Whether the donor's input file `source` still has the CRC-32 recorded at its build."""
        info = self.files.get(str(source.relative_to(self.path)))
        if not isinstance(info, dict) or CRC32 not in info:
            return False
        try:
            return VERIFY_MODES[CRC32](source) == info[CRC32]
        except OSError:
            return False


def _donor(cache: Cache, shape: dict[str, Any]) -> _Donor | None:
    """The most recently used inputs entry of the same input format: unchanged images link from it
    (each linked file checked against the donor's recorded CRC-32)."""
    best: tuple[float, Path, dict[str, Any]] | None = None
    for entry in cache.entries():
        if entry.kind != "inputs":
            continue
        try:
            record = json.loads(entry.record_path.read_text())
            used = entry.record_path.stat().st_mtime
        except (OSError, ValueError):
            continue
        if not isinstance(record, dict) or not isinstance(record.get("files"), dict):
            continue
        if record.get("info", {}).get("shape") == shape and (best is None or used > best[0]):
            best = (used, entry.path, record["files"])
    if best is None:
        return None
    try:
        return _Donor(best[1], load_manifest(best[1] / "manifest.json"), best[2])
    except GfocalError:
        return None


def _inputs_key(
    dataset: CocoDataset, hashes: dict[int, str], options: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the input format an entry's inputs share with a donor, the entry's key inputs)."""
    images = [(image.image_id, image.file_name, hashes[image.image_id]) for image in dataset.images]
    shape = {
        "version": PREPROCESS_VERSION,
        "manifest": MANIFEST_VERSION,
        **{name: options[name] for name in ("policy", "dtype", "height", "width")},
    }
    pixels = options.get("pixels") or DEFAULT_PIXELS
    if pixels != DEFAULT_PIXELS:  # ImageNet RGB adds nothing: caches built before it stay valid
        shape["pixels"] = pixels.to_dict()
    key_inputs = {
        **shape,
        "images": len(images),
        "images_sha256": _images_digest(images),
        "annotation_sha256": sha256_file(dataset.annotation_file),
        "shard_size": options["shard_size"],
        "skip_bad_images": bool(options.get("skip_bad_images", False)),
        "max_pixels": options.get("max_pixels", DEFAULT_MAX_PIXELS),
        "coco_root": str(dataset.root),  # the manifest names the source files, so the root is content
    }
    return shape, key_inputs


def cached_inputs(
    preprocess: Callable[..., Manifest],
    coco_root: str | Path,
    run_dir: str | Path,
    work_dir: str | Path,
    *,
    image_dir: str,
    annotation_file: str,
    max_images: int | None = None,
    workers: int | None = None,
    shard_plan: ShardPlan | None = None,
    **options: Any,
) -> tuple[Manifest, dict[str, Any]]:
    """Preprocess through the inputs cache; the run directory gets a manifest that points into it.

    `preprocess` is `preprocess.preprocess`; `options` are its policy, dtype, height, width,
    shard_size (None: `shard_plan`'s), skip_bad_images, max_pixels, pixels, classes. Returns the
    run's manifest and {"cached", "cache_key"}.
    """
    from gfocal_pipeline.dataset import load_coco
    from gfocal_pipeline.preprocess import hash_images

    dataset = load_coco(coco_root, image_dir, annotation_file, max_images, **(options.get("classes") or {}))
    size = (options["height"], options["width"])
    options["shard_size"] = resolve_shard_size(
        options.get("shard_size"), len(dataset.images), *size, shard_plan
    )
    hashes = hash_images(dataset.images, workers or 2)
    shape, key_inputs = _inputs_key(dataset, hashes, options)
    cache = Cache(work_dir)
    entry = cache.entry("inputs", key_inputs, verify=CRC32)

    def build(tmp: Path) -> dict[str, Any]:
        donor = _donor(cache, shape)
        manifest = preprocess(
            coco_root,
            tmp,
            image_dir=image_dir,
            annotation_file=annotation_file,
            max_images=max_images,
            workers=workers,
            image_hashes=hashes,
            donor=donor.manifest if donor else None,
            donor_check=donor.check if donor else None,
            **options,
        )
        return {"shape": shape, "images": len(manifest.images), "skipped": len(manifest.skipped)}

    record, cached = entry.get_or_build(build)
    source = load_manifest(entry.path / "manifest.json")
    manifest = dataclasses.replace(source, inputs_root=str(entry.path / "inputs"), path=None, _sha256=None)
    manifest.write(RunLayout.at(run_dir).manifest)
    note_use(run_dir, entry, cached, images=len(manifest.images))
    return manifest, {"cached": cached, "cache_key": entry.key, "build_seconds": record.get("build_seconds")}


# --------------------------------------------------------------------------------------------------
# onnx


def cached_export(
    run_dir: str | Path,
    work_dir: str | Path,
    variant: str,
    checkpoint: str | Path,
    spec: dict[str, Any] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """`export.export_onnx` through the ONNX cache: the graph stays in the cache entry.

    `options` are export_onnx's (model, height, width, dynamic_batch, normalize_in_graph, opset,
    parity_threshold, max_unexplained); `spec`, the run's recorded model spec, is part of the key. A
    refused graph is kept in the run's model folder as `<name>.rejected.onnx`, as without the cache.
    Returns the export's XCom dict + cached, cache_key.
    """
    import onnx
    import torch

    from gfocal_pipeline.export import DEFAULT_OPSET, ExportResult, export_onnx, rejected_path

    options.setdefault("model", "gfocalv2")
    checkpoint = Path(checkpoint)
    layout = RunLayout.at(run_dir)
    name = layout.onnx(variant).name
    key_inputs = {
        "version": EXPORT_VERSION,
        "checkpoint_sha256": _checkpoint_sha256(checkpoint),
        "variant": variant,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        **{key: value for key, value in options.items() if value is not None},
        **({"model_spec": spec} if spec else {}),
    }
    key_inputs.setdefault("opset", DEFAULT_OPSET.get(variant))
    entry = Cache(work_dir).entry("onnx", key_inputs, verify=SHA256)

    def build(tmp: Path) -> dict[str, Any]:
        try:
            return export_onnx(checkpoint=checkpoint, output=tmp / name, variant=variant, **options).to_dict()
        except GfocalError as exc:
            refused = rejected_path(tmp / name)
            if not refused.is_file():
                raise
            layout.model_dir.mkdir(parents=True, exist_ok=True)
            kept = shutil.move(refused, layout.model_dir / refused.name)
            raise type(exc)(str(exc).replace(str(refused), str(kept))) from exc

    record, cached = entry.get_or_build(build)
    info = dict(record["info"])
    info["onnx_path"] = str(entry.path / name)
    with_known = {f.name for f in dataclasses.fields(ExportResult)}
    result = ExportResult(**{k: v for k, v in info.items() if k in with_known})
    note_use(run_dir, entry, cached, variant=variant)
    return {**result.to_xcom(), "cached": cached, "cache_key": entry.key}


def _checkpoint_sha256(checkpoint: Path) -> str:
    try:
        return sha256_file(checkpoint)
    except OSError as exc:
        raise CheckpointError(
            f"checkpoint {str(checkpoint)!r} cannot be read ({exc.strerror or exc}); "
            "pass the path of a .pth file"
        ) from None


# --------------------------------------------------------------------------------------------------
# reference


def reference_entry(
    work_dir: str | Path, manifest: Manifest, shard: str, checkpoint: str | Path, options: dict[str, Any]
) -> CacheEntry:
    """The reference cache entry of one shard (see the module docstring for its key)."""
    import torch

    from gfocal_pipeline.backends.torch_backend import resolve_device

    device = resolve_device(str(options.get("device", "auto"))).type
    key_inputs = {
        "version": REFERENCE_VERSION,
        "checkpoint_sha256": _checkpoint_sha256(Path(checkpoint)),
        "shard_digest": manifest.shard_digest(shard),
        "torch": torch.__version__,
        "device_type": device,
        **{k: v for k, v in sorted(options.items()) if k not in ("device", "model", "num_threads", "warmup")},
    }
    return Cache(work_dir).entry("reference", key_inputs, verify=SHA256)


def cached_reference(
    run_dir: str | Path,
    work_dir: str | Path,
    manifest: Manifest,
    shard: str,
    run: Callable[[RunLayout], dict[str, Any]],
    checkpoint: str | Path,
    options: dict[str, Any],
) -> dict[str, Any]:
    """The PyTorch reference of one shard through the reference cache.

    `run(layout)` runs the backend into `layout` (a temporary one while the entry is built); the
    entry's outputs and timing are then copied into the run directory (a few KB per image).
    """
    entry = reference_entry(work_dir, manifest, shard, checkpoint, options)
    record, cached = entry.get_or_build(lambda tmp: {"result": run(RunLayout.at(tmp))})
    layout = RunLayout.at(run_dir)
    # done markers last, each file atomically: a copy killed halfway is recomputed, never half-read
    for relative in sorted(record["files"], key=lambda name: (Path(name).name == DONE_FILE, name)):
        target = layout.root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as tmp:
            shutil.copyfile(entry.path / relative, tmp)
    note_use(run_dir, entry, cached, shard=shard)
    result = dict(record["info"]["result"])
    result["output_dir"] = str(layout.output_shard(str(result["backend"]), shard))
    return {
        **result,
        "reused": cached or result.get("reused", False),
        "cached": cached,
        "cache_key": entry.key,
    }
