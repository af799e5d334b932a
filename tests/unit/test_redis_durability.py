"""The Redis job store refuses a server that would lose or evict jobs, saying what to change; a
managed Redis that forbids CONFIG GET is refused too unless the config says warn. Real redis-server."""

import logging
import time

import pytest

from serve_app.jobs.redis_store import RedisJobStore, RedisNotDurable
from tests.redis_server import RedisServer


@pytest.fixture
def server(tmp_path):
    server = RedisServer(tmp_path).start()  # appendonly yes, maxmemory-policy noeviction (Redis' default)
    yield server
    server.stop()


def _admin(server):
    import redis

    return redis.Redis.from_url(server.url)


def test_a_durable_server_is_accepted(server):
    store = RedisJobStore(server.url, prefix="t")
    store.ping()
    store.close()


@pytest.mark.parametrize("setting, value, words", [
    ("appendonly", "no", "appendonly is no: a restart would lose every job"),
    ("maxmemory-policy", "allkeys-lru", "maxmemory-policy is allkeys-lru: Redis could evict job records"),
])
def test_a_server_that_could_lose_jobs_is_refused_saying_why(server, setting, value, words):
    _admin(server).config_set(setting, value)
    with pytest.raises(RedisNotDurable) as refused:
        RedisJobStore(server.url, prefix="t")
    assert words in str(refused.value)


def test_config_get_forbidden_refuses_unless_told_to_warn(tmp_path, caplog):
    server = RedisServer(tmp_path)
    server.start()
    try:
        # A managed Redis: CONFIG is renamed away. Restart with it disabled through an ACL user.
        admin = _admin(server)
        admin.acl_setuser("app", enabled=True, nopass=True, commands=["+@all", "-config"], keys=["*"])
        url = f"redis://app@127.0.0.1:{server.port}/0"
        with pytest.raises(RedisNotDurable) as refused:
            RedisJobStore(url, prefix="t")
        assert "redis_config_check: warn" in str(refused.value)
        with caplog.at_level(logging.WARNING, logger="ray.serve"):
            store = RedisJobStore(url, prefix="t", config_check="warn")
        assert "going on because jobs.redis_config_check is warn" in caplog.text
        job, _ = store.create("image", {"prompt": "x"})
        assert store.get(job.id).state == "queued"
        store.close()
    finally:
        server.stop()


def test_an_unreachable_server_fails_within_the_connect_timeout(tmp_path):
    from tests.helpers import free_port

    started = time.monotonic()
    with pytest.raises(Exception):  # noqa: B017 - a connect error or a timeout, by platform
        RedisJobStore(f"redis://10.255.255.1:{free_port()}/0", connect_timeout_s=0.5, socket_timeout_s=0.5)
    assert time.monotonic() - started < 5


def test_a_server_that_accepts_but_never_answers_fails_within_the_socket_timeout():
    """A stalled Redis (connected, silent) fails a store call instead of hanging a worker thread."""
    import socket

    import redis

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        started = time.monotonic()
        with pytest.raises(redis.TimeoutError):
            RedisJobStore(f"redis://127.0.0.1:{silent.getsockname()[1]}/0", connect_timeout_s=0.5, socket_timeout_s=1)
        assert 1 <= time.monotonic() - started < 5


def test_a_job_read_racing_its_delete_is_whole_or_absent(server, monkeypatch):
    """Redis may run another client's command between a plain pipeline's commands: a delete landing
    after the record's HGETALL left a succeeded job with no history or result (a result read then
    answered 500, not 404). Reading one job is one MULTI/EXEC snapshot."""
    from serve_app.jobs.model import ResultFile

    store = RedisJobStore(server.url, ttl_s=60.0, prefix="test:race")
    job, _ = store.create("image", {"prompt": "p"})
    claimed = store.claim(["image"])
    store.save_result(job.id, claimed.attempts, {"images": [{"file": "image-0.png"}]},
                      [(ResultFile("image-0.png", "image/png", 3), b"png")])
    real_pipeline = store._redis.pipeline

    def pipeline(transaction=True, shard_hint=None):
        pipe = real_pipeline(transaction=transaction, shard_hint=shard_hint)
        if transaction:  # MULTI/EXEC: Redis runs it whole; the delete comes before or after
            run = pipe.execute

            def execute(raise_on_error=True):
                replies = run(raise_on_error)
                store.delete(job.id)
                return replies

            pipe.execute = execute
            return pipe

        def interleaved(raise_on_error=True):  # the delete lands after the first read
            replies = []
            for index, (args, options) in enumerate(pipe.command_stack):
                replies.append(real_execute(*args, **options))
                if index == 0:
                    store.delete(job.id)
            pipe.reset()
            return replies

        pipe.execute = interleaved
        return pipe

    real_execute = store._redis.execute_command
    monkeypatch.setattr(store._redis, "pipeline", pipeline)
    seen = store.get(job.id)
    assert seen is None or (seen.result is not None and seen.history), f"a torn read: {seen}"
    assert store.get(job.id) is None
    store.close()
