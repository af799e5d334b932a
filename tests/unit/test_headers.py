"""Browser-facing headers (serve_app.api.headers) and the docs switch (auth.docs), on the real app:
the console gets a strict Content-Security-Policy it still works under, job files are never sniffed
or run, nothing is framed, and with keys the CDN-loaded docs pages are off unless enabled, while an
admin key can still read /openapi.json."""

from __future__ import annotations

import re

import pytest

from serve_app.config import AuthConfig
from serve_app.ui import STATIC
from tests.keyed_app import FILE, keyed_app
from tests.keys import bearer


@pytest.fixture
def served(tmp_path):
    app = keyed_app(tmp_path)
    yield app
    app.close()


def _policy(header: str) -> dict[str, list[str]]:
    return {part.split()[0]: part.split()[1:] for part in (p.strip() for p in header.split(";")) if part}


def test_the_console_is_served_with_a_strict_self_only_policy(served):
    response = served.client.get("/ui/")
    assert response.status_code == 200 and "genserve console" in response.text
    policy = _policy(response.headers["Content-Security-Policy"])
    assert policy["default-src"] == ["'none'"] and policy["frame-ancestors"] == ["'none'"]
    assert policy["script-src"] == ["'self'"] and policy["connect-src"] == ["'self'"]
    assert policy["style-src"] == ["'self'"]
    assert all("unsafe" not in value and "http" not in value for values in policy.values() for value in values)
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert served.client.get("/ui/app.js").headers["Content-Security-Policy"] == response.headers["Content-Security-Policy"]


def test_the_console_loads_nothing_its_policy_forbids():
    """What the policy allows is what serve_app/ui/static uses: its own files, and data:/blob: media."""
    html = (STATIC / "index.html").read_text()
    assert "<script>" not in html and not re.search(r"\son\w+=", html), "no inline script or handler"
    assert " style=" not in html, "no inline style attribute"
    for url in re.findall(r'(?:src|href)="([^"#]+)"', html):
        assert not re.match(r"^[a-z]+:|^//", url), url
    for source in STATIC.rglob("*.js"):
        code = source.read_text()
        assert not re.search(r"""["'`](https?:)?//""", code), f"{source.name} loads from another origin"
        assert "eval(" not in code and "new Function" not in code, source.name
    app = (STATIC / "app.js").read_text()
    assert "URL.createObjectURL" in app and "data:image/png;base64" in app  # hence img-src/media-src blob: data:


def test_a_job_file_is_not_sniffed_framed_or_run_and_says_its_name(served):
    response = served.client.get(f"/v1/jobs/{served.job_id}/files/{FILE}", headers=bearer(served.keys["gen"]))
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Content-Disposition"] == f'inline; filename="{served.job_id}-{FILE}"'
    policy = _policy(response.headers["Content-Security-Policy"])
    assert "sandbox" in policy and policy["default-src"] == ["'none'"] and policy["frame-ancestors"] == ["'none'"]


def test_every_answer_refuses_framing_refusals_included(served):
    for response in (served.client.get("/v1/models"), served.client.get("/livez"),
                     served.client.get("/v1/jobs", headers=bearer(served.keys["reader"]))):
        assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"], response.url
        assert response.headers["X-Frame-Options"] == "DENY"
        assert response.headers["X-Content-Type-Options"] == "nosniff"


def test_with_keys_the_docs_are_off_unless_enabled_and_the_schema_needs_admin(tmp_path):
    assert AuthConfig(keys_file="k.yaml").docs_served is False
    assert AuthConfig(keys_file="k.yaml", docs=True).docs_served is True
    assert AuthConfig().docs_served is True and AuthConfig(docs=False).docs_served is False
    off = keyed_app(tmp_path, docs=False)
    try:
        for path in ("/docs", "/redoc"):
            assert off.client.get(path).status_code in (401, 404)
            assert off.client.get(path, headers=bearer(off.keys["admin"])).status_code == 404
        assert off.client.get("/openapi.json").status_code == 401
        assert off.client.get("/openapi.json", headers=bearer(off.keys["gen"])).status_code == 403
        schema = off.client.get("/openapi.json", headers=bearer(off.keys["admin"]))
        assert schema.status_code == 200 and "/v1/images" in schema.json()["paths"]
    finally:
        off.close()


def test_with_the_docs_on_they_and_the_schema_need_no_key(served):
    assert served.client.get("/docs").status_code == 200
    assert served.client.get("/redoc").status_code == 200
    assert served.client.get("/openapi.json").status_code == 200
