"""The real deployment classes on tiny random-weight models, in process (no Ray)."""

import asyncio

import numpy as np
import pytest

from deployments.config import DeviceOptions, ImageModelConfig, LaionHeadConfig, ScorerConfig
from deployments.image_generator import ImageGenerator
from deployments.runtime.loading import cuda_memory_fraction, pretrained_location, resolve_placement
from deployments.runtime.types import EnhancedPrompt, GenerationParams
from deployments.scoring.clip_scorer import ClipScorer
from deployments.tiny import save_tiny
from tests.helpers import flat_scores as flat

PROMPT = EnhancedPrompt(prompt="a lighthouse at dusk", negative_prompt=None, style="none", enhancer="none")


# 64x64: the generator itself takes any multiple of 16 (requests are held to the family's sizes
# before), and nothing checked here depends on the size.
def _params(*seeds: int, size: int = 64) -> GenerationParams:
    return GenerationParams(seeds=list(seeds), width=size, height=size, num_inference_steps=2)


def flux_entry(source: str = "tiny") -> ImageModelConfig:
    # No warm-up: no test here is about it (tests/unit/test_acceleration.py covers the warm-up).
    return ImageModelConfig(id="flux-schnell", family="flux", source=source, limits={"max_steps": 4, "max_guidance": 0},
                            options={"max_sequence_length": 32}, warmup={"default_shape": False})


@pytest.fixture(scope="module")
def tiny_flux() -> ImageGenerator:
    return ImageGenerator.func_or_class(flux_entry())


@pytest.fixture(scope="module")
def tiny_scorer() -> ClipScorer:
    return ClipScorer.func_or_class(ScorerConfig(source="tiny"))


def _generate(generator, params, prompt=PROMPT):
    return asyncio.run(generator.generate(params, prompt))


def test_same_seed_same_pixels_other_seed_other_pixels(tiny_flux):
    first = _generate(tiny_flux, _params(7))
    again = _generate(tiny_flux, _params(7))
    other = _generate(tiny_flux, _params(8))
    assert first.images.shape == (1, 64, 64, 3) and first.images.dtype == np.uint8
    assert np.array_equal(first.images, again.images)
    assert not np.array_equal(first.images, other.images)
    assert first.device == "cpu" and first.dtype == "float32"


def test_concurrent_calls_are_serialised_and_stay_deterministic(tiny_flux):
    async def burst():
        return await asyncio.gather(*(tiny_flux.generate(_params(seed), PROMPT) for seed in [3, 4, 3, 4, 3, 4]))

    outputs = asyncio.run(burst())
    for output in outputs[2:]:
        reference = outputs[0] if output.seeds == [3] else outputs[1]
        assert np.array_equal(output.images, reference.images)


def test_saved_tiny_flux_loads_through_from_pretrained(tiny_flux, tmp_path):
    folder = save_tiny("flux", tmp_path / "flux")
    assert (folder / "model_index.json").is_file()
    assert list((folder / "transformer").glob("*.safetensors"))
    loaded = ImageGenerator.func_or_class(flux_entry(str(folder)))
    assert loaded.info()["source"] == str(folder)
    expected = _generate(tiny_flux, _params(11)).images.astype(int)
    actual = _generate(loaded, _params(11)).images.astype(int)
    # The same weights; only float rounding differs between the two module instances.
    assert np.abs(actual - expected).max() <= 1


def test_scores_are_in_range_one_per_image(tiny_scorer):
    images = np.random.default_rng(0).integers(0, 256, size=(3, 64, 48, 3), dtype=np.uint8)
    scores = asyncio.run(tiny_scorer.score(images, "a lighthouse"))
    assert len(scores) == 3
    for score in scores:
        assert 0.0 <= score["aesthetic"] <= 1.0
        assert 0.0 <= score["alignment"] <= 100.0
    # Batched and one-by-one scoring agree.
    single = asyncio.run(tiny_scorer.score(images[1:2], "a lighthouse"))[0]
    assert flat(single) == pytest.approx(flat(scores[1]), abs=1e-4)


def test_scorer_rejects_non_image_arrays(tiny_scorer):
    with pytest.raises(ValueError, match=r"uint8 of shape \(N, H, W, 3\)"):
        asyncio.run(tiny_scorer.score(np.zeros((2, 8, 8), np.uint8), "x"))


def test_saved_tiny_clip_loads_through_from_pretrained(tiny_scorer, tmp_path):
    folder = save_tiny("clip", tmp_path / "clip")
    loaded = ClipScorer.func_or_class(ScorerConfig(source=str(folder), laion=LaionHeadConfig(source="tiny")))
    images = np.random.default_rng(1).integers(0, 256, size=(2, 40, 40, 3), dtype=np.uint8)
    expected = asyncio.run(tiny_scorer.score(images, "a red fox"))
    actual = asyncio.run(loaded.score(images, "a red fox"))
    for a, b in zip(actual, expected, strict=True):
        assert flat(a) == pytest.approx(flat(b), abs=1e-4)


def test_placement_uses_cuda_only_when_torch_sees_it():
    import torch

    auto = resolve_placement(DeviceOptions())
    if torch.cuda.is_available():
        assert (auto.device, auto.dtype_name) == ("cuda", "bfloat16")
    else:
        assert (auto.device, auto.dtype_name) == ("cpu", "float32")
        with pytest.raises(RuntimeError, match="torch sees no CUDA device"):
            resolve_placement(DeviceOptions(device="cuda"))
    assert resolve_placement(DeviceOptions(device="cpu", dtype="bfloat16")).dtype == torch.bfloat16


def test_missing_local_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist on this node"):
        pretrained_location(str(tmp_path / "nowhere"))
    assert pretrained_location("black-forest-labs/FLUX.1-schnell") == "black-forest-labs/FLUX.1-schnell"


def test_memory_cap_applies_on_cuda_only():
    options = DeviceOptions(memory_fraction=0.45)
    assert cuda_memory_fraction("cuda", options) == 0.45
    assert cuda_memory_fraction("cpu", options) is None
    assert cuda_memory_fraction("cuda", DeviceOptions()) is None
    # A replica on the CPU (logical GPUs on a CPU machine) records no cap.
    assert resolve_placement(DeviceOptions(device="cpu", memory_fraction=0.45)).memory_fraction is None


def test_model_info_reports_the_memory_cap(tiny_flux, tiny_scorer):
    assert tiny_flux.info()["memory_fraction"] is None and tiny_scorer.info()["memory_fraction"] is None
