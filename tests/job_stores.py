"""Job stores for tests: SQLite in a temp dir, or Redis on a throwaway redis-server; a store
wrapper that fails one chosen call."""

import threading

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


class FaultyStore:
    """A store whose chosen call fails once, as a Redis timeout or failover, or SQLite's "database
    is locked", does: before the call reaches the store (nothing done), or with `after` once it
    has done its work (the change committed, its answer lost). Every other call goes through."""

    def __init__(self, store):
        self._store = store
        self._faults: dict[str, tuple[bool, object]] = {}
        self._guard = threading.Lock()
        self.failed: list[str] = []

    def fail_once(self, name: str, after: bool = False, when=lambda *args, **kwargs: True) -> None:
        """The next call of `name` whose arguments `when` accepts raises ConnectionError."""
        with self._guard:
            self._faults[name] = (after, when)

    def __getattr__(self, name):
        attribute = getattr(self._store, name)
        if not callable(attribute):
            return attribute

        def call(*args, **kwargs):
            with self._guard:
                fault = self._faults.get(name)
                hit = fault is not None and fault[1](*args, **kwargs)
                if hit:
                    del self._faults[name]
                    self.failed.append(name)
            if not hit:
                return attribute(*args, **kwargs)
            if fault[0]:
                attribute(*args, **kwargs)
            raise ConnectionError(f"injected: the store's {name} failed")

        return call
