"""A throwaway `redis-server` on loopback for tests: own port, own directory, append-only file.

It never touches a system Redis (the Debian package may start one on 6379): each server gets a
free port and a temp directory, and is stopped by its own PID.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers import free_port, wait_until

REDIS_SERVER = shutil.which("redis-server")
MISSING = "redis-server is not installed (Debian: apt-get install redis-server; .ci/run installs it)"


class RedisServer:
    def __init__(self, directory: Path, password: str | None = None):
        if REDIS_SERVER is None:
            pytest.skip(MISSING)
        self.directory = directory
        self.password = password  # --requirepass: clients must send it
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        import redis

        log = open(self.directory / "redis.log", "ab")
        self.process = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
             "--save", "", "--appendonly", "yes", "--appendfsync", "always", "--protected-mode", "yes",
             *(["--requirepass", self.password] if self.password else [])],
            stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()
        client = redis.Redis(port=self.port, socket_connect_timeout=1, password=self.password)
        try:
            wait_until(client.ping, timeout_s=20, interval_s=0.05, what=f"redis-server on port {self.port}")
        finally:
            client.close()
        return self

    def stop(self, crash: bool = False) -> None:
        """SIGTERM (Redis flushes and exits), or with `crash` SIGKILL: only what was fsynced survives."""
        if self.process is not None and self.process.poll() is None:
            if crash:
                self.process.kill()
            else:
                self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def restart(self, crash: bool = False) -> None:
        """Stop and start again on the same port and directory, reading back the append-only file."""
        self.stop(crash=crash)
        self.start()
