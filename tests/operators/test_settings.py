"""`[gfocal]` settings are read in one place, with their documented defaults."""

from __future__ import annotations

import os
from datetime import timedelta

import pytest

from operators.settings import load_settings


@pytest.fixture(autouse=True)
def no_gfocal_config(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if k.startswith("AIRFLOW__GFOCAL__")]:
        monkeypatch.delenv(key)


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GFOCAL_HISTORY_URL", "sqlite:////tmp/h.sqlite")
    settings = load_settings()
    assert settings.history_url == "sqlite:////tmp/h.sqlite"
    assert settings.url_prefix == "/gfocal" and settings.alert_channels == ("smtp",)
    assert settings.nightly_cron == "0 2 * * *" and settings.nightly_deadline == timedelta(hours=6)


def test_values_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in {
        "HISTORY_URL": "postgresql+psycopg://u@db/h",
        "URL_PREFIX": "trends/",
        "ALERT_CHANNELS": "smtp, slack",
        "ALERT_TO": "a@x, b@x",
        "NIGHTLY_CRON": "30 1 * * *",
        "NIGHTLY_DEADLINE_HOURS": "0",
    }.items():
        monkeypatch.setenv(f"AIRFLOW__GFOCAL__{key}", value)
    settings = load_settings()
    assert settings.history_url == "postgresql+psycopg://u@db/h" and settings.url_prefix == "/trends"
    assert settings.alert_channels == ("smtp", "slack") and settings.alert_to == ("a@x", "b@x")
    assert settings.nightly_cron == "30 1 * * *" and settings.nightly_deadline is None


def test_retention_defaults_and_values(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load_settings()
    assert settings.keep_runs == 14 and settings.cache_max_gb == 100.0
    monkeypatch.setenv("AIRFLOW__GFOCAL__KEEP_RUNS", "3")
    monkeypatch.setenv("AIRFLOW__GFOCAL__CACHE_MAX_GB", "0")
    settings = load_settings()
    assert settings.keep_runs == 3 and settings.cache_max_gb == 0.0
    monkeypatch.setenv("AIRFLOW__GFOCAL__CACHE_MAX_GB", "2.5")
    assert load_settings().cache_max_gb == 2.5


def test_max_pixels_default_value_and_none(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings().max_pixels == 100_000_000
    monkeypatch.setenv("AIRFLOW__GFOCAL__MAX_PIXELS", "2000000")
    assert load_settings().max_pixels == 2_000_000
    monkeypatch.setenv("AIRFLOW__GFOCAL__MAX_PIXELS", "0")  # no budget
    assert load_settings().max_pixels is None


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("MAX_PIXELS", "-1", r"\[gfocal\] max_pixels = '-1': expected an integer >= 0"),
        ("MAX_PIXELS", "1e8", r"\[gfocal\] max_pixels = '1e8': expected an integer >= 0.* e\.g\. 100000000"),
        ("KEEP_RUNS", "0", r"\[gfocal\] keep_runs = '0': expected an integer >= 1"),
        ("KEEP_RUNS", "-2", r"\[gfocal\] keep_runs = '-2': expected an integer >= 1"),
        ("KEEP_RUNS", "two", r"\[gfocal\] keep_runs = 'two': expected an integer >= 1.* e\.g\. 14"),
        ("KEEP_RUNS", "1.5", r"\[gfocal\] keep_runs = '1\.5'"),
        ("CACHE_MAX_GB", "-1", r"\[gfocal\] cache_max_gb = '-1': expected a size in GB >= 0"),
        ("CACHE_MAX_GB", "lots", r"\[gfocal\] cache_max_gb = 'lots': expected a size in GB >= 0"),
        ("CACHE_MAX_GB", "inf", r"\[gfocal\] cache_max_gb = 'inf'"),
    ],
)
def test_bad_retention_and_pixel_budget_values_name_the_key(
    monkeypatch: pytest.MonkeyPatch, key: str, value: str, expected: str
) -> None:
    from gfocal_pipeline.errors import ConfigError

    monkeypatch.setenv(f"AIRFLOW__GFOCAL__{key}", value)
    with pytest.raises(ConfigError, match=expected):
        load_settings()


def test_retry_and_timeout_defaults() -> None:
    settings = load_settings()
    assert settings.task_retries == 2 and settings.task_timeout_scale == 1.0
    assert settings.retry_args() == {
        "retries": 2,
        "retry_delay": timedelta(seconds=60),
        "retry_exponential_backoff": 2.0,  # a multiplier: doubles per retry (True would be 1.0)
        "max_retry_delay": timedelta(minutes=30),
    }
    assert settings.task_timeout_minutes == ()
    assert settings.task_timeout("convert", None) == timedelta(minutes=120)
    assert settings.task_timeout("infer", 8) == timedelta(minutes=15, seconds=8 * 15)


def test_retry_and_timeout_values(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in {
        "TASK_RETRIES": "0",
        "RETRY_DELAY_SECONDS": "10",
        "MAX_RETRY_DELAY_MINUTES": "5",
        "TASK_TIMEOUT_SCALE": "2",
        "TASK_TIMEOUT_MINUTES": "convert = 240, infer=30",
    }.items():
        monkeypatch.setenv(f"AIRFLOW__GFOCAL__{key}", value)
    settings = load_settings()
    assert settings.retry_args()["retries"] == 0
    assert settings.retry_args()["retry_delay"] == timedelta(seconds=10)
    assert settings.retry_args()["max_retry_delay"] == timedelta(minutes=5)
    assert settings.task_timeout_minutes == (("convert", 240.0), ("infer", 30.0))
    assert settings.task_timeout("convert", None) == timedelta(minutes=240)  # fixed: not scaled
    assert settings.task_timeout("infer", 10_000) == timedelta(minutes=30)  # fixed: not sized
    assert settings.task_timeout("evaluate", 600) == timedelta(minutes=2 * 15, seconds=2 * 0.5 * 600)


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("TASK_RETRIES", "-1", r"\[gfocal\] task_retries = '-1': expected an integer >= 0"),
        ("TASK_RETRIES", "1.5", r"\[gfocal\] task_retries = '1\.5': expected an integer >= 0.*e\.g\. 2"),
        ("RETRY_DELAY_SECONDS", "0", r"\[gfocal\] retry_delay_seconds = '0': expected a number > 0"),
        (
            "MAX_RETRY_DELAY_MINUTES",
            "soon",
            r"\[gfocal\] max_retry_delay_minutes = 'soon': expected a number",
        ),
        ("TASK_TIMEOUT_SCALE", "nan", r"\[gfocal\] task_timeout_scale = 'nan': expected a number > 0"),
        ("TASK_TIMEOUT_MINUTES", "train=5", r"\[gfocal\] task_timeout_minutes = 'train=5': 'train=5' is not"),
        (
            "TASK_TIMEOUT_MINUTES",
            "convert",
            r"task_timeout_minutes .* <kind>=<minutes> with a kind of prepare",
        ),
        (
            "TASK_TIMEOUT_MINUTES",
            "convert=-3",
            r"task_timeout_minutes .* minutes of 'convert' must be a number > 0",
        ),
    ],
)
def test_bad_retry_and_timeout_values_name_the_key(
    monkeypatch: pytest.MonkeyPatch, key: str, value: str, expected: str
) -> None:
    from gfocal_pipeline.errors import ConfigError

    monkeypatch.setenv(f"AIRFLOW__GFOCAL__{key}", value)
    with pytest.raises(ConfigError, match=expected):
        load_settings()


def test_max_retry_delay_below_the_first_delay_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from gfocal_pipeline.errors import ConfigError

    monkeypatch.setenv("AIRFLOW__GFOCAL__RETRY_DELAY_SECONDS", "600")
    monkeypatch.setenv("AIRFLOW__GFOCAL__MAX_RETRY_DELAY_MINUTES", "5")
    with pytest.raises(
        ConfigError, match="max_retry_delay_minutes = 5 is shorter than retry_delay_seconds = 600"
    ):
        load_settings()
