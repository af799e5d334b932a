"""Fixtures for unit tests: `backend`/`store` run a test against SQLite and against a real Redis."""

import pytest

from tests.job_stores import Backend


@pytest.fixture(params=["sqlite", "redis"])
def backend(request, tmp_path):
    backend = Backend(request.param, tmp_path)
    yield backend
    backend.close()


@pytest.fixture
def store(backend):
    return backend.open()
