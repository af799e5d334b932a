import contextlib
import copy
import tempfile
from pathlib import Path

import httpx

from serve_app import APP_NAME
from serve_app.appconfig import app_args_from_config
from tests.helpers import free_port

ROOT = Path(__file__).parents[2]


def dev_args() -> dict:
    """configs/dev.yaml's typed args as a dict, for tests to adjust."""
    return app_args_from_config(ROOT / "configs" / "dev.yaml").model_dump()


@contextlib.contextmanager
def running_app(args: dict, timeout_s: float = 180):
    """Ray + Serve with the genserve app built from `args`; yields an HTTP client on a free port.

    Jobs are stored in a temporary directory unless `args["jobs"]["data_dir"]` is absolute (tests
    that start the app again on the same store pass one), never under the repository's ./data.
    """
    import ray
    from ray import serve

    from serve_app.builder import build_app

    with contextlib.ExitStack() as stack:
        args = copy.deepcopy(args)
        if not Path(args["jobs"]["data_dir"]).is_absolute():
            args["jobs"]["data_dir"] = stack.enter_context(tempfile.TemporaryDirectory(prefix="genserve-jobs-"))
        port = free_port()
        # address="local": always a fresh cluster of our own, never one another process started on this
        # machine (ray.init() would otherwise join it, and serve.shutdown() would stop its apps).
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            serve.run(build_app(args), name=APP_NAME, route_prefix="/")
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=timeout_s) as client:
                yield client
        finally:
            serve.shutdown()
            ray.shutdown()
