"""A property-based run over the OpenAPI spec (schemathesis): no request gets a 5xx."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from service.api.app import create_app
from service.config import Settings


@pytest.fixture(scope="module")
def app(service_index):
    app = create_app(Settings(index_dir=service_index))
    from fastapi.testclient import TestClient

    with TestClient(app):  # runs the lifespan: the index is loaded
        yield app


@pytest.fixture(scope="module")
def api_schema(app):
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def test_no_server_errors(api_schema):
    """25 generated requests per operation, parameters and bodies from the spec (and, through
    it, random bytes as uploads); derandomized, so a failure reproduces."""
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 11
    statuses: dict[int, int] = {}
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def run(case):
            label = case.operation.label
            response = case.call()
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            assert response.status_code < 500, (label, response.status_code,
                                                response.text[:300])
            if response.status_code >= 400:
                assert "detail" in response.json(), label

        run()
    print(statuses)
    assert sum(statuses.values()) >= 10 * len(operations), statuses
    assert statuses.get(200, 0) >= len(operations), f"few requests got through: {statuses}"


def test_docs_and_spec_are_served(app):
    from fastapi.testclient import TestClient

    with TestClient(app) as c:
        assert "swagger" in c.get("/docs").text.lower()
        spec = c.get("/openapi.json").json()
    for path in ("/search", "/compose", "/slices/{slice_id}/similar", "/slices/{slice_id}",
                 "/slices/{slice_id}/image.png", "/slices/{slice_id}/overlay.png",
                 "/patients/{patient_id}", "/healthz", "/readyz", "/metrics", "/info"):
        assert path in spec["paths"], path


def test_docs_carry_examples(app):
    from fastapi.testclient import TestClient

    with TestClient(app) as c:
        spec = c.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    for name in ("SearchResponse", "ComposeResponse", "Neighbor", "IndexInfo"):
        assert schemas[name].get("examples"), name
    space = next(p for p in spec["paths"]["/search"]["post"]["parameters"] if p["name"] == "space")
    assert {e["value"] for e in space["examples"].values()} == {"normal", "abnormal", "concat"}


def test_docs_and_page_work_offline(app):
    """/, /docs and /redoc name no external host, and every asset they name is served."""
    import re

    from fastapi.testclient import TestClient

    with TestClient(app) as c:
        for page in ("/", "/docs", "/redoc"):
            html = c.get(page).text
            assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", html, re.I), page
            assets = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", html)
            assets += re.findall(r"""(?:url|spec-url)\s*[:=]\s*["']([^"']+)["']""", html)
            local = [a for a in assets if a.startswith("/")]
            assert local, page
            for asset in local:
                assert c.get(asset).status_code == 200, (page, asset)
        assert "swagger-ui-bundle.js" in c.get("/docs").text
