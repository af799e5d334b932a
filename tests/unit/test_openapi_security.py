"""The OpenAPI document declares how to authenticate (serve_app.api.schema_security): a bearer
scheme, and on every operation the scope the Guard asks of it, so Swagger UI's Authorize button
sends the key and generated clients know to. The A2A Agent Card declares the same with keys."""

from __future__ import annotations

from serve_app.api.app import build_api
from serve_app.security.guard import is_public, required_scope
from tests.keyed_app import keyed_app


def _operations(schema: dict):
    for path, item in schema["paths"].items():
        for method, operation in item.items():
            yield method.upper(), path, operation


def test_the_document_declares_a_bearer_scheme_and_each_operations_scope():
    schema = build_api().openapi()
    assert schema["components"]["securitySchemes"]["bearer"]["type"] == "http"
    assert schema["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    needs = {(method, path): operation["security"] for method, path, operation in _operations(schema)}
    assert needs[("POST", "/v1/images/generations")] == [{"bearer": ["generate"]}], "the OpenAI routes too"
    assert needs[("GET", "/v1/admin/usage")] == [{"bearer": ["admin"]}]
    assert needs[("GET", "/v1/jobs/{job_id}")] == [{"bearer": ["read"]}]
    assert needs[("GET", "/livez")] == [] and needs[("GET", "/readyz")] == []
    for (method, path), security in needs.items():
        expected = [] if is_public(method, path) else [{"bearer": [required_scope(method, path)]}]
        assert security == expected, (method, path)


def test_the_served_document_is_the_secured_one(tmp_path):
    served = keyed_app(tmp_path)
    try:
        schema = served.client.get("/openapi.json").json()
        assert "bearer" in schema["components"]["securitySchemes"]
        assert schema["paths"]["/v1/images"]["post"]["security"] == [{"bearer": ["generate"]}]
        assert served.client.get("/docs").status_code == 200
    finally:
        served.close()


def test_with_keys_the_agent_card_asks_for_a_bearer_key_with_the_generate_scope(tmp_path):
    served = keyed_app(tmp_path)
    try:
        card = served.client.get("/.well-known/agent-card.json").json()
        assert card["securitySchemes"]["bearer"]["httpAuthSecurityScheme"]["scheme"] == "Bearer"
        assert card["securityRequirements"] == [{"schemes": {"bearer": {"list": ["generate"]}}}]
    finally:
        served.close()
    from starlette.testclient import TestClient

    keyless = build_api()
    keyless.state.services = served.client.app.state.services
    card = TestClient(keyless, client=("127.0.0.1", 1)).get("/.well-known/agent-card.json").json()
    assert "securitySchemes" not in card, "without keys nothing is asked for"
