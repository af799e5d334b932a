"""Running genserve apps for integration tests: one helper starts Ray and Serve, and one pool keeps
the shared app running across modules.

- `ray_and_serve(...)`: a fresh local Ray (or one joined by address) with Serve's proxy on a free
  loopback port; every integration test that needs Ray starts it here.
- `serving(args, base)`: the genserve app built from `args` on a Ray already running;
  `running_app(args)` the same on a Ray of its own.
- `POOL.get(name, prepare)`: the app of a named shared config, started on first use and kept until a
  test needs another app, every shared app on one Ray kept across the switches (`conftest.py`
  orders tests so each shared app starts once per session). That Ray is held by a process of its
  own (`Keeper`), which `POOL.prestart` has deploy the first shared app while the unit tests run.
"""

import contextlib
import copy
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
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
    with contextlib.ExitStack() as stack:
        serving_deploy(_with_data_dir(args, stack))
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


# A shared app's parts made in the pytest process (its temp dirs, stand-in servers): the genserve
# args to deploy, and what its fixture gives the tests besides the client.
Prepare = Callable[[contextlib.ExitStack], tuple[dict, dict]]


class Keeper:
    """The shared Ray and Serve, held by a process of their own (tests/integration/keeper.py) in a
    session of its own, which may deploy the first shared app while the unit tests still run: on
    2 cores they use about one, and Linux schedules sessions (autogroups) against each other, so the
    keeper's session, niced while it is in the background, takes what they leave."""

    def __init__(self, args: dict | None):
        self._files = tempfile.TemporaryDirectory(prefix="genserve-keeper-")
        folder = Path(self._files.name)
        # Short: Ray's temp dir holds unix sockets (the path limit is ~107 characters).
        self.ray_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")
        self.metrics_port = free_port()
        # One logical GPU and 9 logical CPUs: what configs/single-gpu.yaml reserves (a shared app
        # too: test_single_gpu.py); torch sees no GPU, so every model runs on the CPU.
        ray_init = {"num_cpus": 9, "num_gpus": 1, "include_dashboard": True, "dashboard_host": "127.0.0.1",
                    "dashboard_port": free_port(), "_metrics_export_port": self.metrics_port, "_temp_dir": self.ray_dir}
        (folder / "spec.pickle").write_bytes(pickle.dumps({"ray_init": ray_init, "args": args}))
        self._deploys = args is not None
        self._status, self._log = folder / "status.json", folder / "keeper.log"
        with open(self._log, "wb") as log:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "tests.integration.keeper", str(folder / "spec.pickle"), str(self._status)],
                cwd=ROOT, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        # Once its Ray runs, the keeper puts its session in the background (nice 19) itself.

    def priority(self, nice: int) -> None:
        """The scheduling weight of the keeper's session: Ray and every replica (`autogroup_nice`)."""
        autogroup_nice(self._process.pid, nice)

    def wait(self, *states: str, timeout_s: float = 600) -> dict:
        """The keeper's status once it is in one of `states`; fails with its log if it stops or fails."""
        deadline = time.monotonic() + timeout_s
        while True:
            status = json.loads(self._status.read_text()) if self._status.exists() else {}
            if status.get("state") == "failed":
                raise RuntimeError(f"the shared app did not start:\n{status['error']}")
            if status.get("state") in states:
                return status
            if self._process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the shared Ray's keeper {'exited' if self._process.poll() is not None else 'timed out'} "
                                   f"before {states}; its log ends:\n{self._log.read_text()[-3000:]}")
            time.sleep(0.2)

    def stop(self) -> None:
        """Close the keeper's stdin: it shuts Serve down (replicas drain) and Ray. One still deploying
        (a session cut short) reads no stdin: SIGTERM interrupts it. Killed if it hangs."""
        try:
            self._process.stdin.close()
            state = json.loads(self._status.read_text())["state"] if self._status.exists() else None
            if state not in ("ready", "failed") and self._deploys and self._process.poll() is None:
                self._process.terminate()
            self._process.wait(timeout=180)
        except subprocess.TimeoutExpired:
            os.killpg(self._process.pid, signal.SIGKILL)
            self._process.wait()
        finally:
            shutil.rmtree(self.ray_dir, ignore_errors=True)
            self._files.cleanup()


class AppPool:
    """At most one shared app at a time, all on one Ray and Serve: asking for another app deletes the
    one running and runs the next on the same cluster (starting Ray and Serve is tens of seconds on
    2 cores). The Ray is a `Keeper`'s, which this process joins; `prestart` has it deploy the first
    app early. Modules that need a Ray of their own (`ray_and_serve`) stop it all first."""

    def __init__(self):
        self._name: str | None = None
        self._stack: contextlib.ExitStack | None = None
        self._app = None
        self._keeper: Keeper | None = None
        self._ray: SharedRay | None = None
        self._early: tuple[str, contextlib.ExitStack, dict] | None = None

    def prestart(self, name: str, prepare: Prepare) -> None:
        """Start the shared Ray now with app `name` deploying on it, for the first `get(name)`,
        while the tests before it run. Nothing if the shared Ray is running already."""
        if self._keeper is not None:
            return
        stack = contextlib.ExitStack()
        try:
            args, extras = prepare(stack)
            self._keeper = Keeper(_with_data_dir(args, stack))
        except BaseException:
            stack.close()
            raise
        self._early = (name, stack, extras)

    def get(self, name: str, prepare: Prepare) -> dict:
        """The running app `name`, or the one `prepare` makes, run after the one running is deleted:
        {client, base, ray_dir, metrics_port, and the extras `prepare` gave}."""
        if self._name != name:
            self._close_app()
            ray = self._shared_ray()
            early, self._early = self._early, None
            if early is not None and early[0] != name:
                self._keeper.wait("ready")
                self._close(early[1])  # started for a test that did not run first: deleted
                early = None
            stack = early[1] if early is not None else contextlib.ExitStack()
            try:
                if early is not None:
                    self._keeper.wait("ready")
                    extras = early[2]
                else:
                    args, extras = prepare(stack)
                    serving_deploy(_with_data_dir(args, stack))
                client = stack.enter_context(httpx.Client(base_url=ray.base, timeout=180))
            except BaseException:
                self._close(stack)
                raise
            self._app = {"client": client, "base": ray.base, "ray_dir": ray.ray_dir, "metrics_port": ray.metrics_port,
                         **extras}
            self._name, self._stack = name, stack
        return self._app

    def retire(self) -> None:
        """A test is replacing the running app (test_jobs_restart): the next `get` deletes whatever
        runs under the app's name then, and closes what this one left open."""
        self._name, self._app = None, None

    def stop(self) -> None:
        import ray

        self._close_app()
        early, self._early = self._early, None
        if early is not None:
            early[1].close()
        keeper, self._keeper, self._ray = self._keeper, None, None
        if keeper is not None:
            if ray.is_initialized():
                ray.shutdown()  # this process leaves first: the keeper's Ray is going away
            keeper.stop()

    def _shared_ray(self) -> SharedRay:
        if self._ray is None:
            import ray

            if self._keeper is None:
                self._keeper = Keeper(None)
            status = self._keeper.wait("ray", "ready", timeout_s=180)
            self._keeper.priority(0)  # the tests wait on it now (after the keeper's own move to 19)
            ray.init(address=status["gcs_address"], log_to_driver=False)
            self._ray = SharedRay(status["base"], self._keeper.ray_dir, self._keeper.metrics_port)
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


def autogroup_nice(pid: int, nice: int) -> None:
    """The scheduling weight of the session led by `pid` (every process it starts) against other
    sessions (the pytest process's): Linux's autogroup nice. Raising it back needs privileges that
    a CI runner may lack, and a kernel without autogroups has no such file: as it was."""
    try:
        Path(f"/proc/{pid}/autogroup").write_text(str(nice))
    except OSError:
        pass


class Early:
    """Subprocesses that test modules start before their turn: a module that names its own in
    `STARTS_EARLY` (name -> launch(folder) -> (Popen, what its tests need)) runs right after the unit
    tests (`conftest.py`), and each launch runs at collection, in a session of its own, so it takes
    the core the unit tests leave idle. Those in `STARTS_IN_BACKGROUND` (the same form) launch when
    the shared apps' tests begin, and their modules keep their turn. What a launch gives may hold "ray_up", a function saying
    when its Ray runs: from then until its test takes it, its session is niced (autogroup 19), as
    the keeper's is; not before, since a Ray starved for 30 s fails to start (its raylet must
    register in that time). A test takes its own with `take` (or launches it then); `stop` ends any
    left (a session cut short)."""

    def __init__(self):
        self._started: dict[str, tuple[subprocess.Popen, dict]] = {}
        self._lock = threading.Lock()

    def start(self, name: str, launch: Callable, folder: Path) -> None:
        if name not in self._started:
            self._started[name] = launch(folder)
            threading.Thread(target=self._background, args=(name,), daemon=True).start()

    def _background(self, name: str, timeout_s: float = 300) -> None:
        process, value = self._started.get(name, (None, {}))
        ray_up = value.get("ray_up")
        deadline = time.monotonic() + timeout_s
        while ray_up is not None and time.monotonic() < deadline:
            if ray_up():
                with self._lock:  # not once taken: its test waits on it
                    if name in self._started:
                        autogroup_nice(process.pid, 19)
                return
            time.sleep(0.5)

    def take(self, name: str, launch: Callable, folder: Path) -> dict:
        """What `launch` gave, launched early or now; in the foreground from now on."""
        with self._lock:
            if name not in self._started:
                self._started[name] = launch(folder)
            process, value = self._started.pop(name)
            autogroup_nice(process.pid, 0)
        return value

    def stop(self) -> None:
        with self._lock:
            started, self._started = self._started, {}
        for process, _ in started.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGINT)
        for process, _ in started.values():
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def _with_data_dir(args: dict, stack: contextlib.ExitStack) -> dict:
    """`args` with jobs stored in a temporary directory unless `args["jobs"]["data_dir"]` is
    absolute (tests that start the app again on the same store pass one), never under ./data."""
    args = copy.deepcopy(args)
    if not Path(args["jobs"]["data_dir"]).is_absolute():
        args["jobs"]["data_dir"] = stack.enter_context(tempfile.TemporaryDirectory(prefix="genserve-jobs-"))
    return args


def serving_deploy(args: dict) -> None:
    """Deploy the genserve app built from `args` on the Ray and Serve this process is connected to."""
    from ray import serve

    from serve_app.builder import build_app

    serve.run(build_app(args), name=APP_NAME, route_prefix="/")


POOL = AppPool()
EARLY = Early()
