"""The qwen-image family (Qwen-Image) on its tiny model, in process: text-to-image with true
classifier-free guidance, image-to-image and inpainting from the same modules, the real loading
path from a folder, its rules, and its LoRA signature."""

import asyncio

import numpy as np
import pytest

from deployments.config import ImageModelConfig
from deployments.families import get_family
from deployments.families.qwen_image import EMPTY_NEGATIVE, true_cfg_arguments
from deployments.image_generator import ImageGenerator
from deployments.lora_registry import detect_family
from deployments.runtime.types import EditInput, EnhancedPrompt, GenerationParams
from deployments.tiny import save_tiny
from serve_app.services.validation import ModelSpec

PROMPT = EnhancedPrompt(prompt='a shop sign that reads "OPEN"', negative_prompt=None, style="none", enhancer="none")


def qwen(source: str = "tiny", **fields) -> ImageModelConfig:
    # No warm-up call at the family's default 1328x1328: the tests call at 64x64. The default 512 prompt tokens:
    # the tiny byte-level tokenizer spends ~150 of them on the system template Qwen's own spends 34 on.
    fields = {"warmup": {"default_shape": False}, **fields}
    return ImageModelConfig(id="qwen-image", family="qwen-image", source=source, **fields)


@pytest.fixture(scope="module")
def generator() -> ImageGenerator:
    return ImageGenerator.func_or_class(qwen())


def _params(*seeds: int, guidance: float = 4.0, edit=None) -> GenerationParams:
    return GenerationParams(seeds=list(seeds), width=64, height=64, num_inference_steps=2, guidance_scale=guidance,
                            edit=edit)


def _generate(generator, params, prompt=PROMPT):
    return asyncio.run(generator.generate(params, prompt)).images


def test_text_to_image_is_deterministic_by_seed_and_guidance_changes_it(generator):
    first, again, other = (_generate(generator, _params(seed)) for seed in (5, 5, 6))
    assert first.shape == (1, 64, 64, 3) and first.dtype == np.uint8
    assert np.array_equal(first, again) and not np.array_equal(first, other)
    assert not np.array_equal(first, _generate(generator, _params(5, guidance=1.0)))


def test_guidance_is_true_cfg_with_a_negative_prompt_only_where_it_runs():
    single = {"prompt": "a fox", "negative_prompt": None, "guidance_scale": 4.0}
    assert true_cfg_arguments(single, 4.0) == {"prompt": "a fox", "negative_prompt": EMPTY_NEGATIVE,
                                              "true_cfg_scale": 4.0, "guidance_scale": None}
    assert true_cfg_arguments({**single, "negative_prompt": "blur"}, 1.0)["negative_prompt"] is None
    batch = {"prompt": ["a fox", "an owl"], "negative_prompt": ["blur", ""]}
    assert true_cfg_arguments(batch, 3.0)["negative_prompt"] == ["blur", EMPTY_NEGATIVE]
    assert true_cfg_arguments({**batch, "negative_prompt": None}, 3.0)["negative_prompt"] == [EMPTY_NEGATIVE] * 2


def test_a_negative_prompt_changes_the_guided_image(generator):
    avoid = EnhancedPrompt(prompt=PROMPT.prompt, negative_prompt="blurry, red", style="none", enhancer="none")
    assert not np.array_equal(_generate(generator, _params(2)), _generate(generator, _params(2), avoid))


def test_image_to_image_and_inpainting_share_the_base_modules(generator):
    source = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    plain = _generate(generator, _params(3))
    edited = _generate(generator, _params(3, edit=EditInput(image=source, strength=0.6)))
    inpainted = _generate(generator, _params(3, edit=EditInput(image=source, strength=1.0, mask=mask)))
    assert edited.shape == inpainted.shape == (1, 64, 64, 3) and not np.array_equal(plain, edited)
    # Outside the mask the source's pixels are pasted back exactly.
    assert np.array_equal(inpainted[0][mask == 0], source[mask == 0])
    assert generator._model.edit_pipelines["image-to-image"].transformer is generator._model.pipeline.transformer


def test_saved_tiny_loads_through_from_pretrained(generator, tmp_path):
    folder = save_tiny("qwen-image", tmp_path / "qwen")
    assert (folder / "model_index.json").is_file() and list((folder / "transformer").glob("*.safetensors"))
    loaded = ImageGenerator.func_or_class(qwen(str(folder)))
    expected = _generate(generator, _params(4)).astype(int)
    assert np.abs(_generate(loaded, _params(4)).astype(int) - expected).max() <= 1


def test_capabilities_limits_and_rules_reach_the_model_spec():
    spec = ModelSpec.of(qwen())
    capabilities = get_family("qwen-image").capabilities_of(qwen())
    assert capabilities.image_to_image and capabilities.inpainting and capabilities.loras
    assert capabilities.reference_images == 0
    assert (spec.default_steps, spec.default_guidance, spec.default_width) == (50, 4.0, 1328)
    assert spec.uses_negative_prompt
    with pytest.raises(ValueError, match="limits: steps"):
        get_family("qwen-image").check_entry(qwen(limits={"max_steps": 101}))


def test_qwen_image_loras_are_recognised_and_asked_before_fluxs(tmp_path):
    import torch
    from diffusers import QwenImagePipeline
    from peft import LoraConfig, get_peft_model_state_dict

    transformer = get_family("qwen-image").build_tiny().transformer
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                           target_modules=["to_q", "to_k", "img_mlp.net.2", "txt_mlp.net.2"]))
    QwenImagePipeline.save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(transformer),
                                        weight_name="qwen_style.safetensors")
    assert detect_family(tmp_path / "qwen_style.safetensors") == "qwen-image"


def test_flux_lora_keys_in_the_original_layout_stay_fluxs(tmp_path):
    import torch
    from safetensors.torch import save_file

    keys = ["diffusion_model.double_blocks.0.img_mlp.0.lora_A.weight", "diffusion_model.double_blocks.0.img_mod.lin.lora_A.weight"]
    save_file({key: torch.zeros(4, 8) for key in keys}, tmp_path / "flux_original.safetensors")
    assert detect_family(tmp_path / "flux_original.safetensors") == "flux"
