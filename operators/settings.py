"""The `[gfocal]` section of airflow.cfg (or `AIRFLOW__GFOCAL__*`), read in one place.

history_url             SQLAlchemy URL of the results history (default: $GFOCAL_HISTORY_URL, else
                        a SQLite file in $AIRFLOW_HOME)
url_prefix              where the trend page is served (default: /gfocal)
alert_channels          comma list of smtp, slack, apprise (default: smtp)
alert_to                comma list of e-mail recipients (smtp); none -> the alert is only logged
alert_from              sender address (default: gfocal@localhost)
smtp_conn_id / slack_conn_id / apprise_conn_id   the channels' Airflow connections
base_url                public Airflow URL for links (default: [api] base_url)
nightly_cron            the Ascend nightly's schedule (default: 02:00 UTC)
nightly_deadline_hours  alert when a nightly has not finished this long after it was queued
                        (default 6; 0 disables the deadline)
nightly_doctor          true: the nightly's first task is `gfocal doctor` on the `ascend` queue
                        (docs/doctor.md): a host missing CANN, the NPU, the shared work directory,
                        the databases or the broker fails the night at once (default false)
models_file             a YAML file of models for the nightly (docs/models-file.md): one DAG
                        `<name>_nightly` per entry, each with its variants (default: empty ->
                        $GFOCAL_MODELS_FILE, else none: the two built-in DAGs only)
checkpoint, coco_root, images_dir, annotations, work_dir
                        the deployment's data: the trigger forms' defaults, so a scheduled run
                        (and a manual one left untouched) uses these files, not the demo's; a manual
                        run can still override them in the form (default: unset -> the demo data)
preprocess_workers      threads of the preprocess task, read on the worker that runs it (default:
                        empty = its usable CPU cores)
device_slots            how many device (infer) tasks of a run can run at once: the `ascend_npu`
                        pool's slots for the nightly, the CPU workers' slots for the ONNX Runtime
                        DAG. A run with an empty shard_size gets at least this many shards
                        (`gfocal_pipeline.sharding`) (default 1; an integer >= 1)
max_pixels              the pixel budget of one source image (width x height, read from its header
                        before decoding), read on the worker that runs the preprocess task: an image
                        over it is a bad image (refused, or skipped with skip_bad_images) (default:
                        empty = 100000000, 100 megapixels; 0 = no budget)
report_score_thr        the regression report's "confident" score: boxes at or above it are matched
                        in the image ranking and drawn in its pictures (docs/quality.md#reports)
                        (default 0.3; a number in (0, 1])
keep_runs               retention (the DAGs' last task, `gfocal gc`): the newest run directories of
                        each DAG kept whole; older ones are pruned to their small results (summary,
                        eval, timing, final detections) (default 14; an integer >= 1)
cache_max_gb            retention: the size (GB, 10^9 bytes) the work directory's cache is evicted
                        down to, least recently used first; entries of runs in progress stay
                        (default 100; 0 empties the cache except those)

Retries and timeouts (read when a DAG is parsed; the timeouts again by the worker running a task):
task_retries            retries of the idempotent tasks (prepare, export, convert, preprocess, infer,
                        evaluate, summary, retention), which resume from what is complete (finished
                        shards, cache entries); `record` and `gate` never retry (no duplicate
                        history row, verdict or alert) (default 2; an integer >= 0)
retry_delay_seconds     the first retry's delay, doubled at each further retry (exponential backoff,
                        with Airflow's jitter) (default 60; a number > 0)
max_retry_delay_minutes the longest delay between retries (default 30; >= the first delay)
task_timeout_scale      multiplies every task's sized timeout (default 1; a number > 0), e.g. 3 on a
                        slow host. Each task's `execution_timeout` is scale * (minutes + seconds per
                        image * the images it handles) of its kind (`operators.timeouts.BUDGETS`,
                        the table in docs/failures.md#timeouts). The images are the form's
                        defaults when the DAG is parsed (max_images, else 5000 = val2017; an infer
                        task's shard) and the real count when the task starts (the shard's, the
                        manifest's, the run's max_images)
task_timeout_minutes    fixed timeouts in minutes for some kinds, replacing their sized default
                        (never scaled nor resized): "<kind>=<minutes>, ...", e.g. "convert=240,
                        infer=30" (default: empty)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from gfocal_pipeline.constants import DEFAULT_MAX_PIXELS
from gfocal_pipeline.errors import ConfigError
from gfocal_pipeline.history import default_history_url
from gfocal_pipeline.retention import (
    DEFAULT_CACHE_MAX_GB,
    DEFAULT_KEEP_RUNS,
    check_cache_max_gb,
    check_keep_runs,
)
from gfocal_pipeline.zoo import models_file_path
from operators.timeouts import parse_timeout_minutes, sized_timeout


def _items(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


@dataclass(frozen=True)
class GfocalSettings:
    """Every `[gfocal]` value the DAGs, operators and the plugin use (see the module docstring)."""

    history_url: str
    url_prefix: str = "/gfocal"
    alert_channels: tuple[str, ...] = ("smtp",)
    alert_to: tuple[str, ...] = ()
    alert_from: str = "gfocal@localhost"
    smtp_conn_id: str = "smtp_default"
    slack_conn_id: str = "slack_default"
    apprise_conn_id: str = "apprise_default"
    base_url: str = ""
    nightly_cron: str = "0 2 * * *"
    nightly_deadline_hours: float = 6.0
    nightly_doctor: bool = False
    models_file: str | None = None  # gfocal_pipeline.zoo: [gfocal] models_file, else $GFOCAL_MODELS_FILE
    preprocess_workers: int | None = None
    device_slots: int = 1
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    report_score_thr: float = 0.3
    keep_runs: int = DEFAULT_KEEP_RUNS
    cache_max_gb: float = DEFAULT_CACHE_MAX_GB
    run_defaults: tuple[tuple[str, str], ...] = ()  # (option, value) of the data keys that are set
    task_retries: int = 2
    retry_delay_seconds: float = 60.0
    max_retry_delay_minutes: float = 30.0
    task_timeout_scale: float = 1.0
    task_timeout_minutes: tuple[tuple[str, float], ...] = ()  # (kind, minutes) fixed by the deployment

    @property
    def nightly_deadline(self) -> timedelta | None:
        hours = self.nightly_deadline_hours
        return timedelta(hours=hours) if hours > 0 else None

    def retry_args(self) -> dict[str, object]:
        """The retry arguments of an idempotent task: `task_retries` with exponential backoff."""
        return {
            "retries": self.task_retries,
            "retry_delay": timedelta(seconds=self.retry_delay_seconds),
            # a multiplier: 2.0 doubles the delay per retry (True would be 1.0, a constant delay)
            "retry_exponential_backoff": 2.0,
            "max_retry_delay": timedelta(minutes=self.max_retry_delay_minutes),
        }

    def task_timeout(self, kind: str, images: int | None) -> timedelta:
        """The `execution_timeout` of a task of `kind` handling `images` (see the module docstring)."""
        return sized_timeout(kind, images, scale=self.task_timeout_scale, fixed=self.task_timeout_minutes)


def _positive_int_or_none(key: str, text: str) -> int | None:
    if not text.strip():
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"[gfocal] {key} = {text!r}: expected a positive integer, or empty for the default")
    return value


def _max_pixels(text: str) -> int | None:
    """`[gfocal] max_pixels`: empty -> the default budget, 0 -> none, else a positive integer."""
    if not text.strip():
        return DEFAULT_MAX_PIXELS
    try:
        value = int(text.strip())
    except ValueError:
        value = -1
    if value < 0:
        raise ConfigError(
            f"[gfocal] max_pixels = {text!r}: expected an integer >= 0 (the most pixels one image may have; "
            f"0: no budget); set it to e.g. {DEFAULT_MAX_PIXELS}, or leave it empty for the default"
        )
    return value or None


def _keep_runs(text: str) -> int:
    source = f"[gfocal] keep_runs = {text!r}"
    if not text.strip():
        return DEFAULT_KEEP_RUNS
    try:
        value = int(text.strip())
    except ValueError:
        raise ConfigError(
            f"{source}: expected an integer >= 1 (the newest run directories of each DAG kept whole); "
            f"set it to e.g. {DEFAULT_KEEP_RUNS}, or leave it empty for the default"
        ) from None
    return check_keep_runs(value, source)


def _cache_max_gb(text: str) -> float:
    source = f"[gfocal] cache_max_gb = {text!r}"
    if not text.strip():
        return DEFAULT_CACHE_MAX_GB
    try:
        value = float(text.strip())
    except ValueError:
        value = math.nan  # reported below, with the accepted values
    return check_cache_max_gb(value, source)


def _setting_error(key: str, text: str, expected: str, default: float) -> ConfigError:
    return ConfigError(
        f"[gfocal] {key} = {text!r}: expected {expected}; set it to e.g. {default:g}, or leave it empty "
        "for the default"
    )


def _positive(key: str, text: str, default: float) -> float:
    """`text` as a finite number > 0 (empty: `default`), else a ConfigError naming `key`."""
    if not text.strip():
        return default
    try:
        value = float(text.strip())
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise _setting_error(key, text, "a number > 0", default)
    return value


def _flag(key: str, text: str) -> bool:
    """`text` as a boolean setting (empty: false), else a ConfigError naming `key`."""
    value = text.strip().lower()
    if value in ("", "false", "no", "off", "0"):
        return False
    if value in ("true", "yes", "on", "1"):
        return True
    raise ConfigError(f"[gfocal] {key} = {text!r}: expected true or false (or leave it empty for false)")


def _count(key: str, text: str, default: int) -> int:
    """`text` as an integer >= 0 (empty: `default`), else a ConfigError naming `key`."""
    if not text.strip():
        return default
    try:
        value = int(text.strip())
    except ValueError:
        value = -1
    if value < 0:
        raise _setting_error(key, text, "an integer >= 0", default)
    return value


def _retry_settings(get: Callable[[str, str], str]) -> dict[str, Any]:
    """The retry and timeout keys, validated (a ConfigError names the bad key)."""
    defaults = GfocalSettings(history_url="")
    delay = _positive("retry_delay_seconds", get("retry_delay_seconds", ""), defaults.retry_delay_seconds)
    longest = _positive(
        "max_retry_delay_minutes", get("max_retry_delay_minutes", ""), defaults.max_retry_delay_minutes
    )
    if longest * 60 < delay:
        raise ConfigError(
            f"[gfocal] max_retry_delay_minutes = {longest:g} is shorter than retry_delay_seconds = "
            f"{delay:g}; raise max_retry_delay_minutes or lower retry_delay_seconds"
        )
    return {
        "task_retries": _count("task_retries", get("task_retries", ""), defaults.task_retries),
        "retry_delay_seconds": delay,
        "max_retry_delay_minutes": longest,
        "task_timeout_scale": _positive(
            "task_timeout_scale", get("task_timeout_scale", ""), defaults.task_timeout_scale
        ),
        "task_timeout_minutes": parse_timeout_minutes(get("task_timeout_minutes", "")),
    }


DATA_KEYS = ("checkpoint", "coco_root", "images_dir", "annotations", "work_dir")


def load_settings() -> GfocalSettings:
    """Read the `[gfocal]` section now (each DAG parse / notification reads the current values)."""
    from airflow.configuration import conf

    def get(key: str, fallback: str) -> str:
        return conf.get("gfocal", key, fallback=fallback) or fallback

    defaults = GfocalSettings(history_url="")
    return GfocalSettings(
        history_url=get("history_url", "") or default_history_url(),
        url_prefix="/" + get("url_prefix", defaults.url_prefix).strip("/"),
        alert_channels=_items(get("alert_channels", ",".join(defaults.alert_channels))),
        alert_to=_items(get("alert_to", "")),
        alert_from=get("alert_from", defaults.alert_from),
        smtp_conn_id=get("smtp_conn_id", defaults.smtp_conn_id),
        slack_conn_id=get("slack_conn_id", defaults.slack_conn_id),
        apprise_conn_id=get("apprise_conn_id", defaults.apprise_conn_id),
        base_url=get("base_url", "") or conf.get("api", "base_url", fallback="") or "",
        nightly_cron=get("nightly_cron", defaults.nightly_cron),
        nightly_deadline_hours=float(get("nightly_deadline_hours", str(defaults.nightly_deadline_hours))),
        nightly_doctor=_flag("nightly_doctor", get("nightly_doctor", "")),
        models_file=models_file_path(get("models_file", "")),
        preprocess_workers=_positive_int_or_none("preprocess_workers", get("preprocess_workers", "")),
        device_slots=_positive_int_or_none("device_slots", get("device_slots", "")) or defaults.device_slots,
        max_pixels=_max_pixels(get("max_pixels", "")),
        report_score_thr=_positive(
            "report_score_thr", get("report_score_thr", ""), defaults.report_score_thr
        ),
        keep_runs=_keep_runs(get("keep_runs", str(defaults.keep_runs))),
        cache_max_gb=_cache_max_gb(get("cache_max_gb", str(defaults.cache_max_gb))),
        run_defaults=tuple((key, get(key, "").strip()) for key in DATA_KEYS if get(key, "").strip()),
        **_retry_settings(get),
    )
