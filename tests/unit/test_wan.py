"""The wan video family (Wan 2.2 TI2V-5B) on its tiny model, in process: text-to-video and
image-to-video from one set of weights, its 4k+1 frame and multiple-of-32 size rules as 422s naming the
nearest allowed values, its parameters, and the real loading path."""

import asyncio

import numpy as np
import pytest
from PIL import Image

from deployments.config import VideoModelConfig
from deployments.families import get_video_family
from deployments.runtime.types import VideoParams
from deployments.tiny import save_tiny
from deployments.video_generator import VideoGenerator
from serve_app.protocol.errors import RequestError
from serve_app.protocol.schemas import VideoRequest
from serve_app.services.validation import VideoSpec

WAN = VideoModelConfig(id="wan", family="wan", source="tiny", default_width=64, default_height=64,
                       default_num_frames=5, default_steps=2, warmup={"default_shape": False})


def _params(**overrides) -> VideoParams:
    fields = dict(seed=3, width=64, height=64, num_frames=5, fps=24, num_inference_steps=2, output_format="gif",
                  prompt="a red fox in snow", options={"guidance_scale": 5.0, "negative_prompt": None})
    return VideoParams(**{**fields, **overrides})


@pytest.fixture(scope="module")
def tiny_wan() -> VideoGenerator:
    return VideoGenerator.func_or_class(WAN)


def test_text_and_image_to_video_from_one_set_of_weights(tiny_wan):
    first, again = (asyncio.run(tiny_wan.animate(_params(), None)) for _ in range(2))
    other = asyncio.run(tiny_wan.animate(_params(seed=4), None))
    assert (first.num_frames, first.width, first.height) == (5, 64, 64)
    assert first.data == again.data and first.data != other.data
    image = np.asarray(Image.new("RGB", (96, 64), (180, 120, 40)))
    animated = asyncio.run(tiny_wan.animate(_params(width=96, num_frames=9, output_format="mp4"), image))
    assert (animated.num_frames, animated.width, animated.height) == (9, 96, 64)
    model = tiny_wan._model
    assert model.image_pipeline.transformer is model.pipeline.transformer and model.image_pipeline.config.expand_timesteps


def test_the_rules_are_the_published_models():
    wan = get_video_family("wan")
    assert (wan.image_to_video, wan.text_to_video) == (True, "native")
    assert [n for n in range(1, 22) if wan.frames.allows(n)] == [5, 9, 13, 17, 21] and wan.frames.allows(121)
    assert wan.size.allows(1280) and wan.size.allows(704) and not wan.size.allows(720)
    assert wan.param_names() == ("guidance_scale", "negative_prompt")
    assert get_video_family("wan").size_default(VideoModelConfig(id="w", family="wan", source="tiny")) == (1280, 704)


@pytest.mark.parametrize("fields, field, words", [
    ({"num_frames": 10}, "num_frames", "wan (wan) makes 4k+1 frames between 5 and 121; got 10 (nearest: 9 or 13)"),
    ({"num_frames": 125}, "num_frames", "got 125 (nearest: 121)"),
    ({"width": 720}, "width", "wan (wan) needs a multiple of 32 between 64 and 1280; got 720 (nearest: 704 or 736)"),
    ({"height": 1300}, "height", "got 1300 (nearest: 1280)"),
    ({"guidance_scale": 0.5}, "guidance_scale", "greater than or equal to 1"),
    ({"motion_bucket_id": 10}, "motion_bucket_id", "takes no motion_bucket_id"),
])
def test_the_family_rules_are_422s_naming_the_field_and_the_nearest_values(fields, field, words):
    with pytest.raises(RequestError) as raised:
        VideoSpec(WAN).plan(VideoRequest(prompt="a fox", **fields))
    assert raised.value.field == field and words in raised.value.message


def test_saved_tiny_wan_loads_through_from_pretrained(tiny_wan, tmp_path):
    folder = save_tiny("wan", tmp_path / "wan")
    assert (folder / "model_index.json").is_file() and list((folder / "transformer").glob("*.safetensors"))
    loaded = VideoGenerator.func_or_class(WAN.model_copy(update={"source": str(folder)}))
    frames = [_frames(model) for model in (loaded._model, tiny_wan._model)]
    assert frames[0].shape == (5, 64, 64, 3) and np.abs(frames[0] - frames[1]).max() < 1e-3


def _frames(model) -> np.ndarray:
    import torch

    return np.asarray(model(_params(), None, torch.Generator().manual_seed(3), None))
