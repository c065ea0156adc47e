"""Airflow plugin: the gfocal trend pages at `<airflow>/gfocal/`, linked from the Browse menu.

The pages (the index of models at `/gfocal/`, a page per model at `/gfocal/models/<entry>/`, every
configuration at `/gfocal/configurations/`, run reports) and their JSON (`/gfocal/api/models`,
`/gfocal/api/trends`, both with `?model=`) come from `gfocal_pipeline.trend`; this module only wires
them into the API server. The history database and the URL prefix are `[gfocal]` settings
(`operators.settings`: `history_url`, `url_prefix`).
Every route requires an authenticated Airflow user (the UI's session cookie is sent by the iframe).
"""

from __future__ import annotations

from typing import Any, ClassVar

from airflow.plugins_manager import AirflowPlugin

from operators.settings import load_settings

SETTINGS = load_settings()
URL_PREFIX = SETTINGS.url_prefix


class LazyTrendApp:
    """The trend app as an ASGI callable that builds the FastAPI app on its first request.

    Airflow imports every plugin in every task process (for plugin macros), but only the api-server
    serves the app: building it there, on first use, keeps FastAPI and the API server's security
    module out of each task's start-up (about half a second per task)."""

    def __init__(self) -> None:
        self._app: Any = None

    def build(self) -> Any:
        if self._app is None:
            from airflow.api_fastapi.core_api.security import requires_authenticated
            from fastapi import Depends

            from gfocal_pipeline.history import HistoryStore
            from gfocal_pipeline.trend import create_app

            self._app = create_app(
                lambda: HistoryStore(SETTINGS.history_url), dependencies=[Depends(requires_authenticated())]
            )
        return self._app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.build()(scope, receive, send)


app = LazyTrendApp()


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
