"""Airflow plugin: the gfocal trend page at `<airflow>/gfocal/`, linked from the Browse menu.

The page and its JSON (`/gfocal/api/trends`) come from `gfocal_pipeline.trend`; this module only
wires them into the API server. The history database and the URL prefix are `[gfocal]` settings
(`operators.settings`: `history_url`, `url_prefix`).
Every route requires an authenticated Airflow user (the UI's session cookie is sent by the iframe).
"""

from __future__ import annotations

from typing import Any, ClassVar

from airflow.api_fastapi.core_api.security import requires_authenticated
from airflow.plugins_manager import AirflowPlugin
from fastapi import Depends

from gfocal_pipeline.history import HistoryStore
from gfocal_pipeline.trend import create_app
from operators.settings import load_settings

SETTINGS = load_settings()
URL_PREFIX = SETTINGS.url_prefix

app = create_app(lambda: HistoryStore(SETTINGS.history_url), dependencies=[Depends(requires_authenticated())])


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
