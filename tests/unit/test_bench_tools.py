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


def test_concurrent_clients_wait_out_rejections_and_count_failures_apart():
    """Through genserve's own client: a 503 is waited out and retried (counted), a 422 is a failure."""
    import asyncio

    import httpx

    from serve_app.bench.concurrency import run_level
    from tests.unit.test_client import IMAGE

    answered = []

    def server(request: httpx.Request) -> httpx.Response:
        seed = json.loads(request.content)["seed"]
        answered.append(seed)
        if seed == 1003:
            return httpx.Response(422, json={"detail": "bad"})
        if seed == 1001 and answered.count(seed) == 1:
            return httpx.Response(503, headers={"Retry-After": "0"}, json={"detail": "queue full"})
        return httpx.Response(200, json=IMAGE)

    level = asyncio.run(run_level("http://genserve.test", {"prompt": "a fox"}, "as configured", clients=2, requests=5,
                                  transport=httpx.MockTransport(server)))
    assert sorted(set(answered)) == [1000, 1001, 1002, 1003, 1004] and answered.count(1001) == 2
    assert len(level.seconds) == 4 and level.failures == 1 and level.rejections == 1 and level.wall_s > 0


def test_the_concurrency_table_gives_ratios_to_one_client_and_to_the_first_mode():
    from serve_app.bench.concurrency import Level, format_concurrency_table

    levels = [Level("batching off", 1, [0.1] * 10, 0, 1.0), Level("batching off", 8, [0.4] * 20, 0, 1.0),
              Level("batching on", 1, [0.1] * 10, 0, 1.0), Level("batching on", 8, [0.3] * 30, 2, 1.0, rejections=5)]
    rows = format_concurrency_table(levels).splitlines()
    # batching on at 8 clients: 30 ok, 2 failed, 5 rejections, 30 img/s, 3.00x its one client, 1.50x the first
    # mode, p50/p95 300 ms; no device readings and no rejection latencies: "-".
    assert rows[4].split()[-12:] == ["30", "2", "5", "30.00", "3.00", "1.50", "300", "300", "-", "-", "-", "-"]


def test_the_concurrency_bench_turns_batching_on_with_room_for_the_next_batch_while_one_runs():
    from serve_app.bench.concurrency import with_batching
    from serve_app.config import app_args_from_config

    config = app_args_from_config("configs/dev.yaml")
    on = with_batching(config, True, max_batch_images=12, wait_ms=20)
    entry = on.image_model(on.default_model_id)
    assert entry.batching.enabled and entry.batching.max_batch_images == 12 and entry.deployment.max_ongoing_requests == 24
    assert on.scores.batching.enabled and on.deployments["ClipScorer"].max_ongoing_requests == 24
    assert entry.deployment.max_queued_requests == config.image_model(config.default_model_id).deployment.max_queued_requests
    off = with_batching(config, False, max_batch_images=12, wait_ms=20)
    assert not off.image_model(off.default_model_id).batching.enabled and not off.scores.batching.enabled
