"""The README's start command, `genserve serve CONFIG`: it deploys and answers, stops on SIGTERM
(as on Ctrl-C) putting a running job back in the queue, and gives up with a readable reason when
replicas ask for resources that never appear.

The first test's command starts at collection (`STARTS_EARLY`), on the core the unit tests leave
idle, and this module runs right after the unit tests: its start is most of a minute of Ray's and
the replicas' start that the test waited for in turn."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from tests.helpers import free_port, image_b64, wait_until
from tests.integration.apps import EARLY

pytestmark = pytest.mark.integration
ROOT = Path(__file__).parents[2]


def _dev_config(tmp_path: Path, video: bool, **flux_options) -> tuple[Path, int]:
    """configs/dev.yaml on a free port with its jobs in a temp dir, trimmed to the models these tests
    use (each replica costs seconds of imports on 2 cores; the shared dev app deploys them all):
    flux-schnell, with its deployment options updated with `flux_options`, and svd if `video`."""
    config = yaml.safe_load((ROOT / "configs" / "dev.yaml").read_text())
    port = free_port()
    config["http_options"]["port"] = port
    args = config["applications"][0]["args"]
    args["jobs"]["data_dir"] = str(tmp_path / "jobs")
    args["image_models"] = [model for model in args["image_models"] if model["id"] == "flux-schnell"]
    args["video_models"] = [model for model in args["video_models"] if video and model["id"] == "svd"]
    args["image_models"][0]["deployment"].update(flux_options)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, port


def _genserve(tmp_path: Path, *args: str, **env: str) -> tuple[subprocess.Popen, Path]:
    log = tmp_path / "genserve.log"
    with open(log, "wb") as output:
        process = subprocess.Popen(
            [str(Path(sys.executable).with_name("genserve")), "serve", *args], cwd=ROOT, stdout=output,
            stderr=subprocess.STDOUT, env={**os.environ, "RAY_AUTH_MODE": "disabled", **env}, start_new_session=True,
        )
    return process, log


def _stop(process: subprocess.Popen, signum: int = signal.SIGINT) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signum)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _launch_serving(folder: Path) -> tuple[subprocess.Popen, dict]:
    """`genserve serve` of the dev profile (flux-schnell and svd): it deploys and keeps serving."""
    path, port = _dev_config(folder, video=True)
    process, log = _genserve(folder, str(path))
    return process, {"process": process, "log": log, "base": f"http://127.0.0.1:{port}", "jobs": folder / "jobs",
                     "ray_up": _deploying(process, log)}


def _deploying(process: subprocess.Popen, log: Path):
    """Whether genserve's Ray runs: it says it deploys once ray.init returned (or it has exited)."""
    return lambda: process.poll() is not None or "genserve: deploying" in log.read_text()


# Not the timeout test's command: its 10 s must cover building the app, which an early start shares
# with the unit tests and the dev app's keeper.
STARTS_EARLY = {"genserve-serve": _launch_serving}


@pytest.fixture
def serving(tmp_path_factory) -> dict:
    return EARLY.take("genserve-serve", _launch_serving, tmp_path_factory.mktemp("genserve-serve"))


def test_genserve_serve_answers_and_stops_on_sigterm_putting_its_running_job_back(serving):
    from serve_app.jobs.sqlite_store import SqliteJobStore
    from tests.integration.jobs import in_stage, submit, wait_for

    process, log, base = serving["process"], serving["log"], serving["base"]
    try:
        wait_until(lambda: f"genserve is running at {base}/" in log.read_text() or process.poll() is not None,
                   timeout_s=180, what="genserve serve saying it runs")
        assert httpx.get(f"{base}/healthz", timeout=5).status_code == 200, log.read_text()
        response = httpx.post(f"{base}/v1/images", json={"prompt": "a red fox", "seed": 3}, timeout=60)
        assert response.status_code == 200, response.text
        assert response.json()["images"][0]["seed"] == 3
        with httpx.Client(base_url=base, timeout=30) as client:  # a video long enough to be cut short
            long = submit(client, "video", {"image": image_b64(), "num_frames": 3, "num_inference_steps": 100})
            wait_for(client, long["id"], in_stage("video", min_step=1), what="the video denoising")
    finally:
        process.send_signal(signal.SIGTERM)  # to genserve alone, as docker stop and Kubernetes do
        try:
            process.wait(timeout=180)
        except subprocess.TimeoutExpired:
            pass
        _stop(process)
    assert process.returncode == 0, log.read_text()
    store = SqliteJobStore(serving["jobs"])
    interrupted = store.get(long["id"])
    store.close()
    assert (interrupted.state, interrupted.attempts) == ("queued", 0), (interrupted.history, log.read_text())
    assert interrupted.history[-1]["reason"].startswith("interrupted: the job runner stopped (shutdown or redeploy)")


def test_genserve_serve_times_out_naming_what_a_pending_deployment_asks_for(tmp_path):
    # A whole GPU for FLUX; CUDA_VISIBLE_DEVICES="" makes Ray see none even on a GPU machine.
    path, _ = _dev_config(tmp_path, video=False, num_gpus=1)
    process, log = _genserve(tmp_path, str(path), "--timeout", "10", CUDA_VISIBLE_DEVICES="")
    try:
        process.wait(timeout=240)
    finally:
        _stop(process)
    output = log.read_text()
    assert process.returncode == 1, output
    assert "application 'genserve' did not start within 10s" in output
    assert "FluxSchnellGenerator: UPDATING, 0 of 1 replicas running" in output
    assert "each replica asks for {CPU: 0.5, GPU: 1}" in output
    assert "no node in the cluster has {CPU: 0.5, GPU: 1}" in output
    # Only the deployment no node can host is called so (others may merely still be loading).
    assert output.count("no node in the cluster has") == 1
