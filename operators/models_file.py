"""The task of a models file entry's placeholder DAG (dags/gfocal_models.py): it fails with the error."""

from __future__ import annotations

from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException


class ModelsFileErrorOperator(BaseOperator):
    """Fail at once, without retries, with `message` (the bad entry, its field and the fix)."""

    def __init__(self, *, message: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.message = message

    def execute(self, context: Any) -> None:
        raise AirflowFailException(self.message)
