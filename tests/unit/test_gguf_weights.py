"""Smaller weights as config, on tiny models in process: a GGUF checkpoint of FLUX's transformer
written here with the `gguf` package loads through diffusers' real GGUF path (from_single_file with
the pipeline folder's config) and generates; fp8 storage keeps the denoiser's weights in float8;
NF4 is config and memory plan only (bitsandbytes needs CUDA).

Tolerances are on images in [0, 1] (the pipeline's float output).
"""

import numpy as np
import pytest
from pydantic import ValidationError

from deployments.runtime.loading import resolve_placement, seeded_generators
from deployments.runtime.types import EnhancedPrompt, GenerationParams
from serve_app.config import ImageModelEntry

PROMPT = EnhancedPrompt(prompt="a lighthouse at dusk", negative_prompt=None, style="none", enhancer="none")


def write_gguf(state_dict: dict, path) -> int:
    """Every 2-D weight whose rows are whole Q8_0 blocks (32 values) in Q8_0, the rest in F32, under
    diffusers' own names (a converted checkpoint needs no key mapping); returns how many are quantized."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "flux")
    quantized = 0
    for name, tensor in state_dict.items():
        array = tensor.float().numpy()
        if array.ndim == 2 and array.shape[-1] % 32 == 0:
            writer.add_tensor(name, gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            quantized += 1
        else:
            writer.add_tensor(name, array.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return quantized


def _generate(entry: ImageModelEntry):
    import torch

    model = entry.model_family.load(entry, resolve_placement(entry.device))
    params = GenerationParams(seeds=[5], width=64, height=64, num_inference_steps=2, guidance_scale=0.0)
    with torch.inference_mode():
        return np.asarray(model(params, [PROMPT], None, seeded_generators([5]), None)), model


def _flux(source: str, **memory) -> ImageModelEntry:
    return ImageModelEntry(id="m", family="flux", source=source, options={"max_sequence_length": 32},
                           device={"device": "cpu", "dtype": "float32"}, memory=memory)


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory):
    """A tiny FLUX pipeline saved in diffusers' layout, and a Q8_0 GGUF of its transformer beside it."""
    from deployments.families import get_family

    folder = tmp_path_factory.mktemp("flux")
    pipeline = get_family("flux").build_tiny()
    pipeline.save_pretrained(folder)
    assert write_gguf(pipeline.transformer.state_dict(), folder / "transformer-Q8_0.gguf") > 0
    return folder


@pytest.fixture(scope="module")
def native(flux_folder):
    """The image of the full-precision weights, for the same seed."""
    return _generate(_flux(str(flux_folder)))[0]


def test_a_gguf_transformer_loads_through_diffusers_and_generates_close_to_the_full_weights(flux_folder, native):
    from diffusers.quantizers.gguf.utils import GGUFParameter

    images, model = _generate(_flux(str(flux_folder), weights="gguf_q8_0",
                                    gguf_file=str(flux_folder / "transformer-Q8_0.gguf")))
    quantized = [p for p in model.pipeline.transformer.parameters() if isinstance(p, GGUFParameter)]
    assert quantized, "the transformer's linear weights stay GGUF-quantized in memory"
    assert images.shape == native.shape == (1, 64, 64, 3)
    # Q8_0 keeps ~3 significant digits per block: the same seed gives nearly the same picture.
    assert np.abs(images - native).mean() < 0.02


def test_fp8_storage_keeps_the_denoisers_weights_in_float8_and_generates(flux_folder, native):
    import torch

    images, model = _generate(_flux(str(flux_folder), weights="fp8"))
    dtypes = {layer.weight.dtype for layer in model.pipeline.transformer.modules() if isinstance(layer, torch.nn.Linear)}
    assert torch.float8_e4m3fn in dtypes
    assert np.isfinite(images).all() and np.abs(images - native).mean() < 0.1


def test_weight_formats_are_checked_at_config_load_naming_the_field():
    with pytest.raises(ValidationError, match="memory.weights 'gguf_q4_0' needs memory.gguf_file"):
        _flux("tiny", weights="gguf_q4_0")
    with pytest.raises(ValidationError, match="the sdxl family loads no GGUF checkpoints"):
        ImageModelEntry(id="m", family="sdxl", source="tiny", memory={"weights": "gguf_q8_0", "gguf_file": "x/y/z.gguf"})
    with pytest.raises(ValidationError, match="both quantize the denoiser"):
        ImageModelEntry(id="m", family="flux", source="tiny", memory={"weights": "fp8"},
                        acceleration={"quantization": "int8_weight_only"})
    assert _flux("tiny", weights="gguf_q4_0", gguf_file="city96/FLUX.1-schnell-gguf/flux1-schnell-Q4_0.gguf") \
        .memory.gguf_location() == ("city96/FLUX.1-schnell-gguf", "flux1-schnell-Q4_0.gguf")


def test_nf4_is_refused_off_cuda_at_load_naming_the_field(flux_folder):
    with pytest.raises(ValueError, match="memory.weights 'nf4' needs a CUDA GPU"):
        _generate(_flux(str(flux_folder), weights="nf4"))


def test_quantized_weights_shrink_the_planned_flux_transformer_to_the_published_gguf_sizes():
    """The transformer alone, as issue 33 quotes the published GGUF files: Q8_0 about 12.6 GB, Q4 about 6.7 GB."""
    from deployments.runtime.sim.memory import component_bytes

    sizes = {weights: component_bytes("flux-schnell", "transformer", "bfloat16", weights=weights) / 1e9
             for weights in ("native", "fp8", "gguf_q8_0", "gguf_q4_0", "nf4")}
    assert 23.7 < sizes["native"] < 23.9 and 11.8 < sizes["fp8"] < 12.0
    assert 12.5 < sizes["gguf_q8_0"] < 12.8 and 6.6 < sizes["gguf_q4_0"] < 6.9
    assert sizes["nf4"] == pytest.approx(sizes["gguf_q4_0"], rel=0.01)
