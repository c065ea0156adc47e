"""Airflow plugin: the gfocal trend page at `<airflow>/gfocal/`, linked from the Browse menu.

The page and its JSON (`/gfocal/api/trends`) come from `gfocal_pipeline.trend`; this module only
wires them into the API server. The history database is `[gfocal] history_url` in airflow.cfg
(env AIRFLOW__GFOCAL__HISTORY_URL), else $GFOCAL_HISTORY_URL, else a SQLite file in $AIRFLOW_HOME.
Every route requires an authenticated Airflow user (the UI's session cookie is sent by the iframe).
"""

from __future__ import annotations

from typing import Any, ClassVar

from airflow.api_fastapi.core_api.security import requires_authenticated
from airflow.configuration import conf
from airflow.plugins_manager import AirflowPlugin
from fastapi import Depends

from gfocal_pipeline.history import HistoryStore, default_history_url
from gfocal_pipeline.trend import create_app

URL_PREFIX = "/gfocal"


def history_url() -> str:
    return conf.get("gfocal", "history_url", fallback=None) or default_history_url()


app = create_app(lambda: HistoryStore(history_url()), dependencies=[Depends(requires_authenticated())])


class GfocalPlugin(AirflowPlugin):
    name = "gfocal"
    fastapi_apps: ClassVar[list[dict[str, Any]]] = [
        {"app": app, "url_prefix": URL_PREFIX, "name": "GFocal trends"}
    ]
    # Relative href (no leading slash): resolved against the UI's <base>, so [api] base_url prefixes work.
    external_views: ClassVar[list[dict[str, Any]]] = [
        {
            "name": "GFocal trends",
            "href": f"{URL_PREFIX.lstrip('/')}/",
            "destination": "nav",
            "category": "browse",
            "url_route": "gfocal-trends",
        }
    ]
