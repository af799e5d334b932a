"""Acceleration tiers on tiny models, in process: checked against the family at config load and the
hardware at model load, applied in the generic loader, and close to plain eager where they are lossless.

Tolerances are on images in [0, 1] (float output of the pipeline, before uint8 rounding).
"""

import functools

import numpy as np
import pytest
from pydantic import ValidationError

from deployments.config import ImageModelConfig
from deployments.runtime.acceleration import AccelerationError
from deployments.runtime.loading import resolve_placement, seeded_generators
from deployments.runtime.types import EnhancedPrompt, GenerationParams
from serve_app.config import ImageModelEntry
from serve_app.services.validation import ModelSpec

PROMPT = EnhancedPrompt(prompt="a lighthouse at dusk", negative_prompt=None, style="none", enhancer="none")


def _entry(family: str = "flux", **acceleration) -> ImageModelEntry:
    options = {"max_sequence_length": 32} if family == "flux" else {}
    return ImageModelEntry(id="m", family=family, source="tiny", options=options, acceleration=acceleration)


def _run(entry: ImageModelConfig, steps: int = 4, size: int = 128, probe=None):
    """Float images of one seed; `probe(model)` runs on the loaded model before the call."""
    import torch

    model = entry.model_family.load(entry, resolve_placement(entry.device))
    if probe is not None:
        probe(model)
    params = GenerationParams(seeds=[5], width=size, height=size, num_inference_steps=steps, guidance_scale=3.5)
    with torch.inference_mode():
        return np.asarray(model(params, [PROMPT], None, seeded_generators([5]), None)), model


@functools.cache
def _eager(steps: int = 4, size: int = 128) -> np.ndarray:
    """The plain tiny FLUX's images: the reference each tier is compared with, computed once per shape."""
    images, _ = _run(_entry(), steps=steps, size=size)
    images.setflags(write=False)
    return images


def test_a_tier_the_family_lacks_is_rejected_at_config_load_naming_the_field():
    with pytest.raises(ValidationError, match=r"acceleration: cache.kind: 'first_block' is not a cache hook .*unet"):
        _entry("sdxl", cache={"threshold": 0.2})
    with pytest.raises(ValidationError, match="compile_mode and fullgraph apply only with compile"):
        _entry(compile_mode="max-autotune")
    with pytest.raises(ValidationError, match="threshold"):
        _entry(cache={"threshold": 0})
    with pytest.raises(ValidationError, match=r"warmup.shapes.0.steps \(9\) must lie within the limits, 1-4"):
        ImageModelEntry(id="m", family="flux", source="tiny", limits={"max_steps": 4},
                        warmup={"shapes": [{"width": 256, "height": 256, "steps": 9}]})


def test_fp8_and_cuda_only_attention_fail_on_cpu_at_load_naming_the_field():
    with pytest.raises(AccelerationError, match=r"acceleration.quantization: 'fp8_dynamic' needs a CUDA GPU .* on cpu"):
        _run(_entry(quantization="fp8_dynamic"))
    with pytest.raises(AccelerationError, match=r"acceleration.attention_backend: '_native_flash' runs on CUDA only"):
        _run(_entry(attention_backend="_native_flash"))


def test_the_active_tier_lists_only_what_differs_from_eager():
    assert _entry().acceleration.active() == {}
    assert _entry(compile="repeated_blocks", fuse_qkv=True).acceleration.active() == {
        "compile": "repeated_blocks", "fuse_qkv": True}


def test_fused_qkv_matches_eager_and_takes_no_loras():
    eager = _eager()
    fused, model = _run(_entry(fuse_qkv=True))
    assert hasattr(model.pipeline.transformer.transformer_blocks[0].attn, "to_qkv")
    # The image-to-image and inpainting pipelines (and hires' second pass) run the same fused denoiser.
    assert all(pipeline.transformer is model.pipeline.transformer for pipeline in model.edit_pipelines.values())
    assert np.abs(fused - eager).max() < 1e-4
    # The fused projection leaves to_q/to_k/to_v unused, so a LoRA would silently do nothing: 422 instead.
    assert ModelSpec.of(_entry()).supports_loras and not ModelSpec.of(_entry(fuse_qkv=True)).supports_loras



def test_the_family_offers_no_loras_a_fused_qkv_entry_refuses():
    # One computation of an entry's capabilities, read by the request checks and the family's public info.
    for entry, takes_loras in ((_entry(), True), (_entry(fuse_qkv=True), False), (_entry("sdxl", fuse_qkv=True), False)):
        capabilities = entry.model_family.capabilities_of(entry)
        assert capabilities.loras is ModelSpec.of(entry).supports_loras is takes_loras
        assert capabilities.public()["loras"] is takes_loras

def test_int8_weight_only_stays_close_to_eager():
    eager = _eager()
    quantized, model = _run(_entry(quantization="int8_weight_only"))
    assert "Int8" in type(model.pipeline.transformer.transformer_blocks[0].attn.to_q.weight).__name__
    # Measured on the tiny FLUX: max 0.008, mean 0.0006.
    assert np.abs(quantized - eager).mean() < 0.005 and np.abs(quantized - eager).max() < 0.05


def test_first_block_cache_skips_blocks_and_drifts_little():
    """8 steps, threshold 0.3: measured 5 of 8 steps skipped past the first block, mean drift 0.0006."""
    computed = []

    def count_last_block(model):
        block = model.pipeline.transformer.single_transformer_blocks[-1]
        block.proj_out.register_forward_hook(lambda *args: computed.append(1))

    eager, _ = _run(_entry(), steps=8, probe=count_last_block)
    assert len(computed) == 8
    computed.clear()
    cached, _ = _run(_entry(cache={"threshold": 0.3}), steps=8, probe=count_last_block)
    assert 1 <= len(computed) < 8
    drift = np.abs(cached - eager)
    assert 0 < drift.mean() < 0.005 and drift.max() < 0.05


def test_compiled_repeated_blocks_match_eager():
    """Inductor on the CPU: the first call compiles (minutes on a loaded 2-core box; cached after)."""
    eager, _ = _run(_entry(), steps=1, size=64)
    compiled, model = _run(_entry(compile="repeated_blocks"), steps=1, size=64)
    block = model.pipeline.transformer.transformer_blocks[0]
    assert block._compiled_call_impl is not None
    # Measured: max 2.2e-6 at 256x256, 4 steps.
    assert np.abs(compiled - eager).max() < 1e-4


def test_the_docs_example_entry_is_a_valid_config():
    import re
    from pathlib import Path

    import yaml

    text = (Path(__file__).resolve().parents[2] / "docs" / "acceleration.md").read_text()
    example = yaml.safe_load(re.search(r"```yaml\n(.*?)```", text, re.S).group(1))
    entry = ImageModelEntry(**example["image_models"][0])
    assert entry.acceleration.active() == {"compile": "repeated_blocks", "compile_mode": "max-autotune-no-cudagraphs",
                                           "quantization": "fp8_dynamic"}
    assert entry.batching.enabled and entry.warmup.shapes[0].images == 4


def test_a_replica_warms_up_before_it_is_ready_and_reports_its_tier_and_cold_start(monkeypatch):
    from deployments.image_generator import ImageGenerator

    entry = ImageModelConfig(id="flux-schnell", family="flux", source="tiny", limits={"max_steps": 4, "max_guidance": 0},
                             options={"max_sequence_length": 32}, default_width=256, default_height=256, default_steps=2,
                             acceleration={"fuse_qkv": True},
                             warmup={"shapes": [{"width": 128, "height": 128, "images": 2}]})
    cls = ImageGenerator.func_or_class
    generate, calls = cls._generate, []

    def counting(self, group, monitor):
        calls.extend([(pending.params.width, pending.params.num_inference_steps, pending.images) for pending in group])
        return generate(self, group, monitor)

    monkeypatch.setattr(cls, "_generate", counting)
    generator = cls(entry, metrics=False)
    assert calls == [(256, 2, 1), (128, 2, 2)], "the default shape, then each declared shape, in the constructor"
    info = generator.info()
    assert info["acceleration"] == {"fuse_qkv": True}
    assert info["warmup_shapes"] == [{"width": 256, "height": 256, "steps": 2, "images": 1},
                                     {"width": 128, "height": 128, "steps": 2, "images": 2}]
    assert info["cold_start"]["load_s"] > 0 and info["cold_start"]["warmup_s"] > 0
    calls.clear()
    plain = ImageModelConfig(id="flux-schnell", family="flux", source="tiny", options={"max_sequence_length": 32},
                             warmup={"default_shape": False})
    assert cls(plain, metrics=False).info()["warmup_shapes"] == [] and calls == []
