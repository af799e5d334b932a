"""The simulated accelerator (`device: sim:<profile>`, deployments.runtime.sim): profiles as data,
modelled time through the real generator path (progress, cancel, batching), the memory ledger and
its out-of-memory error, the simulated scorer and LLM. Shapes come from the shipped FLOP table, so
nothing here counts a 12B transformer."""

import asyncio
import json
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from deployments.config import DeviceOptions, ImageModelConfig, LlmConfig, ScorerConfig
from deployments.image_generator import ImageGenerator
from deployments.runtime.loading import resolve_placement
from deployments.runtime.progress import Interrupted, StepMonitor
from deployments.runtime.sim import flops, memory, timing
from deployments.runtime.types import EnhancedPrompt, GenerationParams, ModelOutOfMemory
from deployments.sim_profiles import profile, profiles

PROMPT = EnhancedPrompt(prompt="a red cube", negative_prompt=None, style="none", enhancer="none")


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """A ledger (and FLOP cache) of this test's own: other tests' simulated GPUs are not this one's."""
    monkeypatch.setenv("GENSERVE_SIM_CACHE", str(tmp_path))


@pytest.fixture(autouse=True)
def cold_sleeps(monkeypatch) -> list[float]:
    """The simulated cold starts' waits, recorded instead of slept (the test that wants one reads them)."""
    sleeps: list[float] = []
    monkeypatch.setattr(timing, "time", SimpleNamespace(sleep=sleeps.append))
    return sleeps


def flux(device="sim:h200", **fields) -> ImageModelConfig:
    return ImageModelConfig(**{"id": "flux-schnell", "family": "flux", "source": "black-forest-labs/FLUX.1-schnell",
                               "limits": {"max_steps": 4, "max_guidance": 0}, "default_width": 512,
                               "default_height": 512, "device": device if isinstance(device, dict) else {"device": device}, "warmup": {"default_shape": False},
                               **fields})


def test_every_card_of_the_issue_is_a_profile_with_dense_figures_and_a_source():
    cards = profiles()
    assert set(cards) == {"h100-sxm", "h200", "l4", "a10g", "rtx-4090", "rtx-3090", "rtx-4080-16gb", "rtx-4070-12gb"}
    for card in cards.values():
        assert card.sources["all"].startswith("https://") and card.memory_gb > 0 and card.memory_bandwidth_gbs > 0
    assert cards["rtx-3090"].fp8_tflops is None and cards["a10g"].fp8_tflops is None
    # Dense: the datasheets' sparse figures are twice these.
    assert cards["h100-sxm"].bf16_tflops == 989.5 and cards["h200"].fp8_tflops == 1979
    assert cards["h200"].memory_gb == 141 and cards["l4"].bf16_tflops == 121


def test_a_simulated_device_is_named_by_profile_and_an_unknown_one_names_the_known():
    assert DeviceOptions(device="sim:l4").simulated == "l4" and DeviceOptions(device="cuda").simulated is None
    with pytest.raises(ValueError, match="known: h100-sxm, h200"):
        DeviceOptions(device="sim:h300")
    with pytest.raises(ValueError, match="'sim:<profile>'"):
        DeviceOptions(device="tpu")
    placement = resolve_placement(DeviceOptions(device="sim:h200"))
    assert (placement.device, placement.dtype_name, placement.torch_device) == ("sim:h200", "bfloat16", "cpu")


def test_the_fitted_tiers_reproduce_their_published_timings():
    for point in timing.calibration()["points"]:
        simulated = timing.image_call(timing.point_shape(point), profile(point["profile"]), point["tier"]).total_s
        if point["fitted"]:
            assert simulated == pytest.approx(point["seconds"], rel=1e-9), point["id"]
    efficiency = timing.efficiencies()
    assert 0 < efficiency["eager"] < efficiency["compiled"] < 1 and 0 < efficiency["compiled+fp8"] < 1


def test_batching_amortises_the_fixed_cost_but_not_the_flops():
    card = profile("h200")
    one = timing.image_call(timing.ImageShape("flux-schnell", 512, 512, 4, images=1), card, "compiled")
    four = timing.image_call(timing.ImageShape("flux-schnell", 512, 512, 4, images=4), card, "compiled")
    assert four.fixed_s == one.fixed_s
    assert four.total_s - four.fixed_s == pytest.approx(4 * (one.total_s - one.fixed_s))


def test_a_simulated_generator_takes_its_modelled_time_without_the_cpu_and_marks_its_images():
    generator = ImageGenerator.func_or_class(flux(acceleration={"compile": "repeated_blocks"}), metrics=False)
    params = GenerationParams(seeds=[3, 4], width=512, height=512, num_inference_steps=4)
    modelled = timing.image_call(timing.ImageShape("flux-schnell", 512, 512, 4, images=2, text_tokens=256),
                                 profile("h200"), "compiled").total_s
    wall, cpu = time.perf_counter(), time.process_time()
    output = asyncio.run(generator.generate(params, PROMPT))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    assert wall >= modelled and cpu < wall / 2, "slept through the modelled time, the CPU free"
    assert output.device == "sim:h200" and output.images.shape == (2, 512, 512, 3)
    again = asyncio.run(generator.generate(GenerationParams(seeds=[3], width=512, height=512, num_inference_steps=4),
                                           PROMPT))
    assert np.array_equal(again.images[0], output.images[0]) and not np.array_equal(output.images[0], output.images[1])
    info = generator.info()
    assert info["device"] == "sim:h200" and info["simulation"]["tier"] == "compiled"
    assert 30 < info["simulation"]["weights_gb"] < info["simulation"]["gpu_used_gb"] < 141


def test_a_cold_start_reads_the_weights_from_the_nodes_disk_then_copies_them_over_the_cards_link(cold_sleeps):
    generator = ImageGenerator.func_or_class(flux(), metrics=False)
    weights = memory.weight_bytes("flux-schnell", "bfloat16")
    card = profile("h200")
    cold = generator.info()["simulation"]["cold_start"]
    assert cold_sleeps == [pytest.approx(weights / (card.disk_read_gbs * 1e9) + weights / (card.host_to_device_gbs * 1e9))]
    assert cold["total_s"] == pytest.approx(cold_sleeps[0], abs=0.01) and cold["read_gb"] == round(weights / 1e9, 2)
    assert cold["disk_read_s"] > 5 * cold["host_to_device_s"], "the disk, not the PCIe link, is the slow part"
    # fp8 weights are quantized at load: the bf16 files are read, the card gets a byte per linear weight.
    fp8 = timing.cold_start(card, weights, memory.weight_bytes("flux-schnell", "bfloat16", "fp8_dynamic"))
    assert fp8.read_s == pytest.approx(cold["disk_read_s"], abs=0.01) and fp8.copy_s < cold["host_to_device_s"]


def test_an_entry_can_skip_its_simulated_cold_start(cold_sleeps):
    generator = ImageGenerator.func_or_class(flux(device={"device": "sim:h200", "simulated_cold_start": False}),
                                             metrics=False)
    assert cold_sleeps == [] and generator.info()["simulation"]["cold_start"] is None


def test_each_step_reports_and_a_stop_ends_the_call_at_the_step():
    generator = ImageGenerator.func_or_class(flux(), metrics=False)
    pipeline = generator._model.pipeline
    seen = []
    monitor = StepMonitor(None, 4)

    def callback(pipe, step, timestep, kwargs):
        seen.append(step)
        kwargs = monitor(pipe, step, timestep, kwargs)
        if step == 1:
            monitor.stop.set()  # cancelled while step 2 runs: it stops at that step's end
        return kwargs

    with pytest.raises(Interrupted, match="stopped after step 3 of 4"):
        pipeline(generator=[torch.Generator().manual_seed(1)], num_inference_steps=4, width=512, height=512,
                 callback_on_step_end=callback)
    assert seen == [0, 1, 2]
    assert pipeline.ledger.used() == memory.CUDA_CONTEXT_BYTES + memory.weight_bytes("flux-schnell", "bfloat16"), \
        "the call's activations were given back"


def test_weights_that_do_not_fit_the_card_fail_at_load_with_cudas_error():
    with pytest.raises(torch.OutOfMemoryError, match="simulated rtx-4070-12gb"):
        ImageGenerator.func_or_class(flux("sim:rtx-4070-12gb"), metrics=False)


def test_models_on_one_simulated_gpu_share_its_memory_and_a_call_over_it_is_out_of_memory():
    generator = ImageGenerator.func_or_class(flux("sim:h100-sxm"), metrics=False)
    ledger = generator._model.pipeline.ledger
    ledger.reserve("another-model:weights", ledger.capacity - ledger.used() - 2**20)  # 1 MiB left on the card
    params = GenerationParams(seeds=[1], width=512, height=512, num_inference_steps=1)
    with pytest.raises(ModelOutOfMemory, match="CUDA out of memory. Tried to allocate"):
        asyncio.run(generator.generate(params, PROMPT))
    ledger.release("another-model:weights")
    assert asyncio.run(generator.generate(params, PROMPT)).images.shape == (1, 512, 512, 3)


def test_quantized_weights_weigh_a_byte_per_linear_parameter():
    bf16 = memory.weight_bytes("flux-schnell", "bfloat16")
    fp8 = memory.weight_bytes("flux-schnell", "bfloat16", "fp8_dynamic")
    total, linear = flops.parameters("flux-schnell", "transformer")
    assert bf16 - fp8 == linear and 11.8e9 < total < 12.0e9


def test_fp8_on_a_card_without_fp8_tensor_cores_fails_as_on_the_real_card():
    from deployments.runtime.acceleration import AccelerationError

    with pytest.raises(AccelerationError, match="fp8 tensor cores"):
        ImageGenerator.func_or_class(flux("sim:rtx-3090", acceleration={"compile": "repeated_blocks",
                                                                        "quantization": "fp8_dynamic"}), metrics=False)


def test_a_shape_not_shipped_is_counted_once_then_read_from_the_cache(tmp_path, monkeypatch):
    counts = []
    monkeypatch.setattr(flops, "_count", lambda arch, component, shape: counts.append(shape) or 1e12)
    assert flops.flops("flux-schnell", "vae", width=640, height=640) == 1e12
    assert flops.flops("flux-schnell", "vae", width=640, height=640) == 1e12 and len(counts) == 1
    stored = json.loads((tmp_path / "flops.json").read_text())
    assert stored["flux-schnell"]["flops"]["vae/height=640/width=640"] == 1e12
    assert flops.flops("flux-schnell", "vae", width=512, height=512) > 2e12 and len(counts) == 1, "shipped"


def test_flops_are_counted_on_the_meta_device_from_the_published_config():
    """The CLIP-L text encoder (123M parameters): ~2 FLOPs a parameter a token, attention on top."""
    counted = flops._count("flux-schnell", "text_encoder", {"tokens": 8})
    total, _ = flops.parameters("flux-schnell", "text_encoder")
    assert 2 * 8 * (total - 49408 * 768) * 0.9 < counted < flops.flops("flux-schnell", "text_encoder", tokens=77)


def test_a_source_without_a_published_architecture_is_refused_naming_the_known():
    with pytest.raises(ValueError, match="black-forest-labs/FLUX.1-schnell"):
        ImageGenerator.func_or_class(flux(source="someone/else"), metrics=False)


def test_the_simulated_scorer_scores_in_range_from_clips_own_preprocessing():
    from deployments.scoring.clip_scorer import ClipScorer

    scorer = ClipScorer.func_or_class(ScorerConfig(source="openai/clip-vit-large-patch14", device={"device": "sim:h200"}),
                        metrics=False)
    images = np.random.default_rng(0).integers(0, 255, (2, 256, 256, 3), dtype=np.uint8)
    scores = asyncio.run(scorer.score(images, "a red cube"))
    assert len(scores) == 2 and 0 <= scores[0]["alignment"] <= 100 and 1 <= scores[0]["laion"] <= 10
    assert scores == asyncio.run(scorer.score(images, "a red cube")), "deterministic"
    assert scorer.info()["device"] == "sim:h200" and scorer.input_size == 224


def test_the_scorers_two_halves_resize_gives_clip_its_processors_pixels():
    from deployments.scoring.clip_scorer import ClipScorer

    scorer = ClipScorer.func_or_class(ScorerConfig(source="openai/clip-vit-large-patch14", device={"device": "sim:h200"}),
                                      metrics=False)
    tower = scorer._scorers[0].tower
    for height, width in ((1024, 1024), (768, 1344), (1344, 768), (1000, 600)):
        image = np.random.default_rng(height).integers(0, 255, (height, width, 3), dtype=np.uint8)
        resized = tower._resized(image)
        # 1000x600 has no whole-row split (373 output rows): the processor resizes it whole, as before.
        assert min(resized.shape[:2]) == (600 if height == 1000 else 224), resized.shape
        ours = tower.image_processor(images=[resized], return_tensors="pt").pixel_values
        theirs = tower.image_processor(images=[image], return_tensors="pt").pixel_values
        # To the bit when square; else a pixel may be one level of 255 off (over CLIP's std, < 0.016).
        assert ours.shape == theirs.shape and float((ours - theirs).abs().max()) <= (0 if height == width else 0.016)


def test_the_simulated_llm_answers_on_topic_within_its_budget_and_times_out_past_it():
    from deployments.enhancer.llm import LlmError, build_llm, enhance_messages

    config = LlmConfig(source="Qwen/Qwen2.5-1.5B-Instruct", device={"device": "sim:h200"})
    llm = build_llm(config, resolve_placement(config.device))
    messages = enhance_messages("a lighthouse at dusk", "photorealistic", None)
    assert llm.complete(messages) == "a lighthouse at dusk"
    with pytest.raises(LlmError, match="timeout"):
        llm.complete(messages, time_budget_s=llm.modelled_s(messages) / 2)


def test_the_enhancers_simulated_llm_calls_are_device_time_and_the_template_has_none():
    from deployments.config import EnhancerConfig
    from deployments.enhancer.prompt_enhancer import PromptEnhancer

    llm = {"source": "Qwen/Qwen2.5-1.5B-Instruct", "device": {"device": "sim:h200"}}
    enhancer = PromptEnhancer.func_or_class(EnhancerConfig(mode="llm", llm=llm), metrics=False)
    asyncio.run(enhancer.enhance("a lighthouse at dusk", "photorealistic"))
    used = asyncio.run(enhancer.device_time())
    assert used["calls"] == 1 and used["busy_s"] > 0 and used["model"] == "llm"
    template = PromptEnhancer.func_or_class(EnhancerConfig(mode="template"), metrics=False)
    assert asyncio.run(template.device_time()) is None


def test_the_sim_h200_config_loads_with_every_model_on_the_simulated_card():
    from serve_app.config import AppArgs

    document = yaml.safe_load(open("configs/sim-h200.yaml"))
    args = AppArgs.model_validate(document["applications"][0]["args"])
    entry = args.image_models[0]
    assert (entry.device.simulated, entry.default_width, entry.default_height) == ("h200", 1024, 1024)
    assert args.scorers[0].device.simulated == "h200" and args.enhancer.llm.device.simulated == "h200"


def test_the_calibration_table_in_the_docs_is_the_one_the_data_makes():
    from deployments.runtime.sim import table

    assert table.table() in table.DOC.read_text(), "stale: run python -m deployments.runtime.sim.table --write"


def test_a_simulated_video_model_animates_through_the_real_video_generator():
    from deployments.config import VideoModelConfig
    from deployments.runtime.types import VideoParams
    from deployments.video_generator import VideoGenerator

    config = VideoModelConfig(id="svd-xt", family="svd", source="stabilityai/stable-video-diffusion-img2vid-xt",
                              device={"device": "sim:h200"}, default_width=512, default_height=512,
                              default_num_frames=14, warmup={"default_shape": False})
    generator = VideoGenerator.func_or_class(config, metrics=False)
    params = VideoParams(seed=5, width=512, height=512, num_frames=14, fps=7, num_inference_steps=2,
                         output_format="mp4")
    modelled = timing.video_call("svd-xt", 512, 512, 14, 2, True, profile("h200"), "eager").total_s
    started = time.perf_counter()
    output = asyncio.run(generator.animate(params, np.full((512, 512, 3), 128, np.uint8)))
    assert time.perf_counter() - started >= modelled
    assert output.device == "sim:h200" and output.source_frames == 14 and output.content_type == "video/mp4"
    assert generator.info()["model_num_frames"] == 25 and generator.info()["simulation"]["architecture"] == "svd-xt"


def test_a_video_family_without_a_published_architecture_is_refused_when_the_config_loads():
    from deployments.config import VideoModelConfig
    from deployments.families import get_video_family

    config = VideoModelConfig(id="ltx-video", family="ltx", source="Lightricks/LTX-Video", device={"device": "sim:h200"})
    with pytest.raises(ValueError, match="stabilityai/stable-video-diffusion-img2vid-xt"):
        get_video_family("ltx").check_entry(config)


def test_the_docs_example_entry_is_a_valid_simulated_model():
    from deployments.families import get_family
    from deployments.runtime.sim import table

    text = table.DOC.read_text()
    block = text[text.index("```yaml\n") + len("```yaml\n"):text.index("```", text.index("```yaml\n") + 7)]
    entry = ImageModelConfig(**yaml.safe_load(block)["image_models"][0])
    get_family(entry.family).check_entry(entry)
    assert entry.device.simulated == "h200" and timing.tier_of(entry.acceleration) == "compiled+fp8"


def test_bench_gpu_puts_the_simulated_time_beside_the_measured_one_on_a_profiled_card():
    from deployments.sim_profiles import profile_of_device
    from serve_app.bench.gpu import Case, format_gpu_table, simulated_s

    card = profile_of_device("NVIDIA H100 80GB HBM3")
    assert card.key == "h100-sxm" and profile_of_device("NVIDIA B200") is None
    measured = Case("flux-schnell", "compiled", batch=1, steps=4, first_s=60.0, p50_s=0.5)
    table = format_gpu_table("cuda", [measured], card=card)
    expected = timing.image_call(timing.ImageShape("flux-schnell", 1024, 1024, 4), card, "compiled").total_s
    assert simulated_s(measured, card) == expected and f"{expected:.3f}" in table.splitlines()[-1]
    assert "simulated h100-sxm" in table


def test_a_simulated_model_offers_no_loras_so_a_request_naming_one_gets_a_422():
    from deployments.families import get_family

    assert not get_family("flux").capabilities_of(flux()).loras
    assert get_family("flux").capabilities_of(flux(device="cpu", source="tiny")).loras
