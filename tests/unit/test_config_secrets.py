"""A Redis password written in the config never reaches a config error (pydantic would print the
input it rejected, redis_url included; it shortens long inputs from the middle, so redis_url is
put last in each, where it would show)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from serve_app.config import AppArgs

SECRET = "s3cr3t"
REDIS = f"redis://:{SECRET}@h/0"  # short: the end of a shortened input shows it whole


@pytest.mark.parametrize("args", [
    {"jobs": {"store": "redis", "redis_url": REDIS.replace("redis://", "http://")}},  # its own check
    {"jobs": {"runner_lease_s": 1, "redis_timeout_s": 1, "store": "redis", "redis_url": REDIS}},  # a jobs check
    {"default_model": "x", "jobs": {"redis_url": REDIS}},  # a check of the whole config
], ids=["redis_url", "jobs", "app"])
def test_a_config_error_never_shows_the_redis_password(args):
    with pytest.raises(ValidationError) as caught:
        AppArgs.model_validate(args)
    assert SECRET not in str(caught.value)
    assert caught.value.errors(), "the error still says what is wrong"


def test_the_redis_password_comes_from_the_environment_or_a_file_not_the_url(tmp_path, monkeypatch):
    import redis

    from serve_app.config import JobsConfig
    from serve_app.jobs.runner import open_store
    from serve_app.security.keys import KeyLimits
    from serve_app.security.limiter import KeyLimiter
    from tests.redis_server import RedisServer

    server = RedisServer(tmp_path, password=SECRET).start()
    try:
        config = JobsConfig(store="redis", redis_url=server.url)
        assert SECRET not in repr(config), "the deployment argument holds no password"
        monkeypatch.delenv("GENSERVE_REDIS_PASSWORD", raising=False)
        with pytest.raises(redis.AuthenticationError):
            open_store(config)
        monkeypatch.setenv("GENSERVE_REDIS_PASSWORD", SECRET)
        open_store(config).ping()
        KeyLimiter(server.url, password=config.redis_password()).hit_request("k", KeyLimits(requests_per_minute=5))
        monkeypatch.delenv("GENSERVE_REDIS_PASSWORD")
        (tmp_path / "redis-password").write_text(SECRET + "\n")
        open_store(JobsConfig(store="redis", redis_url=server.url,
                              redis_password_file=str(tmp_path / "redis-password"))).ping()
        with pytest.warns(DeprecationWarning, match=r"\$GENSERVE_REDIS_PASSWORD"):
            in_url = JobsConfig(store="redis", redis_url=server.url.replace("redis://", f"redis://:{SECRET}@"))
        open_store(in_url).ping()  # a password inside redis_url still works
    finally:
        server.stop()


def test_a_config_error_never_shows_the_limits_storage_password():
    with pytest.raises(ValidationError) as caught:
        AppArgs.model_validate({"auth": {"signed_url_ttl_s": 0, "limits_storage": REDIS}})
    assert SECRET not in str(caught.value) and "signed_url_ttl_s" in str(caught.value)


def test_a_separate_counter_redis_takes_its_password_from_its_own_variable_or_file(tmp_path, monkeypatch):
    from limits.errors import StorageError
    from redis import AuthenticationError

    from serve_app.config import AuthConfig, JobsConfig
    from serve_app.security.keys import KeyLimits
    from serve_app.security.limiter import KeyLimiter
    from tests.redis_server import RedisServer

    def counts(auth: AuthConfig) -> None:  # what each Ingress replica does, beside a SQLite job store
        limiter = KeyLimiter(auth.limits_storage, password=auth.limits_storage_password(JobsConfig()))
        limiter.hit_request("k", KeyLimits(requests_per_minute=5))

    server = RedisServer(tmp_path, password=SECRET).start()
    try:
        auth = AuthConfig(limits_storage=server.url)
        assert SECRET not in repr(auth), "the deployment argument holds no password"
        monkeypatch.setenv("GENSERVE_REDIS_PASSWORD", SECRET)  # the job store's: another server's
        monkeypatch.delenv("GENSERVE_LIMITS_REDIS_PASSWORD", raising=False)
        with pytest.raises((AuthenticationError, StorageError)):
            counts(auth)
        monkeypatch.setenv("GENSERVE_LIMITS_REDIS_PASSWORD", SECRET)
        counts(auth)
        monkeypatch.delenv("GENSERVE_LIMITS_REDIS_PASSWORD")
        (tmp_path / "limits-password").write_text(SECRET + "\n")
        counts(AuthConfig(limits_storage=server.url, limits_storage_password_file=str(tmp_path / "limits-password")))
        with pytest.warns(DeprecationWarning, match=r"\$GENSERVE_LIMITS_REDIS_PASSWORD"):
            in_url = AuthConfig(limits_storage=server.url.replace("redis://", f"redis://:{SECRET}@"))
        counts(in_url)  # a password inside limits_storage still works
    finally:
        server.stop()


def test_counters_on_the_job_stores_redis_server_use_its_password_in_any_database(tmp_path, monkeypatch):
    from serve_app.config import AuthConfig, JobsConfig

    monkeypatch.setenv("GENSERVE_REDIS_PASSWORD", "jobs-secret")
    monkeypatch.setenv("GENSERVE_LIMITS_REDIS_PASSWORD", "limits-secret")
    jobs = JobsConfig(store="redis", redis_url="redis://genserve-redis:6380/0")
    assert AuthConfig().limits_storage_password(jobs) == "jobs-secret", "the default: jobs.redis_url itself"
    assert AuthConfig(limits_storage="redis://genserve-redis:6380/1").limits_storage_password(jobs) == "jobs-secret"
    assert AuthConfig(limits_storage="redis://other:6380/1").limits_storage_password(jobs) == "limits-secret"
    assert AuthConfig(limits_storage="memory://").limits_storage_password(jobs) is None
    assert AuthConfig().limits_storage_password(JobsConfig()) is None, "sqlite jobs: counters in memory"


def test_a_secret_file_error_names_the_file_and_field_never_the_contents(tmp_path, monkeypatch):
    from deployments.secrets import SecretMissing, read_secret

    (tmp_path / "binary").write_bytes(SECRET.encode() + b"\xfe")
    with pytest.raises(SecretMissing, match="jobs.redis_password_file: .*binary is not UTF-8 text") as caught:
        read_secret("UNUSED", str(tmp_path / "binary"), field="jobs.redis_password")
    assert SECRET not in str(caught.value) and "xfe" not in str(caught.value)
    monkeypatch.delenv("GENSERVE_UNSET", raising=False)
    assert read_secret("GENSERVE_UNSET", None, field="x") is None
    with pytest.raises(SecretMissing, match=r"x_env names \$GENSERVE_UNSET, which is not set"):
        read_secret("GENSERVE_UNSET", None, field="x", required=True)
    assert read_secret(None, None, field="x", required=True) is None, "no source named: no secret wanted"
