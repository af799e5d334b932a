"""The z-image family (Z-Image-Turbo, Z-Image) on its tiny model, in process: few-step text-to-image
without guidance, guidance with a negative prompt for the base model, image-to-image and inpainting
from the same modules, the real loading path from a folder, its rules, and its LoRA signature."""

import asyncio

import numpy as np
import pytest

from deployments.config import ImageModelConfig
from deployments.families import get_family
from deployments.image_generator import ImageGenerator
from deployments.lora_registry import detect_family
from deployments.runtime.types import EditInput, EnhancedPrompt, GenerationParams
from deployments.tiny import save_tiny
from serve_app.services.validation import ModelSpec

PROMPT = EnhancedPrompt(prompt="a lantern in the snow", negative_prompt=None, style="none", enhancer="none")


def turbo(source: str = "tiny", **fields) -> ImageModelConfig:
    fields = {"limits": {"max_steps": 16, "max_guidance": 0}, "options": {"max_sequence_length": 64},
              "warmup": {"default_shape": False}, **fields}
    return ImageModelConfig(id="z-image-turbo", family="z-image", source=source, **fields)


@pytest.fixture(scope="module")
def generator() -> ImageGenerator:
    return ImageGenerator.func_or_class(turbo())


def _params(*seeds: int, guidance: float = 0.0, edit=None) -> GenerationParams:
    return GenerationParams(seeds=list(seeds), width=64, height=64, num_inference_steps=2, guidance_scale=guidance,
                            edit=edit)


def _generate(generator, params, prompt=PROMPT):
    return asyncio.run(generator.generate(params, prompt)).images


def test_text_to_image_is_deterministic_by_seed_and_each_image_keeps_its_seed(generator):
    first, again, other = (_generate(generator, _params(seed)) for seed in (5, 5, 6))
    assert first.shape == (1, 64, 64, 3) and first.dtype == np.uint8
    assert np.array_equal(first, again) and not np.array_equal(first, other)
    pair = _generate(generator, _params(5, 6))
    assert np.abs(pair[1].astype(int) - other[0].astype(int)).max() <= 1


def test_guidance_with_a_negative_prompt_changes_the_image(generator):
    avoid = EnhancedPrompt(prompt=PROMPT.prompt, negative_prompt="blurry", style="none", enhancer="none")
    plain, guided = _generate(generator, _params(2)), _generate(generator, _params(2, guidance=3.0), avoid)
    assert not np.array_equal(plain, guided)
    assert not np.array_equal(guided, _generate(generator, _params(2, guidance=3.0)))


def test_image_to_image_and_inpainting_share_the_base_modules(generator):
    source = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    edited = _generate(generator, _params(3, edit=EditInput(image=source, strength=0.6)))
    inpainted = _generate(generator, _params(3, edit=EditInput(image=source, strength=1.0, mask=mask)))
    assert edited.shape == inpainted.shape == (1, 64, 64, 3) and not np.array_equal(_generate(generator, _params(3)), edited)
    assert np.array_equal(inpainted[0][mask == 0], source[mask == 0])
    assert generator._model.edit_pipelines["inpainting"].transformer is generator._model.pipeline.transformer


def test_saved_tiny_loads_through_from_pretrained(generator, tmp_path):
    folder = save_tiny("z-image", tmp_path / "z")
    assert (folder / "model_index.json").is_file() and list((folder / "transformer").glob("*.safetensors"))
    loaded = ImageGenerator.func_or_class(turbo(str(folder)))
    expected = _generate(generator, _params(4)).astype(int)
    assert np.abs(_generate(loaded, _params(4)).astype(int) - expected).max() <= 1


def test_turbo_entries_take_no_guidance_and_no_negative_prompt_the_base_model_does():
    spec = ModelSpec.of(turbo())
    assert (spec.default_steps, spec.guidance_range, spec.uses_negative_prompt) == (9, (0.0, 0.0), False)
    base = ModelSpec.of(ImageModelConfig(id="z-image", family="z-image", source="tiny", default_steps=50,
                                         default_guidance=4.0))
    assert base.uses_negative_prompt and base.guidance_range == (0.0, 10.0)
    capabilities = get_family("z-image").capabilities_of(turbo())
    assert capabilities.image_to_image and capabilities.inpainting and capabilities.loras
    with pytest.raises(ValueError, match="limits: steps"):
        get_family("z-image").check_entry(turbo(limits={"max_steps": 101}))


def test_z_image_loras_are_recognised_before_fluxs(tmp_path):
    import torch
    from safetensors.torch import save_file

    keys = ["transformer.layers.0.feed_forward.w1.lora_A.weight", "transformer.noise_refiner.0.attention.to_q.lora_A.weight"]
    save_file({key: torch.zeros(4, 8) for key in keys}, tmp_path / "z_style.safetensors")
    assert detect_family(tmp_path / "z_style.safetensors") == "z-image"
