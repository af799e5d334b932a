"""Running genserve apps for integration tests: one helper starts Ray and Serve, and one pool keeps
the shared app running across modules.

- `ray_and_serve(...)`: a fresh local Ray (or one joined by address) with Serve's proxy on a free
  loopback port; every integration test that needs Ray starts it here.
- `running_app(args)`: the genserve app built from `args` on its own Ray, for modules whose config
  cannot be shared (an app-wide setting the shared app's tests rely on: the LLM enhancer, models
  loaded from folders, no video model).
- `POOL.get(name, make)`: the app of a named shared config, started on first use and kept until a
  test needs another app (`conftest.py` orders tests so each shared app starts once per session).
"""

import contextlib
import copy
import tempfile
from pathlib import Path
from typing import Callable

import httpx

from serve_app import APP_NAME
from serve_app.config import app_args_from_config
from tests.helpers import free_port

ROOT = Path(__file__).parents[2]


def dev_args() -> dict:
    """configs/dev.yaml's typed args as a dict, for tests to adjust."""
    return app_args_from_config(ROOT / "configs" / "dev.yaml").model_dump()


@contextlib.contextmanager
def ray_and_serve(proxy_location: str | None = None, **ray_init):
    """Ray (a fresh local cluster unless `address` is given) and Serve with its HTTP proxy on a free
    loopback port; yields the base URL. Stops any shared app first: one Ray per process."""
    import ray
    from ray import serve

    POOL.stop()
    # address="local": always a fresh cluster of our own, never one another process started on this
    # machine (ray.init() would otherwise join it, and serve.shutdown() would stop its apps).
    ray_init = {"address": "local", "log_to_driver": False, **ray_init}
    if ray_init["address"] == "local":  # options of a new cluster; one joined by address has its own
        ray_init.setdefault("include_dashboard", False)
    ray.init(**ray_init)
    try:
        port = free_port()
        options = {} if proxy_location is None else {"proxy_location": proxy_location}
        serve.start(http_options={"host": "127.0.0.1", "port": port}, **options)
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@contextlib.contextmanager
def running_app(args: dict, timeout_s: float = 180, **ray_init):
    """Ray + Serve with the genserve app built from `args`; yields an HTTP client on a free port.

    Jobs are stored in a temporary directory unless `args["jobs"]["data_dir"]` is absolute (tests
    that start the app again on the same store pass one), never under the repository's ./data.
    """
    from ray import serve

    from serve_app.builder import build_app

    with contextlib.ExitStack() as stack:
        args = copy.deepcopy(args)
        if not Path(args["jobs"]["data_dir"]).is_absolute():
            args["jobs"]["data_dir"] = stack.enter_context(tempfile.TemporaryDirectory(prefix="genserve-jobs-"))
        base = stack.enter_context(ray_and_serve(**{"num_cpus": 4, **ray_init}))
        serve.run(build_app(args), name=APP_NAME, route_prefix="/")
        yield stack.enter_context(httpx.Client(base_url=base, timeout=timeout_s))


class AppPool:
    """At most one shared app at a time; asking for another stops the one running."""

    def __init__(self):
        self._name: str | None = None
        self._stack: contextlib.ExitStack | None = None
        self._app = None

    def get(self, name: str, make: Callable[[contextlib.ExitStack], dict]) -> dict:
        if self._name != name:
            self.stop()
            stack = contextlib.ExitStack()
            try:
                self._app = make(stack)
            except BaseException:
                stack.close()
                raise
            self._name, self._stack = name, stack
        return self._app

    def retire(self) -> None:
        """A test is replacing the running app (test_jobs_restart): the next `get` starts its app
        afresh, stopping this one's Ray then."""
        self._name, self._app = None, None

    def stop(self) -> None:
        stack, self._stack, self._name, self._app = self._stack, None, None, None
        if stack is not None:
            stack.close()


POOL = AppPool()
