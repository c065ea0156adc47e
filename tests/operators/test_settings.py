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
