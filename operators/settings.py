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
checkpoint, coco_root, images_dir, annotations, work_dir
                        the deployment's data: the trigger forms' defaults, so a scheduled run
                        (and a manual one left untouched) uses these files, not the demo's; a manual
                        run can still override them in the form (default: unset -> the demo data)
preprocess_workers      threads of the preprocess task, read on the worker that runs it (default:
                        empty = its usable CPU cores)
keep_runs               retention (the DAGs' last task, `gfocal gc`): the newest run directories of
                        each DAG kept whole; older ones are pruned to their small results (summary,
                        eval, timing, final detections) (default 14; an integer >= 1)
cache_max_gb            retention: the size (GB, 10^9 bytes) the work directory's cache is evicted
                        down to, least recently used first; entries of runs in progress stay
                        (default 100; 0 empties the cache except those)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import timedelta

from gfocal_pipeline.errors import ConfigError
from gfocal_pipeline.history import default_history_url
from gfocal_pipeline.retention import (
    DEFAULT_CACHE_MAX_GB,
    DEFAULT_KEEP_RUNS,
    check_cache_max_gb,
    check_keep_runs,
)


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
    preprocess_workers: int | None = None
    keep_runs: int = DEFAULT_KEEP_RUNS
    cache_max_gb: float = DEFAULT_CACHE_MAX_GB
    run_defaults: tuple[tuple[str, str], ...] = ()  # (option, value) of the data keys that are set

    @property
    def nightly_deadline(self) -> timedelta | None:
        hours = self.nightly_deadline_hours
        return timedelta(hours=hours) if hours > 0 else None


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
        preprocess_workers=_positive_int_or_none("preprocess_workers", get("preprocess_workers", "")),
        keep_runs=_keep_runs(get("keep_runs", str(defaults.keep_runs))),
        cache_max_gb=_cache_max_gb(get("cache_max_gb", str(defaults.cache_max_gb))),
        run_defaults=tuple((key, get(key, "").strip()) for key in DATA_KEYS if get(key, "").strip()),
    )
