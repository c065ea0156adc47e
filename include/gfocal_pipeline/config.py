"""Where runs live by default, and the embedded demo data (generated on first use).

The run options themselves and their validation are in `gfocal_pipeline.run_config`.
"""

from __future__ import annotations

import os
from pathlib import Path

WORK_DIR_ENV = "GFOCAL_WORK_DIR"
DEMO_IMAGES = 24


def default_work_dir() -> Path:
    """`$GFOCAL_WORK_DIR`, else `$AIRFLOW_HOME/gfocal`, else `~/airflow/gfocal`."""
    if os.environ.get(WORK_DIR_ENV):
        return Path(os.environ[WORK_DIR_ENV])
    airflow_home = os.environ.get("AIRFLOW_HOME") or str(Path.home() / "airflow")
    return Path(airflow_home) / "gfocal"


def demo_paths(work_dir: str | Path | None = None) -> dict[str, Path]:
    """Where the generated demo dataset and the random-weight checkpoint live."""
    base = Path(work_dir or default_work_dir()) / "demo"
    return {"coco_root": base / "coco", "checkpoint": base / "gfocal_r50_fpn_1x_RANDOM.pth"}


def ensure_demo_data(work_dir: str | Path | None = None) -> dict[str, Path]:
    """Generate the demo COCO set and random checkpoint if they are not there yet (idempotent)."""
    from gfocal_pipeline.checkpoint import write_random_checkpoint
    from gfocal_pipeline.demo_data import make_demo_coco

    paths = demo_paths(work_dir)
    make_demo_coco(paths["coco_root"], num_images=DEMO_IMAGES, seed=0)
    if not paths["checkpoint"].is_file():
        write_random_checkpoint(paths["checkpoint"], seed=0)
    return paths
