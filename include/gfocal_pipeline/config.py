"""Run configuration: defaults (embedded demo), and validation of everything a run takes from a form."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from gfocal_pipeline.backends.atc import PRECISION_MODES
from gfocal_pipeline.backends.process import check_safe_value
from gfocal_pipeline.constants import DEFAULT_HEIGHT, DEFAULT_WIDTH, SIZE_DIVISOR
from gfocal_pipeline.errors import BackendError, GfocalError

WORK_DIR_ENV = "GFOCAL_WORK_DIR"
DEMO_IMAGES = 24


class ConfigError(GfocalError):
    """A run parameter is invalid; the message names it and the accepted values."""


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


def check_path_param(name: str, value: Any, must_exist: bool = False) -> str:
    """A path from a form: non-empty string, no shell metacharacters, optionally existing."""
    if not isinstance(value, str | os.PathLike) or not str(value).strip():
        raise ConfigError(f"parameter {name!r} must be a non-empty path, got {value!r}")
    text = str(value).strip()
    try:
        check_safe_value(text, f"parameter {name!r}")
    except BackendError as exc:
        raise ConfigError(str(exc)) from None
    if must_exist and not Path(text).exists():
        raise ConfigError(f"parameter {name!r}: {text!r} does not exist; pass an existing path")
    return text


def check_int(name: str, value: Any, low: int, high: int, multiple_of: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ConfigError(f"parameter {name!r} must be an integer, got {value!r}")
    try:
        number = int(value)
    except ValueError:
        raise ConfigError(f"parameter {name!r} must be an integer, got {value!r}") from None
    if not low <= number <= high or number % multiple_of:
        extra = f" and a multiple of {multiple_of}" if multiple_of > 1 else ""
        raise ConfigError(f"parameter {name!r} = {number} must be in {low}..{high}{extra}")
    return number


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(f"parameter {name!r} = {value!r} must be one of: {', '.join(choices)}")
    return str(value)


def validate_run_config(config: dict[str, Any]) -> dict[str, Any]:
    """Validate and normalize a run's parameters once, at the first task of the DAG.

    The demo defaults are generated on first use, so a bare `airflow dags test` works.
    """
    from gfocal_pipeline.gate import GateConfigError, GateThresholds
    from gfocal_pipeline.manifest import DTYPES, POLICIES

    cfg = dict(config)
    cfg["work_dir"] = check_path_param("work_dir", cfg.get("work_dir") or str(default_work_dir()))
    for key in ("checkpoint", "coco_root"):
        cfg[key] = cfg.get(key) or str(demo_paths(cfg["work_dir"])[key])
    # the demo data (in the run's work dir or the deployment default) is generated on first use
    demo_bases = {Path(cfg["work_dir"]), default_work_dir()}
    for base in demo_bases:
        if any(Path(cfg[k]) == demo_paths(base)[k] for k in ("checkpoint", "coco_root")):
            ensure_demo_data(base)
    cfg["checkpoint"] = check_path_param("checkpoint", cfg["checkpoint"], must_exist=True)
    cfg["coco_root"] = check_path_param("coco_root", cfg["coco_root"], must_exist=True)
    cfg["weights_random"] = any(Path(cfg["checkpoint"]) == demo_paths(b)["checkpoint"] for b in demo_bases)
    cfg["policy"] = check_choice("policy", cfg.get("policy", "letterbox"), POLICIES)
    cfg["dtype"] = check_choice("dtype", cfg.get("dtype", "float32"), DTYPES)
    cfg["height"] = check_int("height", cfg.get("height", DEFAULT_HEIGHT), 64, 4096, SIZE_DIVISOR)
    cfg["width"] = check_int("width", cfg.get("width", DEFAULT_WIDTH), 64, 4096, SIZE_DIVISOR)
    cfg["batch_size"] = check_int("batch_size", cfg.get("batch_size", 1), 1, 256)
    cfg["shard_size"] = check_int("shard_size", cfg.get("shard_size", 8), 1, 100_000)
    max_images = cfg.get("max_images")
    cfg["max_images"] = None if max_images in (None, "", 0) else check_int("max_images", max_images, 1, 10**7)
    # the Ascend DAG's form fields (validated here too: the prepare task runs before any tool)
    if "tool" in cfg:
        cfg["tool"] = check_choice("tool", cfg["tool"], ("msame", "ais_bench"))
    if cfg.get("tool") == "msame" and cfg["batch_size"] > 1:
        raise ConfigError(
            f"parameter 'batch_size' = {cfg['batch_size']}: msame runs one input file per inference; "
            "use tool 'ais_bench' for batch > 1 (it groups files into batches of a dynamic-batch OM)"
        )
    if "device" in cfg:
        cfg["device"] = check_int("device", cfg["device"], 0, 255)
    if "chips" in cfg:
        cfg["chips"] = check_int("chips", cfg["chips"], 1, 16)
    if "outfmt" in cfg:
        cfg["outfmt"] = check_choice("outfmt", cfg["outfmt"], ("BIN", "TXT"))
    if cfg.get("soc_version") and not re.fullmatch(r"Ascend[0-9A-Za-z]+", str(cfg["soc_version"])):
        raise ConfigError(
            f"parameter 'soc_version' = {cfg['soc_version']!r} must look like Ascend310P3 "
            "(or be empty to detect it with npu-smi)"
        )
    if "precision_mode" in cfg:
        cfg["precision_mode"] = check_choice("precision_mode", cfg["precision_mode"], PRECISION_MODES)
    if cfg.get("cann_set_env"):  # lives on the NPU worker: checked for safety here, for existence there
        cfg["cann_set_env"] = check_path_param("cann_set_env", cfg["cann_set_env"])
    names = ("min_ap", "min_fps", "ap_tolerance", "fps_tolerance", "baseline_runs")
    try:
        thresholds = GateThresholds.from_mapping({k: cfg[k] for k in names if k in cfg})
    except GateConfigError as exc:
        raise ConfigError(str(exc)) from exc
    cfg["thresholds"] = thresholds.as_dict()
    return cfg
