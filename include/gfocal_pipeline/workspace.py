"""Where runs live by default, and the embedded demo data (generated on first use).

The run options themselves and their validation are in `gfocal_pipeline.run_config`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from gfocal_pipeline.adapters import DEFAULT_MODEL, model_spec
from gfocal_pipeline.errors import GfocalError

log = logging.getLogger(__name__)

WORK_DIR_ENV = "GFOCAL_WORK_DIR"
DEMO_IMAGES = 24


def default_work_dir() -> Path:
    """`$GFOCAL_WORK_DIR`, else `$AIRFLOW_HOME/gfocal`, else `~/airflow/gfocal`."""
    if os.environ.get(WORK_DIR_ENV):
        return Path(os.environ[WORK_DIR_ENV])
    airflow_home = os.environ.get("AIRFLOW_HOME") or str(Path.home() / "airflow")
    return Path(airflow_home) / "gfocal"


def demo_paths(work_dir: str | Path | None = None, model: str = DEFAULT_MODEL) -> dict[str, Path]:
    """Where the generated demo dataset and `model`'s random-weight checkpoint live (no "checkpoint"
    for a model without generated weights: a bring-your-own graph)."""
    base = Path(work_dir or default_work_dir()) / "demo"
    name = model_spec(model).demo_checkpoint
    return {"coco_root": base / "coco", **({"checkpoint": base / name} if name else {})}


def ensure_demo_data(work_dir: str | Path | None = None, model: str = DEFAULT_MODEL) -> dict[str, Path]:
    """Generate the demo COCO set and `model`'s random checkpoint if they are not there yet, or are
    damaged (idempotent; see `ensure_demo_checkpoint`)."""
    from gfocal_pipeline.demo_data import make_demo_coco

    paths = demo_paths(work_dir, model)
    make_demo_coco(paths["coco_root"], num_images=DEMO_IMAGES, seed=0)
    if "checkpoint" in paths:
        ensure_demo_checkpoint(paths["checkpoint"], seed=0, model=model)
    return paths


def demo_checksum_path(checkpoint: Path) -> Path:
    """Where the demo checkpoint's sha256 is recorded when it is written: `<checkpoint>.sha256`."""
    return checkpoint.with_name(checkpoint.name + ".sha256")


def _demo_checkpoint_problem(checkpoint: Path) -> str:
    """Why the demo checkpoint cannot be used as it is ("" when its sha256 is the one recorded)."""
    from gfocal_pipeline.fileio import sha256_file

    if not checkpoint.is_file():
        return "is missing"
    try:
        recorded = demo_checksum_path(checkpoint).read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return "has no recorded sha256 (written by an older version), so it cannot be verified"
    try:
        found = sha256_file(checkpoint)
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    if found != recorded:
        return f"is damaged: its sha256 is {found}, not the {recorded} recorded when it was written"
    return ""


def ensure_demo_checkpoint(checkpoint: Path, seed: int = 0, model: str = DEFAULT_MODEL) -> Path:
    """The demo's RANDOM-weight checkpoint at `checkpoint`, checked against the sha256 recorded
    beside it when it was written (~0.1 s); a missing, damaged or unverifiable one is written again
    (the bytes are deterministic), so a cut or corrupted file is never reported as ready. A folder
    that cannot be written is a `GfocalError` naming it."""
    from gfocal_pipeline.adapters import load_adapter
    from gfocal_pipeline.fileio import sha256_file, write_text_atomic

    problem = _demo_checkpoint_problem(checkpoint)
    if not problem:
        return checkpoint
    if checkpoint.exists():
        log.warning("demo checkpoint %s %s; writing it again", checkpoint, problem)
    try:
        load_adapter(model).write_random_checkpoint(checkpoint, seed=seed)
        write_text_atomic(demo_checksum_path(checkpoint), sha256_file(checkpoint) + "\n")
    except (GfocalError, OSError) as exc:
        if not checkpoint.exists():
            raise
        raise GfocalError(
            f"demo checkpoint {str(checkpoint)!r} {problem}, and it cannot be written again ({exc}); make "
            f"{str(checkpoint.parent)!r} writable (the demo data is generated there), or use another work_dir"
        ) from None
    return checkpoint
