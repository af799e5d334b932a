"""The README's start command: `serve run` on the dev profile answers, then stops on Ctrl-C."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from tests.helpers import free_port, wait_until

pytestmark = pytest.mark.integration
ROOT = Path(__file__).parents[2]


def test_serve_run_dev_profile(tmp_path):
    config = yaml.safe_load((ROOT / "configs" / "dev.yaml").read_text())
    port = free_port()
    config["http_options"]["port"] = port  # the same profile on a free port, jobs in a temp dir
    config["applications"][0]["args"]["jobs"]["data_dir"] = str(tmp_path / "jobs")
    path = tmp_path / "dev.yaml"
    path.write_text(yaml.safe_dump(config))
    serve_bin = Path(sys.executable).with_name("serve")
    log = open(tmp_path / "serve.log", "wb")
    process = subprocess.Popen([str(serve_bin), "run", str(path)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                               env={**os.environ, "RAY_AUTH_MODE": "disabled"}, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: httpx.get(f"{base}/healthz", timeout=5).status_code == 200, timeout_s=180,
                   what="serve run answering /healthz")
        response = httpx.post(f"{base}/v1/images", json={"prompt": "a red fox", "seed": 3}, timeout=60)
        assert response.status_code == 200, response.text
        assert response.json()["images"][0]["seed"] == 3
    finally:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()
    assert process.returncode is not None, (tmp_path / "serve.log").read_text()
