"""POST /v1/videos on real Ray Serve with the dev profile (tiny FLUX, CLIP, SVD and LTX-Video)."""

import base64
import io
import json
import shutil
import threading
import time

import imageio_ffmpeg
import numpy as np
import pytest
from PIL import Image

from serve_app import APP_NAME
from serve_app.protocol.schemas import VideoRequest, VideoResponse
from tests.control_images import edge_map
from tests.helpers import image_b64

pytestmark = pytest.mark.integration


@pytest.fixture
def client(dev_app):
    return dev_app["client"]


def _mp4_frames(data: bytes, tmp_path) -> tuple[dict, list[np.ndarray]]:
    path = tmp_path / f"{time.monotonic_ns()}.mp4"
    path.write_bytes(data)
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    width, height = meta["size"]
    return meta, [np.frombuffer(frame, np.uint8).reshape(height, width, 3) for frame in reader]


def test_image_to_video_mp4(client, tmp_path):
    response = client.post("/v1/videos", json={"image": image_b64(), "num_frames": 4, "fps": 8, "seed": 11,
                                               "num_inference_steps": 2})
    assert response.status_code == 200, response.text
    body = VideoResponse.model_validate(response.json())
    assert body.mode == "image-to-video" and body.keyframe is None
    assert (body.num_frames, body.fps, body.width, body.height, body.seed) == (4, 8, 256, 256, 11)
    assert body.duration_s == 0.5 and body.content_type == "video/mp4"
    meta, frames = _mp4_frames(base64.b64decode(body.b64_video), tmp_path)
    assert len(frames) == 4 and meta["size"] == (256, 256) and meta["fps"] == 8
    assert meta["codec"].startswith("h264") and "yuv420p" in meta["pix_fmt"]
    assert set(body.timings) == {"video", "encode", "score", "total"}  # sampled frames scored (scores.video_frames)


def test_same_seed_same_frames(client, tmp_path):
    request = {"image": image_b64(), "num_frames": 3, "seed": 5, "num_inference_steps": 2}
    first = _mp4_frames(base64.b64decode(client.post("/v1/videos", json=request).json()["b64_video"]), tmp_path)[1]
    again = _mp4_frames(base64.b64decode(client.post("/v1/videos", json=request).json()["b64_video"]), tmp_path)[1]
    assert len(first) == 3 and all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))


def test_text_to_video_makes_scores_and_animates_a_keyframe(client, tmp_path):
    request = {"prompt": "a paper boat on a pond", "num_frames": 3, "seed": 21, "num_inference_steps": 2,
               "keyframe": {"quality_metric": "alignment", "quality_threshold": 100, "max_attempts": 2}}
    response = client.post("/v1/videos", json=request)
    assert response.status_code == 200, response.text
    body = VideoResponse.model_validate(response.json())
    assert body.mode == "text-to-video"
    keyframe = body.keyframe
    assert keyframe.model == "flux-schnell" and keyframe.prompt == "a paper boat on a pond"
    assert keyframe.enhanced_prompt.startswith("a paper boat on a pond, ")
    assert keyframe.enhancer == "template" and keyframe.enhancer_fallback is None
    assert keyframe.prompt_advice.score == 100
    assert [a.seed for a in keyframe.attempts] == [21, 22] and not keyframe.passed
    assert keyframe.seed == max(keyframe.attempts, key=lambda a: a.scores.alignment).seed
    assert set(body.timings) == {"keyframe", "video", "encode", "score", "total"}
    path = tmp_path / "t2v.mp4"
    path.write_bytes(base64.b64decode(body.b64_video))
    meta = next(imageio_ffmpeg.read_frames(str(path)))
    assert meta["size"] == (256, 256)


def test_binary_response_with_metadata_header(client, tmp_path):
    response = client.post("/v1/videos", json={"image": image_b64(), "num_frames": 2, "seed": 1,
                                               "num_inference_steps": 1, "response_format": "binary"})
    assert response.status_code == 200 and response.headers["content-type"] == "video/mp4"
    metadata = json.loads(response.headers["x-genserve-metadata"])
    assert metadata["seed"] == 1 and metadata["num_frames"] == 2 and "b64_video" not in metadata
    _, frames = _mp4_frames(response.content, tmp_path)
    assert len(frames) == 2


@pytest.mark.parametrize("fmt, content_type", [("gif", "image/gif"), ("webp", "image/webp")])
def test_gif_and_webp_have_every_frame(client, fmt, content_type):
    response = client.post("/v1/videos", json={"image": image_b64(), "num_frames": 3, "num_inference_steps": 1,
                                               "output_format": fmt, "response_format": "binary"})
    assert response.status_code == 200 and response.headers["content-type"] == content_type
    with Image.open(io.BytesIO(response.content)) as animation:
        assert animation.n_frames == 3 and animation.size == (256, 256)


@pytest.mark.parametrize(
    "body, loc, words",
    [
        ({}, ["body"], "neither was given"),
        ({"image": "AAAA", "prompt": "a fox"}, ["body", "prompt"], "svd (svd) animates an image without a prompt"),
        ({"image": base64.b64encode(b"not an image").decode()}, ["body", "image"], "not a readable PNG or JPEG"),
        ({"prompt": "a fox", "width": 300}, ["body", "width"], "needs a multiple of 64 between 256 and 2048; got 300"),
        ({"prompt": "a fox", "num_frames": 40}, ["body", "num_frames"], "svd (svd) makes 2-25 frames; got 40"),
        ({"prompt": "a fox", "fps": 61}, ["body", "fps"], "allowed: 1-60"),
        ({"prompt": "a fox", "model": "wan"}, ["body", "model"], "must be one of the video models ['svd', 'ltx-video', 'animatediff']"),
        ({"prompt": "a fox", "model": "ltx-video", "num_frames": 12}, ["body", "num_frames"],
         "ltx-video (ltx) makes 8k+1 frames between 9 and 257; got 12 (nearest: 9 or 17)"),
        ({"prompt": "a fox", "model": "ltx-video", "width": 100}, ["body", "width"],
         "ltx-video (ltx) needs a multiple of 32 between 64 and 1280; got 100"),
        ({"prompt": "a fox", "model": "ltx-video", "motion_bucket_id": 30}, ["body", "motion_bucket_id"],
         "ltx-video (ltx) takes no motion_bucket_id; its own parameters: guidance_scale, negative_prompt"),
        ({"image": "AAAA", "guidance_scale": 5}, ["body", "guidance_scale"], "svd (svd) takes no guidance_scale"),
        ({"prompt": "a fox", "keyframe": {"num_inference_steps": 9}}, ["body", "keyframe", "num_inference_steps"],
         "1-4 steps"),
    ],
)
def test_bad_video_input_is_422_naming_the_field(client, body, loc, words):
    response = client.post("/v1/videos", json=body)
    assert response.status_code == 422, response.text
    [error] = response.json()["detail"]
    assert error["loc"] == loc and words in error["msg"]


def test_python_handle_video(client):
    from ray import serve

    handle = serve.get_app_handle(APP_NAME)
    response = handle.generate_video.remote(
        VideoRequest(image=image_b64(), num_frames=2, seed=9, num_inference_steps=1)
    ).result()
    assert isinstance(response, VideoResponse) and response.num_frames == 2 and response.seed == 9


def test_a_long_video_does_not_block_image_requests(client):
    """Images keep being served while one long video runs on its own deployment."""
    video_done = threading.Event()
    video_result = {}

    def long_video():
        started = time.monotonic()
        video_result["response"] = client.post("/v1/videos", json={"image": image_b64(), "num_frames": 8,
                                                                    "num_inference_steps": 4})
        video_result["seconds"] = time.monotonic() - started
        video_done.set()

    thread = threading.Thread(target=long_video)
    thread.start()
    image_seconds = []
    while not video_done.is_set() and len(image_seconds) < 20:
        started = time.monotonic()
        response = client.post("/v1/images", json={"prompt": "a fox", "seed": 1})
        assert response.status_code == 200
        if not video_done.is_set():
            image_seconds.append(time.monotonic() - started)
    thread.join()
    assert video_result["response"].status_code == 200
    assert len(image_seconds) >= 2, f"no image finished during the {video_result['seconds']:.1f}s video"
    assert max(image_seconds) < video_result["seconds"]


def test_text_to_video_keyframe_from_sdxl_with_a_control_map(client):
    keyframe = {"model": "sdxl", "num_inference_steps": 2,
                "control": {"type": "canny", "image": image_b64(edge_map()), "preprocess": False}}
    response = client.post("/v1/videos", json={"prompt": "a glass house", "keyframe": keyframe, "num_frames": 2,
                                               "num_inference_steps": 2, "seed": 3})
    assert response.status_code == 200, response.text
    assert VideoResponse.model_validate(response.json()).keyframe.model == "sdxl"


@pytest.mark.parametrize("keyframe, loc", [
    ({"loras": [{"name": "nowhere"}]}, ["body", "keyframe", "loras", 0, "name"]),
    ({"model": "sdxl", "control": {"type": "canny", "image": "not base64!"}}, ["body", "keyframe", "control", "image"]),
    ({"control": {"type": "canny", "image": "AAAA"}}, ["body", "keyframe", "control"]),  # flux-schnell has none
])
def test_keyframe_loras_and_control_are_checked_naming_the_field(client, keyframe, loc):
    response = client.post("/v1/videos", json={"prompt": "a glass house", "keyframe": keyframe})
    assert response.status_code == 422, response.text
    assert [item["loc"] for item in response.json()["detail"]] == [loc]


def _comment(data: bytes, tmp_path) -> dict:
    import subprocess

    path = tmp_path / f"{time.monotonic_ns()}.mp4"
    path.write_bytes(data)
    tags = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(path), "-f", "ffmetadata", "-"],
                          capture_output=True, text=True, check=True).stdout
    [line] = [line for line in tags.splitlines() if line.startswith("comment=")]
    return json.loads(line.removeprefix("comment="))


def test_ltx_text_to_video_natively_with_the_frames_and_size_asked(client, tmp_path):
    request = {"model": "ltx-video", "prompt": "a red fox running through snow", "num_frames": 17, "width": 128,
               "height": 64, "seed": 4, "guidance_scale": 2.5}
    response = client.post("/v1/videos", json=request)
    assert response.status_code == 200, response.text
    body = VideoResponse.model_validate(response.json())
    assert (body.model, body.family, body.mode, body.keyframe) == ("ltx-video", "ltx", "text-to-video", None)
    assert (body.num_frames, body.source_frames, body.width, body.height, body.fps) == (17, 17, 128, 64, 24)
    assert body.params == {"guidance_scale": 2.5, "negative_prompt": None} and "keyframe" not in body.timings
    meta, frames = _mp4_frames(base64.b64decode(body.b64_video), tmp_path)
    assert len(frames) == 17 and meta["size"] == (128, 64) and meta["fps"] == 24
    again = client.post("/v1/videos", json=request).json()
    assert _mp4_frames(base64.b64decode(again["b64_video"]), tmp_path)[1][5].tobytes() == frames[5].tobytes()


def test_ltx_image_to_video_takes_an_image_and_a_prompt(client, tmp_path):
    response = client.post("/v1/videos", json={"model": "ltx-video", "image": image_b64(),
                                               "prompt": "it starts to rain", "seed": 2})
    assert response.status_code == 200, response.text
    body = VideoResponse.model_validate(response.json())
    assert (body.mode, body.num_frames, body.width, body.height) == ("image-to-video", 9, 96, 64)  # dev defaults


def test_animatediff_text_to_video_over_sd15(client, tmp_path):
    request = {"model": "animatediff", "prompt": "a windmill turning", "num_frames": 6, "seed": 8,
               "negative_prompt": "blurry"}
    response = client.post("/v1/videos", json=request)
    assert response.status_code == 200, response.text
    body = VideoResponse.model_validate(response.json())
    assert (body.family, body.mode, body.num_frames, body.width, body.height) == ("animatediff", "text-to-video", 6, 64, 64)
    meta, frames = _mp4_frames(base64.b64decode(body.b64_video), tmp_path)
    assert len(frames) == 6 and meta["size"] == (64, 64)
    upload = client.post("/v1/videos", json={"model": "animatediff", "image": image_b64()})
    assert upload.status_code == 422 and upload.json()["detail"][0]["loc"] == ["body", "image"]


@pytest.mark.parametrize("model, factor", [("ltx-video", 2), ("svd", 4)])
def test_interpolation_gives_n_minus_one_times_k_plus_one_frames_at_k_fps(client, tmp_path, model, factor):
    request = {"model": model, "image": image_b64(), "num_frames": 9, "fps": 8, "seed": 1, "num_inference_steps": 1,
               "interpolate": factor}
    response = client.post("/v1/videos", json=request)
    assert response.status_code == 200, response.text
    body = VideoResponse.model_validate(response.json())
    expected = (9 - 1) * factor + 1
    assert (body.source_frames, body.source_fps, body.num_frames, body.fps) == (9, 8, expected, 8 * factor)
    assert body.interpolate == factor and "interpolate" in body.timings
    data = base64.b64decode(body.b64_video)
    meta, frames = _mp4_frames(data, tmp_path)
    assert len(frames) == expected and meta["fps"] == 8 * factor
    comment = _comment(data, tmp_path)
    assert (comment["source_frames"], comment["num_frames"], comment["interpolate"]) == (9, expected, factor)


def test_models_lists_the_video_models_from_the_registry(client):
    catalog = client.get("/v1/models").json()
    videos = {model["id"]: model for model in catalog["video_models"]}
    assert list(videos) == ["svd", "ltx-video", "animatediff"] and catalog["default_video_model"] == "svd"
    assert (videos["animatediff"]["image_to_video"], videos["animatediff"]["text_to_video"]) == (False, "native")
    svd, ltx = videos["svd"], videos["ltx-video"]
    assert (svd["family"], svd["image_to_video"], svd["text_to_video"], svd["frames"]) == ("svd", True, "keyframe", "2-25 frames")
    assert (ltx["text_to_video"], ltx["frames"], ltx["size"]) == ("native", "8k+1 frames between 9 and 257",
                                                                  "a multiple of 32 between 64 and 1280")
    assert ltx["params"] == ["guidance_scale", "negative_prompt"] and svd["param_defaults"]["motion_bucket_id"] == 127
    assert ltx["deployment"]["family"] == "ltx" and svd["deployment"]["model_num_frames"] == 8
    health = client.get("/healthz").json()["deployments"]
    assert all(health[f"video:{model_id}"]["ok"] for model_id in videos)


def test_python_handle_names_a_video_model(client):
    from ray import serve

    handle = serve.get_app_handle(APP_NAME)
    response = handle.generate_video.remote(
        VideoRequest(model="ltx-video", prompt="a lantern", num_frames=9, seed=9, num_inference_steps=1)
    ).result()
    assert isinstance(response, VideoResponse) and (response.model, response.num_frames) == ("ltx-video", 9)


@pytest.mark.skipif(shutil.which("curl") is None, reason="the documented example uses curl, which is not installed")
def test_the_documented_video_example_runs(client, tmp_path):
    import re
    import subprocess
    from pathlib import Path

    doc = (Path(__file__).parents[2] / "docs" / "video.md").read_text()
    command = re.search(r"## Requests\n\n```bash\n(.*?)```", doc, re.S).group(1)
    command = command.replace("127.0.0.1:8000", f"127.0.0.1:{client.base_url.port}")
    run = subprocess.run(["bash", "-euo", "pipefail", "-c", command], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    meta, frames = _mp4_frames((tmp_path / "fox.mp4").read_bytes(), tmp_path)
    assert len(frames) == (17 - 1) * 2 + 1 and meta["fps"] == 48 and meta["size"] == (96, 64)
