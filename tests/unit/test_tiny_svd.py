"""The generic VideoGenerator on the tiny random-weight SVD family, in process (no Ray)."""

import asyncio
import io

import numpy as np
import pytest
from PIL import Image

from deployments.config import VideoModelConfig
from deployments.runtime.types import VideoParams
from deployments.tiny import save_tiny
from deployments.video_generator import VideoGenerator

# 64x64 (below the family's request minimum, which the generator itself does not check) keeps each
# tiny call well under a second; the properties checked do not depend on the size.
SIDE = 64
IMAGE = np.asarray(Image.new("RGB", (SIDE, SIDE), (180, 120, 40)))


def _params(**overrides) -> VideoParams:
    fields = dict(seed=3, width=SIDE, height=SIDE, num_frames=3, fps=7, num_inference_steps=1, output_format="gif",
                  options={"motion_bucket_id": 127, "noise_aug_strength": 0.02, "decode_chunk_size": None})
    fields.update(overrides)
    return VideoParams(**fields)


def _config(source: str = "tiny") -> VideoModelConfig:
    # No warm-up: no test here is about it (tests/unit/test_video_families.py covers the warm-up).
    return VideoModelConfig(id="svd", family="svd", source=source, default_width=256, default_height=256,
                            warmup={"default_shape": False})


@pytest.fixture(scope="module")
def tiny_svd() -> VideoGenerator:
    return VideoGenerator.func_or_class(_config())


def _frames(output) -> list[np.ndarray]:
    with Image.open(io.BytesIO(output.data)) as animation:
        frames = []
        for index in range(animation.n_frames):
            animation.seek(index)
            frames.append(np.asarray(animation.convert("RGB")))
    return frames


def test_same_seed_same_frames(tiny_svd):
    first = asyncio.run(tiny_svd.animate(_params(), IMAGE))
    again = asyncio.run(tiny_svd.animate(_params(), IMAGE))
    other = asyncio.run(tiny_svd.animate(_params(seed=4), IMAGE))
    assert (first.num_frames, first.width, first.height, first.content_type) == (3, SIDE, SIDE, "image/gif")
    assert all(np.array_equal(a, b) for a, b in zip(_frames(first), _frames(again), strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(_frames(first), _frames(other), strict=True))


def test_wrong_image_size_and_no_native_text_to_video(tiny_svd):
    with pytest.raises(ValueError, match=f"image must be {SIDE}x{SIDE}x3"):
        asyncio.run(tiny_svd.animate(_params(), IMAGE[:SIDE // 2]))
    with pytest.raises(ValueError, match="no native text-to-video"):
        asyncio.run(tiny_svd.animate(_params(prompt="a fox"), None))


def test_interpolation_keeps_duration(tiny_svd):
    output = asyncio.run(tiny_svd.animate(_params(interpolate=2, output_format="mp4"), IMAGE))
    assert (output.source_frames, output.source_fps, output.num_frames, output.fps) == (3, 7, 5, 14)


def test_saved_tiny_svd_loads_through_from_pretrained(tmp_path):
    folder = save_tiny("svd", tmp_path / "svd")
    assert (folder / "model_index.json").is_file()
    loaded = VideoGenerator.func_or_class(_config(str(folder)))
    info = loaded.info()
    assert info["source"] == str(folder) and info["family"] == "svd" and info["model_num_frames"] == 8
    output = asyncio.run(loaded.animate(_params(num_frames=2), IMAGE))
    assert output.num_frames == 2
