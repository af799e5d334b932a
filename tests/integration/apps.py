"""Running genserve apps for integration tests: one helper starts Ray and Serve, and one pool keeps
the shared app running across modules.

- `ray_and_serve(...)`: a fresh local Ray (or one joined by address) with Serve's proxy on a free
  loopback port; every integration test that needs Ray starts it here.
- `serving(args, base)`: the genserve app built from `args` on a Ray already running;
  `running_app(args)` the same on a Ray of its own.
- `POOL.get(name, make)`: the app of a named shared config, started on first use and kept until a
  test needs another app, every shared app on one Ray kept across the switches (`conftest.py`
  orders tests so each shared app starts once per session).
"""

import contextlib
import copy
import tempfile
from dataclasses import dataclass
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
def serving(args: dict, base: str, timeout_s: float = 180):
    """The genserve app built from `args`, run on the Ray and Serve already started (Serve's proxy
    at `base`); yields an HTTP client. The caller deletes the app, or shuts Serve down.

    Jobs are stored in a temporary directory unless `args["jobs"]["data_dir"]` is absolute (tests
    that start the app again on the same store pass one), never under the repository's ./data.
    """
    from ray import serve

    from serve_app.builder import build_app

    with contextlib.ExitStack() as stack:
        args = copy.deepcopy(args)
        if not Path(args["jobs"]["data_dir"]).is_absolute():
            args["jobs"]["data_dir"] = stack.enter_context(tempfile.TemporaryDirectory(prefix="genserve-jobs-"))
        serve.run(build_app(args), name=APP_NAME, route_prefix="/")
        yield stack.enter_context(httpx.Client(base_url=base, timeout=timeout_s))


@contextlib.contextmanager
def running_app(args: dict, timeout_s: float = 180, **ray_init):
    """Ray + Serve of its own with the genserve app built from `args`; yields an HTTP client."""
    with ray_and_serve(**{"num_cpus": 4, **ray_init}) as base, serving(args, base, timeout_s) as client:
        yield client


@dataclass(frozen=True)
class SharedRay:
    """The Ray the shared apps run on, one after another: Serve's proxy at `base`; Ray's own temp
    dir (short: it holds unix sockets; the dashboard writes the Prometheus service-discovery file
    there), and the port Ray exports metrics on (tests/integration/test_metrics.py)."""

    base: str
    ray_dir: str
    metrics_port: int


class AppPool:
    """At most one shared app at a time, all on one Ray and Serve: asking for another app deletes the
    one running and runs the next on the same cluster (starting Ray and Serve is tens of seconds on
    2 cores). Modules that need a Ray of their own (`ray_and_serve`) stop it all first."""

    def __init__(self):
        self._name: str | None = None
        self._stack: contextlib.ExitStack | None = None
        self._app = None
        self._ray_stack: contextlib.ExitStack | None = None
        self._ray: SharedRay | None = None

    def get(self, name: str, make: Callable[[contextlib.ExitStack, SharedRay], dict]) -> dict:
        """The running app `name`, or `make(stack, ray)` run after the one running is deleted."""
        if self._name != name:
            self._close_app()
            ray = self._shared_ray()
            stack = contextlib.ExitStack()
            try:
                self._app = make(stack, ray)
            except BaseException:
                self._close(stack)
                raise
            self._name, self._stack = name, stack
        return self._app

    def retire(self) -> None:
        """A test is replacing the running app (test_jobs_restart): the next `get` deletes whatever
        runs under the app's name then, and closes what this one left open."""
        self._name, self._app = None, None

    def stop(self) -> None:
        self._close_app()
        ray_stack, self._ray_stack, self._ray = self._ray_stack, None, None
        if ray_stack is not None:
            ray_stack.close()

    def _shared_ray(self) -> SharedRay:
        if self._ray is None:
            stack = contextlib.ExitStack()
            try:
                ray_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="ray", dir="/tmp",
                                                                          ignore_cleanup_errors=True))
                metrics_port = free_port()
                # One logical GPU and 9 logical CPUs: what configs/single-gpu.yaml reserves (a shared
                # app too: test_single_gpu.py); torch sees no GPU, so every model runs on the CPU.
                base = stack.enter_context(ray_and_serve(num_cpus=9, num_gpus=1, include_dashboard=True,
                                                         dashboard_host="127.0.0.1",
                                                         dashboard_port=free_port(), _metrics_export_port=metrics_port,
                                                         _temp_dir=ray_dir))
            except BaseException:
                stack.close()
                raise
            self._ray_stack, self._ray = stack, SharedRay(base, ray_dir, metrics_port)
        return self._ray

    def _close_app(self) -> None:
        stack, self._stack, self._name, self._app = self._stack, None, None, None
        if stack is not None:
            self._close(stack)

    def _close(self, stack: contextlib.ExitStack) -> None:
        """Delete the app running on the shared Ray (whichever: a test may have replaced it), then
        close what it left open (its servers, its temp dirs)."""
        from ray import serve

        try:
            if self._ray is not None and APP_NAME in serve.status().applications:
                serve.delete(APP_NAME)
        finally:
            stack.close()


POOL = AppPool()
