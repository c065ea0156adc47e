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


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("KEEP_RUNS", "0", r"\[gfocal\] keep_runs = '0': expected an integer >= 1"),
        ("KEEP_RUNS", "-2", r"\[gfocal\] keep_runs = '-2': expected an integer >= 1"),
        ("KEEP_RUNS", "two", r"\[gfocal\] keep_runs = 'two': expected an integer >= 1.* e\.g\. 14"),
        ("KEEP_RUNS", "1.5", r"\[gfocal\] keep_runs = '1\.5'"),
        ("CACHE_MAX_GB", "-1", r"\[gfocal\] cache_max_gb = '-1': expected a size in GB >= 0"),
        ("CACHE_MAX_GB", "lots", r"\[gfocal\] cache_max_gb = 'lots': expected a size in GB >= 0"),
        ("CACHE_MAX_GB", "inf", r"\[gfocal\] cache_max_gb = 'inf'"),
    ],
)
def test_bad_retention_values_name_the_key(
    monkeypatch: pytest.MonkeyPatch, key: str, value: str, expected: str
) -> None:
    from gfocal_pipeline.errors import ConfigError

    monkeypatch.setenv(f"AIRFLOW__GFOCAL__{key}", value)
    with pytest.raises(ConfigError, match=expected):
        load_settings()
