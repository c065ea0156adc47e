"""Authentication of the deployed API server (the integration cluster of conftest.py): the trend page
and its JSON refuse anonymous requests and bad tokens, and a JWT signed with the secret that
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


@pytest.mark.parametrize("path", TREND_PATHS)
def test_the_trend_page_and_its_json_refuse_unauthenticated_requests(cluster: Cluster, path: str) -> None:
    assert _status(cluster, path, None) in (401, 403)
    assert _status(cluster, path, "not-a-jwt") in (401, 403)
    assert _status(cluster, path, cluster.token()) == 200  # the same request, logged in


def test_a_token_signed_with_the_old_public_default_secret_is_refused(cluster: Cluster) -> None:
    token = cluster.token()
    secret = cluster.env()["AIRFLOW__API_AUTH__JWT_SECRET"]
    assert secret != OLD_PUBLIC_DEFAULT
    # control: re-signing with the deployment's secret keeps the token valid, so only the key differs
    assert _status(cluster, "/gfocal/api/trends", _resigned(token, secret)) == 200
    forged = _resigned(token, OLD_PUBLIC_DEFAULT)
    for path in (*TREND_PATHS, "/api/v2/dags"):
        assert _status(cluster, path, forged) in (401, 403), path
