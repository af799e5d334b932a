"""Video models as data: the video family registry, `video_models:` config, the family rules as 422s,
LTX-Video on tiny weights and frame interpolation, without Ray."""

import asyncio
import base64
import io

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from deployments.config import VideoModelConfig, VideoWarmupConfig
from deployments.families import UnknownFamily, get_video_family
from deployments.runtime.types import VideoParams
from deployments.tiny import save_tiny
from deployments.video.encoding import interpolate_frames
from deployments.video_generator import VideoGenerator
from serve_app.config import AppArgs
from serve_app.protocol.errors import RequestError
from serve_app.protocol.schemas import VideoRequest
from serve_app.services.validation import VideoSpec

SVD = VideoModelConfig(id="svd", family="svd", source="tiny", default_width=256, default_height=256,
                       default_num_frames=8)
LTX = VideoModelConfig(id="ltx-video", family="ltx", source="tiny", default_width=96, default_height=64,
                       default_num_frames=9, default_steps=2)
# The replicas of the tests that are not about the warm-up skip it (one test below is about it).
COLD = {"warmup": VideoWarmupConfig(default_shape=False)}


def test_registry_declares_capabilities_and_rules():
    svd, ltx = get_video_family("svd"), get_video_family("ltx")
    assert (svd.image_to_video, svd.text_to_video, ltx.image_to_video, ltx.text_to_video) == (True, "keyframe", True, "native")
    assert [n for n in range(1, 30) if svd.frames.allows(n)] == list(range(2, 26))
    assert [n for n in range(1, 60) if ltx.frames.allows(n)] == [9, 17, 25, 33, 41, 49, 57]
    assert svd.param_names() == ("motion_bucket_id", "noise_aug_strength", "decode_chunk_size")
    assert ltx.param_names() == ("guidance_scale", "negative_prompt")
    assert get_video_family("deployments.families.ltx:FAMILY") is ltx
    with pytest.raises(UnknownFamily, match="unknown video family 'hunyuan'.*ltx.*svd"):
        get_video_family("hunyuan")
    with pytest.raises(UnknownFamily, match="not an instance of VideoFamily"):
        get_video_family("deployments.families.sd15")


def _plan(entry, **fields):
    return VideoSpec(entry).plan(VideoRequest(**fields))


@pytest.mark.parametrize(
    "entry, fields, field, words",
    [
        (SVD, {"prompt": "a fox", "width": 300}, "width", "needs a multiple of 64 between 256 and 2048; got 300 (nearest: 256 or 320)"),
        (SVD, {"image": "x", "num_frames": 30}, "num_frames", "makes 2-25 frames; got 30 (nearest: 25)"),
        (LTX, {"prompt": "a fox", "num_frames": 5}, "num_frames", "got 5 (nearest: 9)"),
        (SVD, {"image": "x", "prompt": "a fox"}, "prompt", "not both"),
        (SVD, {"image": "x", "guidance_scale": 4}, "guidance_scale", "takes no guidance_scale; its own parameters: "
                                                                     "motion_bucket_id, noise_aug_strength"),
        (LTX, {"prompt": "a fox", "num_frames": 10}, "num_frames", "8k+1 frames between 9 and 257; got 10 (nearest: 9 or 17)"),
        (LTX, {"prompt": "a fox", "height": 80}, "height", "a multiple of 32 between 64 and 1280; got 80 (nearest: 64 or 96)"),
        (LTX, {"prompt": "a fox", "width": 1300}, "width", "got 1300 (nearest: 1280)"),
        (LTX, {"prompt": "a fox", "motion_bucket_id": 10}, "motion_bucket_id", "takes no motion_bucket_id"),
        (LTX, {"prompt": "a fox", "guidance_scale": 0.5}, "guidance_scale", "greater than or equal to 1"),
        # The family's own parameters are checked against its Params (tests/unit/test_video_inputs.py
        # checked these two on VideoRequest when it declared them).
        (SVD, {"image": "x", "motion_bucket_id": 256}, "motion_bucket_id", "less than or equal to 255"),
        (SVD, {"image": "x", "noise_aug_strength": 1.5}, "noise_aug_strength", "less than or equal to 1"),
        (SVD, {"image": "x", "motion_bucket_id": "5"}, "motion_bucket_id", "valid integer"),  # strict, as fields are
        (LTX, {"prompt": "a fox", "keyframe": {"style": "anime"}}, "keyframe", "natively, without a keyframe"),
    ],
)
def test_family_rules_are_422s_naming_the_field(entry, fields, field, words):
    with pytest.raises(RequestError) as caught:
        _plan(entry, **fields)
    assert caught.value.field == field and words in caught.value.message, caught.value.message


def test_plans_fill_defaults_and_modes():
    plan = _plan(SVD, prompt="a fox")
    assert (plan.mode, plan.keyframe, plan.width, plan.height, plan.num_frames, plan.fps) == ("text-to-video", True, 256, 256, 8, 7)
    assert plan.params == {"motion_bucket_id": 127, "noise_aug_strength": 0.02, "decode_chunk_size": None}
    plan = _plan(LTX, prompt="a fox", image="x", guidance_scale=5)
    assert (plan.mode, plan.keyframe, plan.num_frames, plan.fps) == ("image-to-video", False, 9, 24)
    assert plan.params == {"guidance_scale": 5.0, "negative_prompt": None}


def test_a_familys_parameters_are_declared_once_and_read_from_it_everywhere():
    import serve_app.api  # noqa: F401  (the layer that publishes VideoRequest's schema documents the families')

    documented = VideoRequest.model_json_schema()["properties"]
    # ltx's and animatediff's bound, 1-20 (VideoRequest declared 0-30 for both before); null: the family's default.
    assert documented["guidance_scale"]["anyOf"] == [{"type": "number", "minimum": 1, "maximum": 20}, {"type": "null"}]
    assert "animatediff (default 7.5), ltx (default 3.0), wan (default 5.0): Classifier-free guidance" in documented["guidance_scale"]["description"]
    assert documented["motion_bucket_id"]["anyOf"] == [{"type": "integer", "minimum": 0, "maximum": 255}, {"type": "null"}]
    public = VideoSpec(SVD).public()
    assert public["param_schema"]["motion_bucket_id"] == {"type": "integer", "minimum": 0, "maximum": 255, "default": 127,
                                                          "description": "More motion when higher."}
    assert public["param_defaults"] == {"motion_bucket_id": 127, "noise_aug_strength": 0.02, "decode_chunk_size": None}
    with pytest.raises(RequestError) as caught:
        _plan(SVD, image="x", noise_aug_strength=2)
    assert caught.value.allowed == "0-1"  # the family's bounds, from its Params
    assert _plan(SVD, image="x", motion_bucket_id=None).params["motion_bucket_id"] == 127  # null: the default


def test_a_parameter_of_a_nested_type_is_listed_and_documented_whole():
    from pydantic import BaseModel, ConfigDict, Field

    from deployments.families.ltx import LtxFamily
    from serve_app.protocol.schemas import video_params_schema

    class Point(BaseModel):
        x: float = Field(ge=0, le=1)
        y: float = Field(ge=0, le=1)

    class PathParams(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)
        origin: Point | None = Field(None, description="Where the camera starts.")

    class PathFamily(LtxFamily):
        name = "path"
        Params = PathParams

    schema = PathFamily().param_schema()["origin"]
    assert schema["anyOf"][0]["properties"]["x"] == {"type": "number", "minimum": 0, "maximum": 1, "title": "X"}
    documented = video_params_schema({"path": PathFamily().param_schema()})["origin"]
    assert "$ref" not in str(documented) and documented["description"] == "path (default null): Where the camera starts."


def test_video_models_config():
    args = AppArgs.model_validate({"video_models": [SVD.model_dump(), LTX.model_dump()],
                                   "default_video_model": "ltx-video"})
    assert args.default_video_model_id == "ltx-video"
    assert {"SvdGenerator", "LtxVideoGenerator"} <= set(args.all_deployment_options())
    bad = [
        ({"svd": {"source": "tiny"}}, "`svd:` is no longer read: use `video_models:` instead, a video_models entry "
                                      "with family: svd"),
        ({"deployments": {"SvdGenerator": {"num_replicas": 1}}}, "deployments.SvdGenerator is no longer read"),
        ({"video_models": [{**SVD.model_dump(), "id": "flux-schnell"}]}, "ids must be unique together"),
        ({"video_models": [SVD.model_dump()], "default_video_model": "ltx"}, "not an enabled video_models id"),
        ({"video_models": [{**LTX.model_dump(), "default_num_frames": 12}]}, "default_num_frames (12) breaks the ltx "
                                                                             "family's frame rule: 8k+1"),
        ({"video_models": [{**LTX.model_dump(), "options": {"offload": "gpu"}}]}, "options for video family 'ltx'"),
        ({"video_models": [{**SVD.model_dump(), "family": "hunyuan"}]}, "unknown video family 'hunyuan'"),
    ]
    for config, words in bad:
        with pytest.raises(ValidationError, match=None) as caught:
            AppArgs.model_validate(config)
        assert words in str(caught.value), (words, str(caught.value))


@pytest.mark.parametrize("factor", [2, 4])
def test_interpolation_gives_n_minus_one_times_k_plus_one_frames(factor):
    # A bar moving 4 px a frame: source frame i comes back as output frame i * k.
    frames = np.zeros((5, 64, 96, 3), np.uint8)
    for index in range(5):
        frames[index, :, 20 + 4 * index:36 + 4 * index] = 255
    out = interpolate_frames(frames, 8, factor)
    assert out.shape == ((5 - 1) * factor + 1, 64, 96, 3)
    for index in range(5):
        assert np.abs(out[index * factor].astype(int) - frames[index]).mean() < 3
    middle = out[1].astype(int)  # between source 0 and 1: neither of them
    assert np.abs(middle - frames[0]).mean() > 0 or np.abs(middle - frames[1]).mean() > 0


def _ltx_params(**overrides) -> VideoParams:
    fields = dict(seed=3, width=96, height=64, num_frames=9, fps=24, num_inference_steps=2, output_format="mp4",
                  prompt="a red fox in snow", options={"guidance_scale": 3.0, "negative_prompt": None})
    fields.update(overrides)
    return VideoParams(**fields)


@pytest.fixture(scope="module")
def tiny_ltx() -> VideoGenerator:
    return VideoGenerator.func_or_class(LTX.model_copy(update=COLD))


def test_ltx_text_and_image_to_video_from_one_set_of_weights(tiny_ltx):
    first = asyncio.run(tiny_ltx.animate(_ltx_params(output_format="gif"), None))
    again = asyncio.run(tiny_ltx.animate(_ltx_params(output_format="gif"), None))
    other = asyncio.run(tiny_ltx.animate(_ltx_params(output_format="gif", seed=4), None))
    assert (first.num_frames, first.width, first.height) == (9, 96, 64)
    assert first.data == again.data and first.data != other.data
    image = np.asarray(Image.new("RGB", (96, 64), (180, 120, 40)))
    animated = asyncio.run(tiny_ltx.animate(_ltx_params(num_frames=17), image))
    assert (animated.num_frames, animated.width, animated.height) == (17, 96, 64)
    model = tiny_ltx._model
    assert model.image_pipeline.transformer is model.pipeline.transformer  # one copy of the weights


def test_a_video_replica_out_of_memory_answers_model_out_of_memory_and_serves_the_next_request(tiny_ltx):
    from deployments.runtime.types import ModelOutOfMemory
    from tests.unit.test_out_of_memory import OOM, RunsOutOfMemory

    model = tiny_ltx._model
    tiny_ltx._model = RunsOutOfMemory(model, times=1)
    try:
        with pytest.raises(ModelOutOfMemory) as raised:
            asyncio.run(tiny_ltx.animate(_ltx_params(), None))
        assert raised.value.model == "ltx-video" and OOM.splitlines()[0] in str(raised.value)
        assert asyncio.run(tiny_ltx.animate(_ltx_params(), None)).num_frames == 9  # the same replica goes on
    finally:
        tiny_ltx._model = model


def test_saved_tiny_ltx_loads_through_from_pretrained(tmp_path):
    folder = save_tiny("ltx", tmp_path / "ltx")
    assert (folder / "model_index.json").is_file()
    loaded = VideoGenerator.func_or_class(LTX.model_copy(update={"source": str(folder), **COLD}))
    assert loaded.info()["source"] == str(folder)
    output = asyncio.run(loaded.animate(_ltx_params(interpolate=2), None))
    assert (output.source_frames, output.num_frames, output.fps) == (9, 17, 48)


ANIMATEDIFF = VideoModelConfig(id="animatediff", family="animatediff", source="tiny", default_width=64,
                               default_height=64, default_num_frames=4, default_steps=2,
                               options={"motion_adapter": "tiny"}, warmup={"default_shape": False})


def test_animatediff_is_text_to_video_only_over_sd15_weights(tmp_path):
    family = get_video_family("animatediff")
    assert (family.image_to_video, family.text_to_video, family.frames.describe()) == (False, "native", "2-32 frames")
    with pytest.raises(RequestError, match="has no image-to-video") as caught:
        _plan(ANIMATEDIFF, image="x")
    assert caught.value.field == "image"
    # The real loading path: SD 1.5 weights and the motion adapter from saved folders.
    sd15 = save_tiny("sd15", tmp_path / "sd15")
    adapter = save_tiny("animatediff", tmp_path / "adapter")
    entry = ANIMATEDIFF.model_copy(update={"source": str(sd15), "options": {"motion_adapter": str(adapter)}})
    loaded = VideoGenerator.func_or_class(entry)
    assert type(loaded._model.pipeline.unet).__name__ == "UNetMotionModel"
    params = _ltx_params(width=64, height=64, num_frames=4, fps=8, output_format="gif",
                         options={"guidance_scale": 7.5, "negative_prompt": "blurry"})
    first = asyncio.run(loaded.animate(params, None))
    again = asyncio.run(loaded.animate(params, None))
    assert (first.num_frames, first.width, first.height) == (4, 64, 64) and first.data == again.data


def test_a_request_over_the_video_models_compute_budget_is_a_422_naming_the_fields_and_the_budget():
    from serve_app.config import VideoModelEntry

    entry = VideoModelEntry(**LTX.model_dump(), max_pixel_frame_steps=96 * 64 * 17 * 2)
    spec = VideoSpec(entry)
    assert spec.plan(VideoRequest(prompt="a fox", num_frames=17)).num_frames == 17  # at the budget
    with pytest.raises(RequestError) as over:
        spec.plan(VideoRequest(prompt="a fox", num_frames=25))
    assert over.value.field == "num_frames"
    assert ("96x64x25x2 = 307200 pixel-frame-steps, over ltx-video's budget of 208896 "
            "(video_models[].max_pixel_frame_steps)") in over.value.message
    assert over.value.detail()[0]["allowed"] == "width x height x num_frames x num_inference_steps <= 208896"
    # A family rule is named first: the budget only judges requests the family could make.
    with pytest.raises(RequestError) as rule:
        spec.plan(VideoRequest(prompt="a fox", num_frames=26))
    assert "8k+1 frames" in rule.value.message
    assert spec.public()["max_pixel_frame_steps"] == 208896
    assert VideoSpec(LTX).public()["max_pixel_frame_steps"] is None  # no budget: any request the rules allow
    with pytest.raises(ValidationError, match="max_pixel_frame_steps"):
        VideoModelEntry(**LTX.model_dump(), max_pixel_frame_steps=0)


def test_each_video_family_names_the_weights_it_loads_with_the_dtypes_variant():
    from serve_app.config import AppArgs
    from serve_app.weights import plan

    svd = {"id": "svd-xt", "family": "svd", "source": "stabilityai/stable-video-diffusion-img2vid-xt",
           "device": {"dtype": "float16"}}
    animatediff = {"id": "animatediff", "family": "animatediff", "source": "org/sd15-finetune", "enabled": False,
                   "device": {"dtype": "float16"},
                   "options": {"motion_adapter": "guoyww/animatediff-motion-adapter-v1-5-2"}}
    ltx = {"id": "ltx-video", "family": "ltx", "source": "Lightricks/LTX-Video", "default_width": 704,
           "default_height": 480, "device": {"dtype": "bfloat16"}}
    args = AppArgs.model_validate({"image_models": [{"id": "sd", "family": "sd15", "source": "tiny"}],
                                   "scorer": {"source": "tiny"}, "video_models": [svd, animatediff, ltx]})
    planned = {repo.source.source: (repo.source.layout, repo.source.variant, repo.optional) for repo in plan(args)}
    assert planned == {
        "stabilityai/stable-video-diffusion-img2vid-xt": ("diffusers-pipeline", "fp16", False),
        "org/sd15-finetune": ("diffusers-pipeline", "fp16", True),
        "guoyww/animatediff-motion-adapter-v1-5-2": ("diffusers-model", "fp16", True),
        "Lightricks/LTX-Video": ("diffusers-pipeline", None, False),
    }


def test_the_frames_a_video_request_is_charged_are_its_own_or_its_models_default():
    from tests.fakes import fake_services
    from tests.helpers import app_settings

    settings = app_settings(video_models=[entry.model_dump(exclude_unset=True) for entry in (SVD, LTX)])
    service = fake_services(settings).videos
    assert service.frames({"image": "x"}) == 8  # svd's default (the entry's)
    assert service.frames({"model": "ltx-video", "prompt": "a fox", "num_frames": 17}) == 17
    with pytest.raises(RequestError) as caught:
        service.frames({"model": "ltx-video", "prompt": "a fox", "num_frames": 12})
    assert caught.value.field == "num_frames"


def test_a_video_replica_makes_one_tiny_warm_up_call_before_it_is_ready_unless_switched_off(monkeypatch):
    cls = VideoGenerator.func_or_class
    frames, calls = cls._frames, []

    def recording(self, params, image, monitor):
        calls.append((params.width, params.height, params.num_frames, params.num_inference_steps,
                      None if image is None else image.shape))
        if image is None:
            return frames(self, params, image, monitor)
        # Tiny SVD's first call takes 10-20 s on 2 shared cores: its call is checked up to the model.
        return np.zeros((params.num_frames, params.height, params.width, 3), np.uint8)

    monkeypatch.setattr(cls, "_frames", recording)
    ltx, svd = cls(LTX, metrics=False), cls(SVD, metrics=False)
    assert calls == [(64, 64, 9, 1, None), (256, 256, 2, 1, (256, 256, 3))], "smallest size, fewest frames and steps"
    info = ltx.info()
    assert info["warmup_shapes"] == [{"width": 64, "height": 64, "num_frames": 9, "steps": 1}]
    assert info["cold_start"]["load_s"] > 0 and info["cold_start"]["warmup_s"] > 0
    assert ltx._metrics._cold_start_s >= info["cold_start"]["load_s"]  # the gauge each health check records again
    assert svd.info()["options"]["decode_chunk_size"] == 8
    calls.clear()
    cold = cls(VideoModelConfig(**{**LTX.model_dump(), "warmup": {"default_shape": False}}), metrics=False)
    assert cold.info()["warmup_shapes"] == [] and calls == []


TOY = VideoModelConfig(id="toy-video", family="tests.toy_video_family:FAMILY", source="tiny", default_width=96,
                       default_height=64, default_num_frames=9, default_steps=1, warmup={"default_shape": False})


def _gif_frames(body: dict) -> list[np.ndarray]:
    from PIL import ImageSequence

    with Image.open(io.BytesIO(base64.b64decode(body["b64_video"]))) as gif:
        return [np.asarray(frame.convert("RGB"), dtype=float) for frame in ImageSequence.Iterator(gif)]


def test_a_video_family_from_the_test_folder_brings_its_own_parameter_with_no_product_change():
    """tests/toy_video_family.py, named by import path, declares `fade` in its Params alone: POST
    /v1/videos takes it, checks it against the family's bounds, and the family's model applies it."""
    from fastapi.testclient import TestClient

    from serve_app.api.app import build_api
    from tests.fakes import FakeGenerator, fake_services
    from tests.helpers import LOOPBACK, app_settings

    settings = app_settings(video_models=[TOY.model_dump()], max_input_pixels=512 * 512)
    images = FakeGenerator()
    images.info = lambda: {"source": "fake"}  # GET /v1/models asks every model deployment
    app = build_api()
    app.state.services = fake_services(settings, generator=images,
                                       video_generators={TOY.id: VideoGenerator.func_or_class(TOY, metrics=False)})
    client = TestClient(app, client=LOOPBACK)
    [listed] = client.get("/v1/models").json()["video_models"]
    assert listed["params"] == ["guidance_scale", "negative_prompt", "fade"]
    assert listed["param_schema"]["fade"]["maximum"] == 1 and listed["param_defaults"]["fade"] == 0.0
    body = {"prompt": "a lantern", "seed": 4, "output_format": "gif"}
    plain, faded = client.post("/v1/videos", json=body), client.post("/v1/videos", json={**body, "fade": 1.0})
    assert plain.status_code == faded.status_code == 200, faded.text
    assert faded.json()["params"] == {"guidance_scale": 3.0, "negative_prompt": None, "fade": 1.0}
    plain_frames, faded_frames = _gif_frames(plain.json()), _gif_frames(faded.json())
    assert np.abs(plain_frames[0] - faded_frames[0]).mean() < 2, "the first frame is not faded"
    assert faded_frames[-1].max() < 4 < plain_frames[-1].mean(), "the last frame is black"
    refused = client.post("/v1/videos", json={**body, "fade": 1.5})
    assert refused.status_code == 422
    [error] = refused.json()["detail"]
    assert error["loc"] == ["body", "fade"] and "less than or equal to 1" in error["msg"] and error["allowed"] == "0-1"
    unknown = client.post("/v1/videos", json={**body, "motion_bucket_id": 3})
    assert unknown.status_code == 422 and unknown.json()["detail"][0]["msg"] == (
        "motion_bucket_id: toy-video (toy-video) takes no motion_bucket_id; its own parameters: guidance_scale, "
        "negative_prompt, fade")
