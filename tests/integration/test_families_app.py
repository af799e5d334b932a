"""Models as data, over HTTP on the shared dev app: FLUX.1-dev is one config entry of the FLUX family
code, and a family defined in the test folder (tests/toy_family.py, named by import path) is
served with no product file changed."""

import base64
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.integration


def _models(client) -> dict:
    response = client.get("/v1/models")
    assert response.status_code == 200, response.text
    return response.json()


def _pixels(body: dict) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(body["images"][0]["b64_png"]))) as image:
        return np.asarray(image.convert("RGB"))


def test_flux_dev_is_a_config_entry_of_the_flux_family_with_its_own_limits(dev_app):
    models = {model["id"]: model for model in _models(dev_app["client"])["models"]}
    dev, schnell = models["flux-dev"], models["flux-schnell"]
    assert dev["family"] == schnell["family"] == "flux"
    assert (dev["min_steps"], dev["max_steps"], dev["default_steps"], dev["default_guidance"]) == (1, 50, 28, 3.5)
    assert (schnell["max_steps"], schnell["guidance_range"]) == (4, [0.0, 0.0])
    assert dev["deployment"]["family"] == "flux" and dev["deployment"]["source"] == "tiny"


def test_flux_dev_generates_with_guidance_and_reproduces_its_seed(dev_app):
    client = dev_app["client"]
    body = {"prompt": "a lighthouse at dusk", "model": "flux-dev", "seed": 3, "num_inference_steps": 2,
            "enhance": False}
    first = client.post("/v1/images", json=body)
    assert first.status_code == 200, first.text
    assert (first.json()["model"], first.json()["guidance_scale"]) == ("flux-dev", 3.5)
    again = client.post("/v1/images", json=body).json()
    assert np.array_equal(_pixels(first.json()), _pixels(again))
    # The tiny dev transformer embeds the guidance scale, as FLUX.1-dev's does: another scale, another image.
    other = client.post("/v1/images", json={**body, "guidance_scale": 7.0}).json()
    assert not np.array_equal(_pixels(first.json()), _pixels(other))


def test_flux_dev_refuses_steps_past_its_family_limit_naming_the_field(dev_app):
    response = dev_app["client"].post("/v1/images", json={"prompt": "a fox", "model": "flux-dev",
                                                           "num_inference_steps": 51})
    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["loc"] == ["body", "num_inference_steps"]


def test_a_family_from_the_test_folder_is_served_with_its_own_options(dev_app):
    client = dev_app["client"]
    toy = {model["id"]: model for model in _models(client)["models"]}["toy"]
    assert toy["family"] == "toy" and (toy["max_steps"], toy["default_width"]) == (8, 256)
    assert toy["deployment"]["inverted"] is True and not toy["supports_loras"]
    response = client.post("/v1/images", json={"prompt": "a paper boat", "model": "toy", "seed": 1})
    assert response.status_code == 200, response.text
    assert response.json()["model"] == "toy" and _pixels(response.json()).shape == (256, 256, 3)
    refused = client.post("/v1/images", json={"prompt": "a paper boat", "model": "toy",
                                               "loras": [{"name": "ink"}]})
    assert refused.status_code == 422 and refused.json()["detail"][0]["loc"][:2] == ["body", "loras"]


def test_a_request_without_model_gets_the_configs_default(dev_app):
    client = dev_app["client"]
    assert _models(client)["default_model"] == "flux-schnell"
    response = client.post("/v1/images", json={"prompt": "a fox", "seed": 2})
    assert response.status_code == 200 and response.json()["model"] == "flux-schnell"


@pytest.mark.skipif(shutil.which("curl") is None, reason="the README's example uses curl, which is not installed")
def test_the_readme_http_example_runs(dev_app, tmp_path):
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    command = re.search(r"## HTTP\n\n```bash\n(.*?)```", readme, re.S).group(1)
    # The example pipes the JSON through `head -40` for reading; here the whole answer is parsed.
    command = command.replace("127.0.0.1:8000", f"127.0.0.1:{dev_app['client'].base_url.port}")
    command = command.replace(" | python3 -m json.tool | head -40", "")
    run = subprocess.run(["bash", "-euo", "pipefail", "-c", command], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    body = json.loads(run.stdout)
    assert body["model"] == "flux-schnell" and body["images"][0]["seed"] == 42
