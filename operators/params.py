"""Coercion of templated operator arguments (rendered Jinja gives strings) with clear errors."""

from __future__ import annotations

from typing import Any

from airflow.exceptions import AirflowException


def as_int(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise AirflowException(f"{name} must be an integer, got {value!r}")
    try:
        return int(str(value).strip()) if not isinstance(value, int) else value
    except ValueError:
        raise AirflowException(f"{name} must be an integer, got {value!r}") from None


def as_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", "", "none"):
        return False
    raise AirflowException(f"{name} must be true or false, got {value!r}")
