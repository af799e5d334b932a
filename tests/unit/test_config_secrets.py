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
