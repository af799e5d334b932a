"""The benchmarks' own logic, quickly: bench-gpu on the CPU (tiny architectures)."""

import json

from serve_app.bench.gpu import ARCHITECTURES, format_gpu_table, run_case


def test_bench_gpu_runs_the_tiny_architectures_on_cpu_and_skips_what_the_cpu_cannot():
    eager = run_case("flux-schnell", "eager", batch=1, repeats=1, device="cpu", cpu_compile=False, steps=1,
                     size=(128, 128))
    fp8 = run_case("flux-schnell", "compiled+fp8", batch=1, repeats=1, device="cpu", cpu_compile=False)
    compiled = run_case("flux-schnell", "compiled", batch=1, repeats=1, device="cpu", cpu_compile=False)
    sdxl = run_case("sdxl", "eager", batch=1, repeats=1, device="cpu", cpu_compile=False, steps=2, size=(128, 128))
    assert eager.skipped is None and eager.p50_s > 0 and eager.first_s > 0
    assert "fp8_dynamic" in fp8.skipped and "cpu" in fp8.skipped
    assert "--cpu-compile" in compiled.skipped
    assert sdxl.per_step_s is not None
    table = format_gpu_table("cpu", [eager, fp8, sdxl])
    assert "tiny architectures" in table and "skipped: acceleration.quantization" in table


def test_published_architectures_are_kept_as_component_configs():
    flux = json.loads((ARCHITECTURES / "flux-schnell.json").read_text())
    sdxl = json.loads((ARCHITECTURES / "sdxl.json").read_text())
    assert flux["transformer"]["config"]["num_layers"] == 19 and flux["transformer"]["config"]["num_single_layers"] == 38
    assert flux["text_encoder_2"]["config"]["d_model"] == 4096
    assert sdxl["unet"]["config"]["transformer_layers_per_block"] == [1, 2, 10]


def test_the_published_architectures_build_on_the_meta_device_with_their_parameter_counts():
    """The full-size classes accept the kept configs (checked without memory: parameters on the meta device)."""
    import diffusers
    import transformers
    from accelerate import init_empty_weights

    counts = {}
    for name in ("flux-schnell", "sdxl"):
        spec = json.loads((ARCHITECTURES / f"{name}.json").read_text())
        for part in ("transformer", "unet", "text_encoder_2"):
            if part not in spec:
                continue
            with init_empty_weights():
                if part == "text_encoder_2" and name == "flux-schnell":
                    model = transformers.T5EncoderModel(transformers.T5Config(**spec[part]["config"]))
                elif part == "text_encoder_2":
                    model = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**spec[part]["config"]))
                else:
                    model = getattr(diffusers, spec[part]["class"])(**spec[part]["config"])
            counts[(name, part)] = sum(parameter.numel() for parameter in model.parameters())
    # Published sizes: FLUX.1 transformer 11.9B, T5-XXL encoder 4.8B, SDXL UNet 2.6B, OpenCLIP bigG text 0.69B.
    assert 11.8e9 < counts[("flux-schnell", "transformer")] < 12.0e9
    assert 4.6e9 < counts[("flux-schnell", "text_encoder_2")] < 4.9e9
    assert 2.5e9 < counts[("sdxl", "unet")] < 2.7e9
    assert 0.6e9 < counts[("sdxl", "text_encoder_2")] < 0.8e9

