"""The flux2 family (FLUX.2 [klein]) on its tiny model, in process: text-to-image, reference images,
the real loading path from a folder, its capabilities and rules, and its LoRA signature."""

import asyncio

import numpy as np
import pytest

from deployments.config import ImageModelConfig
from deployments.families import get_family
from deployments.families.flux2 import MAX_REFERENCE_IMAGES, out_layers
from deployments.image_generator import ImageGenerator
from deployments.lora_registry import detect_family
from deployments.runtime.types import EnhancedPrompt, GenerationParams, LoraRef
from deployments.tiny import save_tiny
from serve_app.services.validation import ModelSpec

PROMPT = EnhancedPrompt(prompt="a red mug on a desk", negative_prompt=None, style="none", enhancer="none")
EDIT = EnhancedPrompt(prompt="make it night", negative_prompt=None, style="none", enhancer="none")


def klein(source: str = "tiny", **fields) -> ImageModelConfig:
    # No warm-up call at the family's default 1024x1024: the tests call at 64x64.
    fields = {"limits": {"max_steps": 8, "max_guidance": 0}, "options": {"max_sequence_length": 32},
              "warmup": {"default_shape": False}, **fields}
    return ImageModelConfig(id="flux2-klein", family="flux2", source=source, **fields)


@pytest.fixture(scope="module")
def generator() -> ImageGenerator:
    return ImageGenerator.func_or_class(klein())


def _params(*seeds: int, size: int = 64, references=()) -> GenerationParams:
    return GenerationParams(seeds=list(seeds), width=size, height=size, num_inference_steps=2,
                            references=tuple(references))


def _generate(generator, params, prompt=PROMPT):
    return asyncio.run(generator.generate(params, prompt)).images


def _picture(seed: int, width: int = 64, height: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def test_text_to_image_is_deterministic_by_seed(generator):
    first, again, other = (_generate(generator, _params(seed)) for seed in (5, 5, 6))
    assert first.shape == (1, 64, 64, 3) and first.dtype == np.uint8
    assert np.array_equal(first, again) and not np.array_equal(first, other)


def test_reference_images_condition_every_image_of_the_call(generator):
    plain = _generate(generator, _params(1, 2), EDIT)
    one = _generate(generator, _params(1, 2, references=[_picture(0)]), EDIT)
    two = _generate(generator, _params(1, 2, references=[_picture(0), _picture(1, 96)]), EDIT)
    assert one.shape == two.shape == (2, 64, 64, 3)
    assert not np.array_equal(plain, one) and not np.array_equal(one, two)
    # Each image keeps its seed: image 2 of the call is the same seed alone.
    alone = _generate(generator, _params(2, references=[_picture(0)]), EDIT)
    assert np.abs(alone[0].astype(int) - one[1].astype(int)).max() <= 1


def test_saved_tiny_loads_through_from_pretrained(generator, tmp_path):
    folder = save_tiny("flux2", tmp_path / "klein")
    assert (folder / "model_index.json").is_file() and list((folder / "transformer").glob("*.safetensors"))
    loaded = ImageGenerator.func_or_class(klein(str(folder)))
    expected = _generate(generator, _params(3, references=[_picture(2)]), EDIT).astype(int)
    actual = _generate(loaded, _params(3, references=[_picture(2)]), EDIT).astype(int)
    assert np.abs(actual - expected).max() <= 1


def test_prompt_embeddings_come_from_the_published_fractions_of_the_text_encoders_depth(generator):
    assert out_layers(36) == (9, 18, 27)  # what diffusers passes for the published models
    assert generator._model.text_encoder_out_layers == (1, 2, 3)  # the tiny Qwen3's 4 layers
    chosen = ImageGenerator.func_or_class(klein(options={"max_sequence_length": 32,
                                                          "text_encoder_out_layers": [2, 3, 4]}))
    assert chosen._model.text_encoder_out_layers == (2, 3, 4)
    assert not np.array_equal(_generate(chosen, _params(5)), _generate(generator, _params(5)))


def test_capabilities_limits_and_rules_reach_the_model_spec():
    spec = ModelSpec.of(klein())
    capabilities = get_family("flux2").capabilities_of(klein())
    assert capabilities.reference_images == MAX_REFERENCE_IMAGES and capabilities.instruction_edits
    assert not capabilities.image_to_image and not capabilities.inpainting and capabilities.loras
    assert (spec.min_steps, spec.max_steps, spec.default_steps, spec.guidance_range) == (1, 8, 4, (0.0, 0.0))
    # The pipeline fixes the unconditional prompt to "": a negative prompt would be dropped.
    assert not spec.uses_negative_prompt and not ModelSpec.of(klein(limits={})).uses_negative_prompt
    with pytest.raises(ValueError, match="limits: steps"):
        get_family("flux2").check_entry(klein(limits={"max_steps": 60}))


def test_distilled_entries_build_a_distilled_pipeline_and_base_entries_guide():
    family = get_family("flux2")
    assert family.build_tiny(config=klein()).config.is_distilled
    base = ImageModelConfig(id="flux2-klein-base", family="flux2", source="tiny", default_steps=20, default_guidance=4.0)
    assert not family.build_tiny(config=base).config.is_distilled


def _flux2_lora(folder, name: str = "klein_style"):
    import torch
    from diffusers import Flux2KleinPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    transformer = get_family("flux2").build_tiny().transformer
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                           target_modules=["to_q", "to_k", "to_v", "to_qkv_mlp_proj"]))
    layers = {key: value * 8 if "lora_B" in key else value for key, value in get_peft_model_state_dict(transformer).items()}
    Flux2KleinPipeline.save_lora_weights(folder, transformer_lora_layers=layers, weight_name=f"{name}.safetensors")
    return folder / f"{name}.safetensors"


def test_flux2_loras_are_recognised_as_flux2_and_change_the_image(generator, tmp_path):
    path = _flux2_lora(tmp_path)
    assert detect_family(path) == "flux2"
    plain = _generate(generator, _params(4))
    styled = asyncio.run(generator.generate(
        GenerationParams(seeds=[4], width=64, height=64, num_inference_steps=2,
                         loras=(LoraRef(name="klein_style", location=str(tmp_path), weight_name=path.name),)),
        PROMPT)).images
    assert not np.array_equal(plain, styled)
    assert np.array_equal(plain, _generate(generator, _params(4)))  # and it does not leak into the next call
