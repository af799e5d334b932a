"""413 for bodies over the limit: by Content-Length before reading, or counted while streaming."""

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from serve_app.api.body_limit import BodyLimit


@pytest.fixture(autouse=True)
def _restore_limit():
    saved = BodyLimit.max_bytes
    yield
    BodyLimit.configure(saved)


def _client(limit: int) -> TestClient:
    app = FastAPI()
    app.add_middleware(BodyLimit)
    BodyLimit.configure(limit)

    @app.post("/echo")
    async def echo(body: dict) -> dict:
        return {"size": len(body["data"])}

    return TestClient(app)


def test_bodies_within_the_limit_pass():
    client = _client(1000)
    assert client.post("/echo", json={"data": "x" * 900}).json() == {"size": 900}


def test_a_declared_length_over_the_limit_is_refused_before_reading():
    response = _client(1000).post("/echo", json={"data": "x" * 1000})
    assert response.status_code == 413
    assert response.json() == {"detail": "request body is larger than the limit of 1000 bytes (max_body_bytes)"}


def test_a_streamed_body_is_counted_as_it_arrives():
    def chunks():
        yield b'{"data": "'
        for _ in range(10):
            yield b"x" * 200
        yield b'"}'

    response = _client(1000).post("/echo", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413 and "max_body_bytes" in response.json()["detail"]
