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
