"""The qwen-image-edit family (Qwen-Image-Edit) on its tiny model, in process: an edit by instruction
from two references (about 9 s on a CPU: each reference is encoded at ~1 MP, so this module keeps to
one), text-to-image over the same modules without references, one call per distinct prompt, the
processor built without torchvision, the real loading path, and its rules."""

import asyncio

import numpy as np
import pytest

from deployments.config import ImageModelConfig
from deployments.families import get_family
from deployments.families.qwen_image_edit import MAX_REFERENCE_IMAGES
from deployments.image_generator import ImageGenerator
from deployments.runtime.loading import seeded_generators, to_uint8_images
from deployments.runtime.types import EnhancedPrompt, GenerationParams
from deployments.tiny import save_tiny
from serve_app.services.validation import ModelSpec

EDIT = EnhancedPrompt(prompt="put the cup from picture 1 on the table of picture 2", negative_prompt=None,
                      style="none", enhancer="none")
OTHER = EnhancedPrompt(prompt="a teapot", negative_prompt=None, style="none", enhancer="none")


def qwen_edit(source: str = "tiny", **fields) -> ImageModelConfig:
    return ImageModelConfig(id="qwen-image-edit", family="qwen-image-edit", source=source,
                            **{"warmup": {"default_shape": False}, **fields})


@pytest.fixture(scope="module")
def generator() -> ImageGenerator:
    return ImageGenerator.func_or_class(qwen_edit())


def _params(*seeds: int, references=()) -> GenerationParams:
    return GenerationParams(seeds=list(seeds), width=64, height=64, num_inference_steps=2, guidance_scale=4.0,
                            references=tuple(references))


def _generate(generator, params, prompts=(EDIT,)):
    if len(prompts) == 1:
        return asyncio.run(generator.generate(params, prompts[0])).images
    # Two prompts in one call, as a batch of two requests makes it (the model's own output, floats).
    return to_uint8_images(generator._model(params, list(prompts), None, seeded_generators(params.seeds), None))


def _picture(seed: int, width: int = 48, height: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def test_without_references_the_same_modules_make_text_to_image(generator):
    model = generator._model
    assert model.text_pipeline.transformer is model.pipeline.transformer
    first, again = _generate(generator, _params(3)), _generate(generator, _params(3))
    assert np.array_equal(first, again) and not np.array_equal(first, _generate(generator, _params(4)))


def test_a_batch_of_different_prompts_runs_one_call_per_prompt_in_order(generator):
    batch = _generate(generator, _params(5, 6), prompts=(EDIT, OTHER)).astype(int)
    alone = [_generate(generator, _params(seed), prompts=(prompt,)).astype(int) for seed, prompt in ((5, EDIT), (6, OTHER))]
    assert batch.shape == (2, 64, 64, 3)
    assert np.abs(batch[0] - alone[0][0]).max() <= 1 and np.abs(batch[1] - alone[1][0]).max() <= 1


def test_saved_tiny_loads_with_the_processor_built_without_its_video_part(generator, tmp_path):
    folder = save_tiny("qwen-image-edit", tmp_path / "edit")
    assert (folder / "processor" / "tokenizer.json").is_file()
    loaded = ImageGenerator.func_or_class(qwen_edit(str(folder)))
    processor = loaded._model.pipeline.processor
    assert processor.get_attributes() == ["image_processor", "tokenizer"]
    assert type(processor.image_processor).__name__ == "Qwen2VLImageProcessorPil"
    expected = _generate(generator, _params(7)).astype(int)
    assert np.abs(_generate(loaded, _params(7)).astype(int) - expected).max() <= 1


def test_capabilities_limits_and_rules_reach_the_model_spec():
    spec = ModelSpec.of(qwen_edit())
    capabilities = get_family("qwen-image-edit").capabilities_of(qwen_edit())
    assert capabilities.reference_images == MAX_REFERENCE_IMAGES == 3 and capabilities.instruction_edits
    assert not capabilities.image_to_image and not capabilities.inpainting and capabilities.loras
    assert capabilities.reference_max_aspect == 100.0
    assert (spec.default_steps, spec.default_guidance) == (40, 4.0) and spec.uses_negative_prompt


# Last in the module: the ~1 MP reference latents leave the next calls of this replica slower.
def test_an_edit_by_instruction_from_two_references(generator):
    plain = _generate(generator, _params(1))
    edited = _generate(generator, _params(1, references=[_picture(0), _picture(1, 32, 48)]))
    assert edited.shape == plain.shape == (1, 64, 64, 3) and not np.array_equal(plain, edited)
