"""Authentication of the deployed API server (the integration cluster of conftest.py): the trend page,
its JSON and the run reports refuse anonymous requests and bad tokens, and a JWT signed with the secret that
docker-compose.yaml once shipped as its default is refused like any forged token."""

from __future__ import annotations

import urllib.error
import urllib.request
import warnings

import jwt
import pytest

from integration.cluster import Cluster

pytestmark = [pytest.mark.integration, pytest.mark.slow]

OLD_PUBLIC_DEFAULT = "change-me-in-production"  # docker-compose.yaml's former AIRFLOW_JWT_SECRET default
TREND_PATHS = ("/gfocal/", "/gfocal/api/trends")  # the page and its JSON (plugins/gfocal_plugin.py)
# a run's report and one of its pictures; no such run is recorded, so a logged-in request gets 404
REPORT = "/gfocal/runs/gfocal_onnxruntime/manual__2026-12-06T01%3A02%3A03.456%2B00%3A00/report/"
REPORT_PATHS = (REPORT, f"{REPORT}pictures/01_42.png")


def _status(cluster: Cluster, path: str, token: str | None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(f"{cluster.base_url}{path}", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def _resigned(token: str, secret: str) -> str:
    """The same header and claims (user, audience, expiry, ...) as `token`, signed with `secret`."""
    header = jwt.get_unverified_header(token)
    claims = jwt.decode(token, options={"verify_signature": False})
    extra = {k: v for k, v in header.items() if k not in ("alg", "typ")}
    with warnings.catch_warnings():  # a short HMAC key is the point here
        warnings.simplefilter("ignore")
        return jwt.encode(claims, secret, algorithm=header["alg"], headers=extra)


@pytest.mark.parametrize(
    ("path", "logged_in"), [*((p, 200) for p in TREND_PATHS), *((p, 404) for p in REPORT_PATHS)]
)
def test_the_trend_page_and_its_json_refuse_unauthenticated_requests(
    cluster: Cluster, path: str, logged_in: int
) -> None:
    assert _status(cluster, path, None) in (401, 403)
    assert _status(cluster, path, "not-a-jwt") in (401, 403)
    assert _status(cluster, path, cluster.token()) == logged_in  # the same request, logged in


def test_a_token_signed_with_the_old_public_default_secret_is_refused(cluster: Cluster) -> None:
    token = cluster.token()
    secret = cluster.env()["AIRFLOW__API_AUTH__JWT_SECRET"]
    assert secret != OLD_PUBLIC_DEFAULT
    # control: re-signing with the deployment's secret keeps the token valid, so only the key differs
    assert _status(cluster, "/gfocal/api/trends", _resigned(token, secret)) == 200
    forged = _resigned(token, OLD_PUBLIC_DEFAULT)
    for path in (*TREND_PATHS, *REPORT_PATHS, "/api/v2/dags"):
        assert _status(cluster, path, forged) in (401, 403), path
