"""SvdGenerator on a tiny random-weight SVD, in process (no Ray)."""

import asyncio
import io

import numpy as np
import pytest
from PIL import Image

from deployments.config import SvdConfig
from deployments.video.svd import SvdGenerator
from deployments.tiny import save_tiny
from deployments.runtime.types import VideoParams

IMAGE = np.asarray(Image.new("RGB", (256, 256), (180, 120, 40)))


def _params(**overrides) -> VideoParams:
    fields = dict(seed=3, width=256, height=256, num_frames=3, fps=7, motion_bucket_id=127, noise_aug_strength=0.02,
                  num_inference_steps=2, decode_chunk_size=None, output_format="gif", metadata={})
    fields.update(overrides)
    return VideoParams(**fields)


@pytest.fixture(scope="module")
def tiny_svd() -> SvdGenerator:
    return SvdGenerator.func_or_class(SvdConfig(source="tiny"))


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
    assert (first.num_frames, first.width, first.height, first.content_type) == (3, 256, 256, "image/gif")
    assert all(np.array_equal(a, b) for a, b in zip(_frames(first), _frames(again), strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(_frames(first), _frames(other), strict=True))


def test_model_default_frames_and_wrong_image_size(tiny_svd):
    output = asyncio.run(tiny_svd.animate(_params(num_frames=None), IMAGE))
    assert output.num_frames == tiny_svd.model_num_frames == 8
    with pytest.raises(ValueError, match="image must be 256x256x3"):
        asyncio.run(tiny_svd.animate(_params(), IMAGE[:128]))


def test_saved_tiny_svd_loads_through_from_pretrained(tmp_path):
    folder = save_tiny("svd", tmp_path / "svd")
    assert (folder / "model_index.json").is_file()
    loaded = SvdGenerator.func_or_class(SvdConfig(source=str(folder)))
    assert loaded.info()["source"] == str(folder) and loaded.model_num_frames == 8
    output = asyncio.run(loaded.animate(_params(num_frames=2), IMAGE))
    assert output.num_frames == 2
