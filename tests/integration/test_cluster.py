"""configs/multi-gpu.yaml on a Ray cluster of several nodes with logical GPUs, tiny models.

`ray.cluster_utils.Cluster` starts a head node and worker nodes on this machine. Workers declare
logical GPUs and the `accelerator_type:<TYPE>` resource Ray gives a node with real GPUs of that
type, so placement, autoscaling and node loss run as they would on GPU nodes, while the models
run on the CPU (torch sees no CUDA device). The tests share one cluster and one deployment, in
file order, ending with the one that removes a node; each first waits for the state it needs.

The suite runs the placement test; the burst, overload and node-loss scenarios are long runs
(minutes of load on 2 cores), marked `long` and run by `make test-long`. For the suite, a process of
its own (`_hold`) starts the cluster and deploys on it while the shared apps' tests run, on the CPU
their waits leave idle (`STARTS_IN_BACKGROUND`); the long runs build it here, since they add and
remove nodes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from serve_app import APP_NAME
from tests.helpers import deploy_and_wait, free_port, replica_gpu_ids, tiny_args, wait_until
from tests.integration.apps import EARLY, POOL, ray_and_serve

pytestmark = pytest.mark.integration
ROOT = Path(__file__).parents[2]
IMAGE = {"prompt": "a lighthouse at dusk", "width": 256, "height": 256, "num_inference_steps": 2}
# Fast autoscaling for the test (the config's own delays are minutes): load averaged over 2 s,
# reported every 0.5 s, acted on at once; idle for 2 s before scaling down.
FAST_FLUX_AUTOSCALING = {
    "autoscaling": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1, "upscale_delay_s": 0,
                    "downscale_delay_s": 2, "look_back_period_s": 2, "metrics_interval_s": 0.5},
}


@dataclass
class Outcome:
    started: float
    finished: float
    status: int | str
    error: str = ""  # the start of the body (or the exception) when the request failed


class Load:
    """`clients` threads sending one request after another until the block ends."""

    def __init__(self, url: str, clients: int, body: dict = IMAGE):
        self.outcomes: list[Outcome] = []
        self._url, self._body, self._stop = url, body, threading.Event()
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]

    def _client(self) -> None:
        with httpx.Client(timeout=120) as client:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    response = client.post(self._url, json=self._body)
                    status: int | str = response.status_code
                    error = "" if status == 200 else response.text[:300]
                except httpx.HTTPError as failure:
                    status, error = type(failure).__name__, str(failure)[:300]
                self.outcomes.append(Outcome(started, time.monotonic(), status, error))

    def ok_since(self, moment: float) -> list[Outcome]:
        return [o for o in self.outcomes if o.started >= moment and o.status == 200]

    def __enter__(self) -> "Load":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=150)


def _start_cluster():
    """The head node and four worker nodes; returns (cluster, {name: node})."""
    from ray.cluster_utils import Cluster

    # The head node runs Serve's controller, the HTTP proxy and the CPU replicas (the Ingress and
    # the JobRunner ask for `cpu_node`, which the config's cpu nodes offer); it has no GPU.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 3, "include_dashboard": False,
                                                            "resources": {"cpu_node": 1000}})
    nodes = {
        # Two H100-class nodes of one GPU each for FLUX and SVD (the long runs add a third:
        # `spare_heavy_node`), two L4-class nodes for CLIP, SDXL and the enhancer's LLM (0.2 + 0.7 + 0.2
        # of an L4 do not fit on one). Logical CPUs are generous: FLUX and SVD ask for 4 per replica,
        # as on a real GPU node.
        "heavy-a": _heavy_node(cluster),
        "heavy-b": _heavy_node(cluster),
        "light-a": cluster.add_node(num_cpus=4, num_gpus=1, resources={"accelerator_type:L4": 1}),
        "light-b": cluster.add_node(num_cpus=4, num_gpus=1, resources={"accelerator_type:L4": 1}),
    }
    return cluster, nodes


def _heavy_node(cluster):
    return cluster.add_node(num_cpus=6, num_gpus=1, resources={"accelerator_type:H100": 1})


def _app_args(redis_url: str) -> dict:
    """configs/multi-gpu.yaml with tiny models, its job store and rate-limit counters in the test's
    own Redis in place of genserve-redis."""
    args = tiny_args(ROOT / "configs" / "multi-gpu.yaml", FluxSchnellGenerator=FAST_FLUX_AUTOSCALING)
    assert args["jobs"]["store"] == "redis"
    args["jobs"]["redis_url"] = redis_url
    args["auth"]["limits_storage"] = redis_url.rsplit("/", 1)[0] + "/1"
    return args


def _hold(status_path: str) -> None:
    """`python -m tests.integration.test_cluster STATUS`: the cluster with the app deployed, held by
    a process of its own until its stdin closes (`_launch_cluster`). STATUS: JSON, {"state": "ray" |
    "ready" | "failed", "gcs_address", "base", "node_ids": {name: node id}, "error"}."""
    import ray
    import ray._private.utils
    from ray import serve

    from tests.integration.keeper import write_status
    from tests.redis_server import RedisServer

    status = Path(status_path)
    # Not this machine's default cluster: a `ray.init()` without an address elsewhere in the session
    # (`genserve serve`) must start its own, not join this one.
    ray._private.utils.write_ray_address = lambda *_, **__: None
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    cluster, nodes = _start_cluster()
    redis = RedisServer(status.parent).start()
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
        where = {"gcs_address": cluster.address, "base": f"http://127.0.0.1:{port}",
                 "node_ids": {name: node.node_id for name, node in nodes.items()}}
        write_status(status, state="ray", **where)
        try:
            deploy_and_wait(_app_args(redis.url), timeout_s=900)
            write_status(status, state="ready", **where)
        except Exception:
            write_status(status, state="failed", error=traceback.format_exc(), **where)
        sys.stdin.read()  # until pytest closes it (or goes away)
    finally:
        # No graceful drain: the nodes' processes, and the replicas with them, just stop.
        ray.shutdown()
        cluster.shutdown()
        redis.stop()


def _launch_cluster(folder: Path) -> tuple[subprocess.Popen, dict]:
    status = folder / "status.json"
    with open(folder / "cluster.log", "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "tests.integration.test_cluster", str(status)], cwd=ROOT,
                                   stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def state() -> dict:
        return json.loads(status.read_text()) if status.exists() else {}

    return process, {"process": process, "state": state, "log": folder / "cluster.log",
                     "ray_up": lambda: process.poll() is not None or "state" in state()}


# The suite's run (the placement test alone) starts the cluster and deploys on it in the background
# while the shared apps' tests run (`conftest.py`); the long runs add and remove nodes, so they build
# the cluster in this process.
STARTS_IN_BACKGROUND = {"cluster": _launch_cluster}


@pytest.fixture(scope="module")
def app(request, tmp_path_factory):
    import ray
    from ray.serve.context import _set_global_client

    if any(item.get_closest_marker("long") for item in request.session.items):
        yield from _app_in_process(tmp_path_factory)
        return
    held = EARLY.take("cluster", _launch_cluster, tmp_path_factory.mktemp("cluster"))
    process = held["process"]

    def settled() -> dict | None:
        status = held["state"]()
        if status.get("state") in ("ready", "failed"):
            return status
        return {**status, "state": "exited"} if process.poll() is not None else None

    try:
        status = wait_until(settled, timeout_s=600, what="the cluster deployed")
    except BaseException:
        _stop_holder(process)
        raise
    if status["state"] != "ready":
        # Started beside other tests, a node can miss Ray's 30 s to register: start it again here,
        # saying why. A fault of the app's own fails here too.
        _stop_holder(process)
        warnings.warn(f"the cluster started in the background did not deploy ({status['state']}), so it starts "
                      f"again in the test: {status.get('error')}\n{held['log'].read_text()[-3000:]}", stacklevel=1)
        yield from _app_in_process(tmp_path_factory)
        return
    try:
        POOL.stop()  # one Ray per process: the shared app's goes first
        ray.init(address=status["gcs_address"], log_to_driver=False)
        _set_global_client(None)  # Serve's client of the shared Ray, cached: this cluster's is asked anew
        yield {"url": f"{status['base']}/v1/images", "node_ids": status["node_ids"]}
    finally:
        ray.shutdown()
        _stop_holder(process)


def _stop_holder(process: subprocess.Popen) -> None:
    """Close the holder's stdin: it stops the cluster (`_hold`). Killed if it hangs."""
    process.stdin.close()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _app_in_process(tmp_path_factory):
    from tests.redis_server import RedisServer

    POOL.stop()  # one Ray per process: the shared app's goes first
    cluster, nodes = _start_cluster()
    redis = RedisServer(tmp_path_factory.mktemp("redis")).start()
    try:
        with ray_and_serve(proxy_location="HeadOnly", address=cluster.address) as base:
            args = _app_args(redis.url)
            deploy_and_wait(args)
            yield {"cluster": cluster, "nodes": nodes, "node_ids": {name: node.node_id for name, node in nodes.items()},
                   "url": f"{base}/v1/images", "args": args}
    finally:
        redis.stop()
        cluster.shutdown()


@pytest.fixture
def spare_heavy_node(app) -> None:
    """A third H100 node, for the long runs: FLUX's second replica, or a lost node's replacement, needs
    a whole GPU that neither FLUX's first replica nor SVD holds. (Each node is a raylet and its agents:
    seconds of start the placement test does without.)"""
    if "heavy-c" not in app["nodes"]:
        app["nodes"]["heavy-c"] = _heavy_node(app["cluster"])
        app["node_ids"]["heavy-c"] = app["nodes"]["heavy-c"].node_id
        app["cluster"].wait_for_nodes()


def _deployment(name: str):
    from serve_app.cli.launch import serve_details

    return serve_details().applications[APP_NAME].deployments[name]


def _running(name: str) -> list:
    return [replica for replica in _deployment(name).replicas if replica.state.value == "RUNNING"]


def _node_names(app) -> dict[str, str]:
    return {node_id: name for name, node_id in app["node_ids"].items()}


def _steady(replicas: int = 1) -> None:
    def steady() -> bool:
        flux = _deployment("FluxSchnellGenerator")
        return flux.target_num_replicas == replicas and [r.state.value for r in flux.replicas] == ["RUNNING"] * replicas

    wait_until(steady, timeout_s=180, what=f"FluxSchnellGenerator steady at {replicas} replica(s)")


def test_replicas_land_where_their_reservations_say(app):
    names = _node_names(app)
    [flux] = _running("FluxSchnellGenerator")
    [clip] = _running("ClipScorer")
    [svd] = _running("SvdXtGenerator")
    [sdxl] = _running("SdxlGenerator")
    [enhancer] = _running("PromptEnhancer")
    assert names.get(flux.node_id, "head").startswith("heavy")  # pinned to H100 nodes
    assert names.get(svd.node_id, "head").startswith("heavy") and svd.node_id != flux.node_id  # never shared
    # CLIP, SDXL and the LLM are pinned to the L4 nodes, each on one GPU.
    assert all(names.get(replica.node_id, "head").startswith("light") for replica in (clip, sdxl, enhancer))
    assert all(len(replica_gpu_ids(replica)) == 1 for replica in (sdxl, enhancer))
    assert len(replica_gpu_ids(flux)) == 1 and len(replica_gpu_ids(clip)) == 1 and len(replica_gpu_ids(svd)) == 1
    # Logical GPUs only: the replicas found no CUDA device and run on the CPU.
    response = httpx.post(app["url"], json={**IMAGE, "seed": 1}, timeout=120)
    assert response.status_code == 200, response.text
    models = httpx.get(app["url"].replace("/v1/images", "/v1/models"), timeout=30).json()["models"]
    assert models[0]["deployment"]["device"] == "cpu" and models[0]["deployment"]["memory_fraction"] is None


@pytest.mark.long
def test_flux_scales_up_under_a_burst_onto_a_whole_gpu_of_its_own_and_back_down(app, spare_heavy_node):
    _steady(1)
    burst = time.monotonic()
    with Load(app["url"], clients=4) as load:
        wait_until(lambda: len(_running("FluxSchnellGenerator")) == 2, timeout_s=180, what="a second FLUX replica running")
        scaled_up_s = time.monotonic() - burst
        flux = _running("FluxSchnellGenerator")
        placed = {(replica.node_id, tuple(replica_gpu_ids(replica))) for replica in flux}
        # H100 nodes of one GPU each: two whole-GPU replicas cannot share one, nor take SVD's.
        [svd] = _running("SvdXtGenerator")
        nodes = {node for node, _ in placed}
        assert len(placed) == 2 and all(_node_names(app)[node].startswith("heavy") for node in nodes)
        assert svd.node_id not in nodes
        wait_until(lambda: len(load.ok_since(burst + scaled_up_s)) >= 2, timeout_s=60, what="requests after scale-up")
    quiet = time.monotonic()
    _steady(1)
    scaled_down_s = time.monotonic() - quiet
    statuses = [outcome.status for outcome in load.outcomes]
    assert set(statuses) <= {200, 503}, statuses
    print(f"\nautoscaling: 1 -> 2 FLUX replicas running {scaled_up_s:.1f}s after the burst began; "
          f"back to 1 {scaled_down_s:.1f}s after it ended; {len(statuses)} requests, "
          f"{statuses.count(503)} answered 503")


@pytest.mark.long
def test_overload_turns_into_quick_503s(app, spare_heavy_node):
    _steady(1)
    # 16 clients sending back to back, against what FLUX takes at most (2 replicas x 2 ongoing)
    # plus what each of the 2 ingress replicas may queue for it (4): the rest must be turned away.
    with Load(app["url"], clients=16, body={**IMAGE, "width": 512, "height": 512}) as load:
        start = time.monotonic()
        wait_until(lambda: len(load.ok_since(start)) >= 20, timeout_s=180, what="20 requests answered under overload")
    ok = sorted(o.finished - o.started for o in load.outcomes if o.status == 200)
    rejected = sorted(o.finished - o.started for o in load.outcomes if o.status == 503)
    assert {o.status for o in load.outcomes} == {200, 503}, [o.status for o in load.outcomes]
    # A rejection does not wait its turn in a queue: 95% of them come back before the median
    # accepted request.
    assert rejected[int(len(rejected) * 0.95)] < ok[len(ok) // 2], (rejected, ok)
    print(f"\noverload: 16 clients back to back -> {len(ok)} x 200 (median {ok[len(ok) // 2]:.2f}s, "
          f"max {ok[-1]:.2f}s), {len(rejected)} x 503 (median {rejected[len(rejected) // 2]:.2f}s, "
          f"max {rejected[-1]:.2f}s)")


@pytest.mark.long
def test_losing_a_worker_node_replaces_its_replicas_without_a_restart(app, spare_heavy_node):
    _steady(1)
    [flux] = _running("FluxSchnellGenerator")
    [svd] = _running("SvdXtGenerator")
    lost = _node_names(app)[flux.node_id]
    # The Ingress (CPU only) may have a replica on the same node; see the assertion below.
    ingress_lost = any(_node_names(app).get(r.node_id) == lost for r in _running("Ingress"))
    # The one H100 node left with a free GPU: neither the lost one nor SVD's.
    [survivor] = [name for name in app["nodes"] if name.startswith("heavy") and name not in
                  (lost, _node_names(app)[svd.node_id])]
    with Load(app["url"], clients=2) as load:
        start = time.monotonic()
        wait_until(lambda: len(load.ok_since(start)) >= 2, timeout_s=60, what="requests flowing before the loss")
        removed = time.monotonic()
        app["cluster"].remove_node(app["nodes"][lost], allow_graceful=False)
        # A request sent after the loss and answered: FLUX's only replica died with the node,
        # so this one ran on its replacement.
        wait_until(lambda: load.ok_since(removed), timeout_s=240, what="a request answered after the node loss")
        answering_s = min(o.finished for o in load.ok_since(removed)) - removed
        wait_until(lambda: [_node_names(app).get(r.node_id) for r in _running("FluxSchnellGenerator")] == [survivor],
                   timeout_s=240, what=f"FLUX replaced on {survivor}")
        replaced_s = time.monotonic() - removed
        replaced = time.monotonic()
        wait_until(lambda: len(load.ok_since(replaced)) >= 2, timeout_s=60, what="requests flowing after the loss")
    during = [o for o in load.outcomes if o.finished >= removed]
    failed = [(o.status, o.error) for o in during if o.status != 200]
    print(f"\nnode loss ({lost}, with the FLUX replica{' and an Ingress replica' if ingress_lost else ''}): first answer {answering_s:.1f}s after, FLUX running "
          f"on {survivor} {replaced_s:.1f}s after; {len(failed)} of {len(during)} requests failed: {failed}")
    # Requests whose FLUX replica died with the node are answered 503 (retry) by the ingress. A
    # request in flight on an Ingress replica that died with the node is answered by Serve's
    # proxy itself, with its plain 500, before any of our code can: that is allowed only then.
    for status, error in failed:
        assert status == 503 or (status == 500 and ingress_lost and error == "Internal Server Error"), failed
    # Serve marks the deployment unhealthy when its replica dies, healthy again once replaced and
    # the dead replica is stopped: that can wait out its graceful_shutdown_timeout_s (the profile's).
    grace = app["args"]["image_models"][0]["deployment"]["graceful_shutdown_timeout_s"]
    wait_until(lambda: _deployment("FluxSchnellGenerator").status.value == "HEALTHY", timeout_s=grace + 60,
               what="FluxSchnellGenerator healthy again")
    print(f"FluxSchnellGenerator healthy {time.monotonic() - removed:.1f}s after the loss (grace {grace}s)")


if __name__ == "__main__":
    _hold(sys.argv[1])
