"""Job stores for tests: SQLite in a temp dir, or Redis on a throwaway redis-server."""

from serve_app.jobs.redis_store import RedisJobStore
from serve_app.jobs.sqlite_store import SqliteJobStore
from tests.redis_server import RedisServer

TTL = 60.0


class Backend:
    """Opens a store of one kind, and re-opens it as a restarted runner (or server) would."""

    def __init__(self, kind: str, tmp_path):
        self.kind = kind
        self.tmp_path = tmp_path
        self.server = RedisServer(tmp_path).start() if kind == "redis" else None
        self.stores = []

    def open(self):
        if self.kind == "redis":
            store = RedisJobStore(self.server.url, ttl_s=TTL, prefix="test:jobs")
        else:
            store = SqliteJobStore(self.tmp_path / "data", ttl_s=TTL)
        self.stores.append(store)
        return store

    def crash_and_reopen(self):
        """The process holding the store dies without closing it (and for Redis, the server too)."""
        if self.kind == "redis":
            self.server.restart(crash=True)
        return self.open()

    def close(self):
        for store in self.stores:
            store.close()
        if self.server is not None:
            self.server.stop()
