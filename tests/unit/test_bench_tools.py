"""The benchmarks' own logic, quickly: bench-gpu on the CPU (tiny architectures), the concurrency table."""

import json

from serve_app.bench.concurrency import Level, format_concurrency_table, with_batching
from serve_app.bench.gpu import ARCHITECTURES, format_gpu_table, run_case
from serve_app.config import app_args_from_config


def test_bench_gpu_runs_the_tiny_architectures_on_cpu_and_skips_what_the_cpu_cannot():
    eager = run_case("flux-schnell", "eager", batch=1, repeats=1, device="cpu", cpu_compile=False, steps=1,
                     size=(128, 128))
    fp8 = run_case("flux-schnell", "compiled+fp8", batch=1, repeats=1, device="cpu", cpu_compile=False)
    sdxl = run_case("sdxl", "eager", batch=1, repeats=1, device="cpu", cpu_compile=False, steps=2, size=(128, 128))
    assert eager.skipped is None and eager.p50_s > 0 and eager.first_s > 0
    assert "fp8_dynamic" in fp8.skipped and "cpu" in fp8.skipped
    assert sdxl.per_step_s is not None
    table = format_gpu_table("cpu", [eager, fp8, sdxl])
    assert "tiny architectures" in table and "skipped: acceleration.quantization" in table


def test_published_architectures_are_kept_as_component_configs():
    flux = json.loads((ARCHITECTURES / "flux-schnell.json").read_text())
    sdxl = json.loads((ARCHITECTURES / "sdxl.json").read_text())
    assert flux["transformer"]["config"]["num_layers"] == 19 and flux["transformer"]["config"]["num_single_layers"] == 38
    assert flux["text_encoder_2"]["config"]["d_model"] == 4096
    assert sdxl["unet"]["config"]["transformer_layers_per_block"] == [1, 2, 10]


def test_concurrency_bench_turns_batching_on_with_room_for_a_batch_and_reports_ratios():
    args = with_batching(app_args_from_config("configs/dev.yaml"), True, max_batch_images=8, wait_ms=20)
    entry = args.image_model(args.default_model_id)
    assert entry.batching.enabled and entry.deployment.max_ongoing_requests >= 8
    levels = [Level("batching off", 1, [0.1] * 10, 0, 1.0), Level("batching off", 8, [0.4] * 20, 0, 1.0),
              Level("batching on", 1, [0.1] * 10, 0, 1.0), Level("batching on", 8, [0.3] * 30, 2, 1.0)]
    rows = format_concurrency_table(levels).splitlines()
    # batching on at 8 clients: 2 failures, 30 img/s, 3.00x its one client, 1.50x batching off at 8.
    assert rows[4].split()[-7:] == ["30", "2", "30.00", "3.00", "1.50", "300", "300"]
