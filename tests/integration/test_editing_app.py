"""Image-to-image, inpainting and the hires pass over HTTP on the shared dev app (tiny models, CPU).

With random weights the VAE round trip is far from the identity, so image-to-image is compared with
the round trip the pipeline itself makes: diffusers encodes the init image by *sampling* the VAE's
latent distribution with the request's seeded generator (its first draw), so the reference here
decodes the same sample of the same tiny VAE.
"""

import base64
import hashlib
import io

import numpy as np
import pytest
from PIL import Image

from tests.helpers import image_b64
from tests.integration.jobs import submit, wait_finished

pytestmark = pytest.mark.integration


def gradient(size: int = 256) -> np.ndarray:
    ramp = np.arange(size) * 255 // (size - 1)
    xx, yy = np.meshgrid(ramp, ramp)
    return np.stack([xx, yy, 255 - xx], -1).astype(np.uint8)


def pixels(image: dict) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(image["b64_png"]))) as decoded:
        return np.asarray(decoded.convert("RGB"))


def meta(image: dict) -> dict:
    from serve_app.services.media import read_png_meta

    return read_png_meta(base64.b64decode(image["b64_png"]))


def post(client, **body) -> dict:
    response = client.post("/v1/images", json={"prompt": "a lighthouse", "enhance": False, **body})
    assert response.status_code == 200, response.text
    return response.json()


def vae_round_trip(args: dict, model_id: str, image: np.ndarray, seed: int) -> np.ndarray:
    """The tiny model's own VAE round trip of `image`, encoded as its image-to-image pipeline does."""
    import torch

    from deployments.config import ImageModelConfig
    from deployments.families import get_family

    entry = next(entry for entry in args["image_models"] if entry["id"] == model_id)
    config = ImageModelConfig.model_validate({key: value for key, value in entry.items() if key != "deployment"})
    base = get_family(config.family).build_tiny(config=config)
    processor = base.image_processor
    with torch.inference_mode():
        latents = base.vae.encode(processor.preprocess(Image.fromarray(image))).latent_dist.sample(
            torch.Generator().manual_seed(seed))
        decoded = processor.postprocess(base.vae.decode(latents).sample, output_type="np")[0]
    return np.round(decoded * 255)


def test_one_step_of_image_to_image_stays_at_the_vae_round_trip_and_full_strength_departs(dev_app):
    client, source = dev_app["client"], gradient()
    flipped = np.ascontiguousarray(source[::-1, ::-1])
    # flux-dev schedules 50 steps; strength 0.02 runs int(50 x 0.02) = 1 of them, from sigma 0.02.
    gentle = post(client, model="flux-dev", seed=5, init_image=image_b64(source), strength=0.02, num_inference_steps=50)
    assert (gentle["mode"], gentle["strength"]) == ("image-to-image", 0.02)
    reference = vae_round_trip(dev_app["args"], "flux-dev", source, seed=5)
    distance = np.abs(pixels(gentle["images"][0]) - reference).mean() / 255
    # Measured 0.003 (mean of 0-1 pixels); the round trip is 0.26 from the input itself.
    assert distance < 0.01, distance
    full = [post(client, model="flux-dev", seed=5, init_image=image_b64(image), strength=1.0, num_inference_steps=4)
            for image in (source, flipped)]
    assert np.abs(pixels(full[0]["images"][0]) - reference).mean() / 255 > 0.05
    # At strength 1 the image is all noise before the first step: which image was sent no longer matters.
    assert np.array_equal(pixels(full[0]["images"][0]), pixels(full[1]["images"][0]))


def test_inpainting_keeps_every_unmasked_pixel_and_the_same_seed_gives_the_same_bytes(dev_app):
    client, source = dev_app["client"], gradient()
    mask = np.zeros((256, 256, 3), np.uint8)
    mask[64:192, 96:160] = 255
    body = dict(init_image=image_b64(source), mask=image_b64(mask), strength=1.0, seed=11, mask_blur=6)
    first, again = post(client, **body), post(client, **body)
    assert first["mode"] == "inpainting" and first["images"][0]["b64_png"] == again["images"][0]["b64_png"]
    image, keep = pixels(first["images"][0]), mask[:, :, 0] == 0
    assert np.array_equal(image[keep], source[keep])
    assert np.abs(image[~keep].astype(int) - source[~keep]).mean() > 10
    loose = pixels(post(client, **body, preserve_unmasked=False)["images"][0])
    assert not np.array_equal(loose[keep], source[keep])  # the VAE round trip alone changes them
    recorded = meta(first["images"][0])
    assert recorded["init_image_sha256"] == hashlib.sha256(base64.b64decode(body["init_image"])).hexdigest()
    assert recorded["mask_sha256"] == hashlib.sha256(base64.b64decode(body["mask"])).hexdigest()
    assert (recorded["mode"], recorded["mask_blur"], recorded["preserve_unmasked"]) == ("inpainting", 6, True)


def test_hires_doubles_the_size_and_reports_the_second_pass(dev_app):
    body = post(dev_app["client"], seed=4, hires={"scale": 2, "strength": 0.5, "steps": 4})
    assert (body["width"], body["height"]) == (512, 512)
    assert pixels(body["images"][0]).shape == (512, 512, 3)
    assert body["hires"] == {"scale": 2.0, "strength": 0.5, "steps": 4, "first_width": 256, "first_height": 256}
    assert body["timings"]["hires"] > 0 and body["timings"]["first_pass"] > 0
    assert meta(body["images"][0])["hires"]["first_width"] == 256


def test_sdxl_image_to_image_with_a_controlnet_and_a_lora(dev_app):
    from tests.control_images import edge_map

    body = post(dev_app["client"], model="sdxl", seed=2, guidance_scale=0, init_image=image_b64(gradient()),
                strength=0.5, control={"type": "canny", "image": image_b64(edge_map()), "preprocess": False},
                loras=[{"name": "xl_style", "scale": 0.8}])
    assert (body["mode"], body["loras"]) == ("image-to-image", [{"name": "xl_style", "scale": 0.8}])
    assert meta(body["images"][0])["control"]["type"] == "canny"


def test_an_image_to_image_job_runs_through_the_job_store(dev_app):
    client = dev_app["client"]
    job = submit(client, "image", {"prompt": "a lighthouse", "enhance": False, "seed": 3,
                                   "init_image": image_b64(gradient()), "strength": 0.5})
    status = wait_finished(client, job["id"])
    assert status["state"] == "succeeded", status
    result = client.get(f"/v1/jobs/{job['id']}/result").json()
    assert result["mode"] == "image-to-image" and result["strength"] == 0.5


@pytest.mark.parametrize(
    "fields, loc, words",
    [
        ({"model": "toy", "init_image": "GRADIENT"}, ["body", "init_image"], "cannot start from an image"),
        ({"init_image": "GRADIENT", "strength": 0.2}, ["body", "strength"], "num_inference_steps"),
        ({"init_image": "GRADIENT", "strength": 1.5}, ["body", "strength"], "less than or equal to 1"),
        ({"init_image": "GRADIENT", "mask": "SMALL"}, ["body", "mask"], "must match its image"),
        ({"init_image": "HUGE"}, ["body", "init_image"], "over the limit"),
        ({"mask": "SMALL"}, ["body", "mask"], "only with init_image"),
        ({"hires": {"scale": 2.5}}, ["body", "hires", "scale"], "less than or equal to 2"),
        ({"hires": {"strength": 0.1}}, ["body", "hires", "strength"], "hires.steps"),
    ],
)
def test_bad_edit_requests_get_422_naming_the_field(dev_app, fields, loc, words):
    images = {"GRADIENT": image_b64(gradient()), "SMALL": image_b64(gradient(128)), "HUGE": image_b64(gradient(320))}
    fields = {key: images.get(value, value) if isinstance(value, str) else value for key, value in fields.items()}
    response = dev_app["client"].post("/v1/images", json={"prompt": "a fox", **fields})
    assert response.status_code == 422, response.text
    [error] = response.json()["detail"]
    assert error["loc"] == loc and words in error["msg"], error


def test_the_editing_docs_example_runs(dev_app, tmp_path):
    import re
    import subprocess
    import sys
    from pathlib import Path

    page = (Path(__file__).parents[2] / "docs" / "editing.md").read_text()
    code = re.search(r"## Example\n\n<!--.*?-->\n```python\n(.*?)```", page, re.S).group(1)
    code = code.replace("127.0.0.1:8000", f"127.0.0.1:{dev_app['client'].base_url.port}")
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["inpainting", "0.75", "512", "256"]
