"""The process that holds the shared Ray of the integration tests (`tests.integration.apps.AppPool`).

It starts Ray and Serve as `ray_and_serve` does, deploys the first shared app if it is given one,
writes how far it got to a status file, and stops them all when pytest closes its stdin (or goes
away). The pytest process joins this Ray only when its first integration test needs it: until then
it has no Ray of its own, which the unit tests running meanwhile expect (`ray.is_initialized()`
is False there), and the dev app's replicas load on the core they leave idle (its session niced
once its Ray runs).

    python -m tests.integration.keeper SPEC STATUS

SPEC: a pickle of {"ray_init": ray.init's keyword arguments, "args": genserve app args or None}.
STATUS: JSON, {"state": "ray" | "ready" | "failed", "base", "gcs_address", "error"}.
"""

import json
import os
import pickle
import signal
import sys
import traceback
from pathlib import Path


def write_status(path: Path, **status) -> None:
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(status))
    os.replace(partial, path)  # whole or nothing: pytest polls it


def main(spec_path: str, status_path: str) -> None:
    import ray
    from ray import serve

    from serve_app import APP_NAME
    from serve_app.builder import build_app
    from tests.integration.apps import autogroup_nice, ray_and_serve

    spec = pickle.loads(Path(spec_path).read_bytes())
    status = Path(status_path)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stop as on a closed stdin: Serve, then Ray
    with ray_and_serve(**spec["ray_init"]) as base:
        where = {"base": base, "gcs_address": ray.get_runtime_context().gcs_address}
        # Ray starts at the pytest session's priority: a node starved for 30 s fails to start (its
        # raylet must register in that time), and the unit tests share the cores with the other
        # early starts (`Early`). The app then deploys in the background, on the CPU the tests leave
        # idle, until pytest joins it (`AppPool._shared_ray`).
        autogroup_nice(os.getpid(), 19)
        write_status(status, state="ray", **where)
        if spec["args"] is not None:
            try:
                serve.run(build_app(spec["args"]), name=APP_NAME, route_prefix="/")
                write_status(status, state="ready", **where)
            except Exception:
                write_status(status, state="failed", error=traceback.format_exc(), **where)
        sys.stdin.read()  # until pytest closes it: at its session's end, or when it dies


if __name__ == "__main__":
    main(*sys.argv[1:])
