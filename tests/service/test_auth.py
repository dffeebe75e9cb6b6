"""CBIR_API_KEY: when set, everything but /healthz, /readyz, the page and the docs needs it."""

from __future__ import annotations

import pytest

from tests.service.conftest import API_KEY

KEYED = [("GET", "/info"), ("GET", "/model-card"), ("GET", "/metrics"), ("GET", "/slices/0"),
         ("GET", "/slices/0/image.png"), ("GET", "/patients/x"),
         ("POST", "/slices/0/similar"), ("POST", "/search"), ("POST", "/compose")]
OPEN = ["/healthz", "/readyz", "/", "/docs", "/openapi.json", "/static/app.js"]


@pytest.mark.parametrize(("method", "path"), KEYED)
def test_keyed_endpoints_refuse_a_missing_or_wrong_key(keyed_client, method, path):
    r = keyed_client.request(method, path)
    assert r.status_code == 401 and "missing API key" in r.json()["detail"]
    assert r.headers["www-authenticate"] == "Bearer"
    for headers in ({"X-API-Key": "nope"}, {"Authorization": "Bearer nope"}):
        r = keyed_client.request(method, path, headers=headers)
        assert r.status_code == 401 and r.json()["detail"] == "wrong API key"


@pytest.mark.parametrize("path", OPEN)
def test_open_endpoints_need_no_key(keyed_client, path):
    assert keyed_client.get(path).status_code == 200


def test_the_right_key_works_both_ways(keyed_client, indexed_png):
    data = indexed_png.read_bytes()
    for headers in ({"X-API-Key": API_KEY}, {"Authorization": f"Bearer {API_KEY}"}):
        r = keyed_client.post("/search?k=2", files={"file": ("q.png", data)}, headers=headers)
        assert r.status_code == 200, r.text
        assert keyed_client.get("/info", headers=headers).json()["auth_required"] is True


def test_without_a_key_set_nothing_asks_for_one(client, indexed_png):
    assert client.get("/info").json()["auth_required"] is False
    r = client.post("/search?k=1", files={"file": ("q.png", indexed_png.read_bytes())})
    assert r.status_code == 200


def test_openapi_declares_both_schemes(client):
    schemes = client.get("/openapi.json").json()["components"]["securitySchemes"]
    assert {"HTTPBearer", "APIKeyHeader"} <= set(schemes)
