"""LoRA adapters: the registry's listing and name rules, the service's checks, and the manager on
the tiny FLUX pipeline in process (real peft adapters, real load_lora_weights)."""

import asyncio
import os

import numpy as np
import pytest
from pydantic import ValidationError
from safetensors.numpy import save_file

from deployments import lora_registry as lora_module
from deployments.config import ImageModelConfig, LoraConfig, LoraHubEntry
from deployments.families.sdxl import build_tiny_sdxl
from deployments.image_generator import ImageGenerator
from deployments.lora_registry import LoraNameError, LoraRegistry, detect_family
from deployments.runtime.lora import LoraManager, adapter_key
from deployments.runtime.types import EnhancedPrompt, GenerationParams, LoraRef
from serve_app.protocol.errors import RequestError
from serve_app.protocol.schemas import ImageRequest
from serve_app.services.images import ImageService
from serve_app.services.media import a1111_parameters, read_png_meta
from tests.fakes import fake_services
from tests.helpers import app_settings
from tests.loras import make_flux_lora, make_sdxl_lora

TRAVERSAL_NAMES = ["../x", "a/b", "a\\b", "..", "/etc/passwd", "x/../../y", "ok\x00"]
PROMPT = EnhancedPrompt(prompt="a lighthouse at dusk", negative_prompt=None, style="none", enhancer="none")

# No warm-up: not under test here (tests/unit/test_acceleration.py covers it).
TINY_FLUX = ImageModelConfig(id="flux-schnell", family="flux", source="tiny", limits={"max_steps": 4, "max_guidance": 0},
                             options={"max_sequence_length": 32}, warmup={"default_shape": False})


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    """flux_a, flux_b (FLUX), sdxl_a (SDXL), plus things that must never be listed."""
    folder = tmp_path_factory.mktemp("loras")
    make_flux_lora(folder, "flux_a", seed=1)
    make_flux_lora(folder, "flux_b", seed=2)
    make_sdxl_lora(folder, "sdxl_a")
    for name in ["model.bin", "model.ckpt", "model.pt", "notes.txt"]:
        (folder / name).write_bytes(b"not an adapter")
    (folder / "sub").mkdir()
    make_flux_lora(folder / "sub", "nested")
    (folder / "broken.safetensors").write_bytes(b"\x10\x00garbage")
    outside = tmp_path_factory.mktemp("outside")
    make_flux_lora(outside, "secret")
    os.symlink(outside / "secret.safetensors", folder / "escape.safetensors")
    os.symlink(folder / "flux_a.safetensors", folder / "alias.safetensors")  # inside: allowed
    return folder


def _tensor_file(path, keys, shape=(4, 32), metadata=None):
    save_file({key: np.zeros(shape, dtype=np.float32) for key in keys}, str(path), metadata=metadata)
    return path


# --- registry -----------------------------------------------------------------------------------


def test_registry_lists_safetensors_directly_inside_with_their_family(lora_dir):
    registry = LoraRegistry(lora_dir)
    listed = {entry.name: entry.family for entry in registry.entries()}
    assert listed == {"alias": "flux", "flux_a": "flux", "flux_b": "flux", "sdxl_a": "sdxl"}
    assert registry.names("flux") == ["alias", "flux_a", "flux_b"] and registry.names("sdxl") == ["sdxl_a"]
    entry = registry.resolve("flux_a")
    assert entry.location == str(lora_dir.resolve()) and entry.weight_name == "flux_a.safetensors"
    assert entry.ref(0.5) == LoraRef("flux_a", str(lora_dir.resolve()), "flux_a.safetensors", 0.5, True, entry.revision)


@pytest.mark.parametrize("name", ["model", "model.bin", "notes", "nested", "sub", "escape", "broken", "secret", "nope"])
def test_files_that_are_not_listed_cannot_be_named(lora_dir, name):
    with pytest.raises(LoraNameError, match="unknown LoRA") as caught:
        LoraRegistry(lora_dir).resolve(name)
    assert "'flux_a'" in caught.value.allowed


@pytest.mark.parametrize("name", TRAVERSAL_NAMES + [""])
def test_malformed_names_are_refused_without_touching_the_file_system(lora_dir, name, monkeypatch):
    registry = LoraRegistry(lora_dir)

    def no_file_access(*args, **kwargs):
        raise AssertionError(f"file system touched for {name!r}")

    for function in ["stat", "scandir"]:
        monkeypatch.setattr(lora_module.os, function, no_file_access)
    monkeypatch.setattr(lora_module, "detect_family", no_file_access)
    with pytest.raises(LoraNameError, match="LoRA name"):
        registry.resolve(name)


def test_unknown_name_reads_no_file(lora_dir, monkeypatch):
    registry = LoraRegistry(lora_dir)

    def no_read(*args, **kwargs):
        raise AssertionError("a file was read")

    monkeypatch.setattr(lora_module, "detect_family", no_read)
    with pytest.raises(LoraNameError, match="unknown LoRA 'flux_c'"):
        registry.resolve("flux_c")


def test_directory_changes_are_picked_up_and_a_missing_directory_is_empty(tmp_path):
    folder = tmp_path / "loras"
    registry = LoraRegistry(folder)
    assert registry.entries() == []
    make_flux_lora(folder, "late")
    assert registry.names() == ["late"]
    first = registry.resolve("late")
    os.replace(make_flux_lora(tmp_path / "staging", "late", seed=5), folder / "late.safetensors")
    replaced = registry.resolve("late")
    assert adapter_key(replaced.ref(1.0)) != adapter_key(first.ref(1.0))  # a generator reloads it
    (folder / "late.safetensors").unlink()
    assert registry.names() == []


def test_hub_entries_come_from_config_and_win_over_files(lora_dir):
    config = LoraConfig(
        dir=str(lora_dir),
        hub=[LoraHubEntry(name="flux_b", repo="org/flux-style", weight_name="style.safetensors", family="flux")],
    )
    registry = LoraRegistry.from_config(config)
    entry = registry.resolve("flux_b")
    assert (entry.origin, entry.location, entry.weight_name) == ("hub", "org/flux-style", "style.safetensors")
    assert entry.ref(1.0).local is False
    listed = registry.public({"flux": ["flux-schnell"]})
    assert {"name": "flux_b", "family": "flux", "origin": "hub", "repo": "org/flux-style",
            "weight_name": "style.safetensors", "models": ["flux-schnell"]} in listed["loras"]
    assert listed["families"]["flux"] == {"models": ["flux-schnell"], "loras": ["alias", "flux_a", "flux_b"]}
    assert listed["families"]["sdxl"] == {"models": [], "loras": ["sdxl_a"]}
    assert all("location" not in entry and str(lora_dir) not in str(entry) for entry in listed["loras"])


@pytest.mark.parametrize(
    "keys, shape, metadata, family",
    [
        (["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"], (4, 32), None, "flux"),
        (["diffusion_model.single_blocks.0.linear1.lora_A.weight"], (4, 32), None, "flux"),
        (["lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"], (4, 32), None, "sdxl"),
        (["text_encoder_2.text_model.encoder.layers.0.mlp.fc1.lora_A.weight"], (4, 32), None, "sdxl"),
        (["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight"], (4, 2048), None, "sdxl"),
        (["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight"], (4, 768), None, "sd15"),
        (["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"], (4, 32), None, "sd15"),
        (["lora_unet_x.lora_down.weight"], (4, 32), {"ss_base_model_version": "flux1"}, "flux"),
        (["lora_unet_x.lora_down.weight"], (4, 32), {"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}, "sdxl"),
        (["lora_unet_x.lora_down.weight"], (4, 32), {"ss_base_model_version": "sd_v1"}, "sd15"),
        (["something.else"], (4, 32), None, "unknown"),
    ],
)
def test_family_detection_from_header(tmp_path, keys, shape, metadata, family):
    assert detect_family(_tensor_file(tmp_path / "x.safetensors", keys, shape, metadata)) == family


def test_config_refuses_unsafe_hub_entries_and_a_small_cache():
    for bad in [{"name": "../x"}, {"weight_name": "x.bin"}, {"weight_name": "../x.safetensors"}, {"repo": "../x"}]:
        entry = {"name": "x", "repo": "org/x", "weight_name": "x.safetensors", "family": "flux", **bad}
        with pytest.raises(ValidationError):
            LoraConfig(hub=[entry])
    with pytest.raises(ValidationError, match="cache_size"):
        LoraConfig(max_per_request=4, cache_size=2)


# --- the service's checks -----------------------------------------------------------------------


def _service(lora_dir, max_per_request: int = 2) -> ImageService:
    return fake_services(app_settings(loras={"dir": str(lora_dir), "max_per_request": max_per_request})).images


def test_plan_resolves_requested_loras(lora_dir):
    plan, _, _ = _service(lora_dir).plan(
        ImageRequest(prompt="a fox", loras=[{"name": "flux_a", "scale": 0.7}, {"name": "flux_b"}])
    )
    assert [(ref.name, ref.scale, ref.weight_name) for ref in plan.loras] == [
        ("flux_a", 0.7, "flux_a.safetensors"), ("flux_b", 1.0, "flux_b.safetensors")
    ]


@pytest.mark.parametrize(
    "loras, field, words",
    [
        ([{"name": "nope"}], "loras.0.name", "unknown LoRA 'nope'"),
        ([{"name": "flux_a"}, {"name": "model"}], "loras.1.name", "unknown LoRA 'model'"),
        ([{"name": "sdxl_a"}], "loras.0.name", "is for sdxl models; flux-schnell takes flux LoRAs"),
        ([{"name": "flux_a"}, {"name": "flux_a"}], "loras.1.name", "named twice"),
        ([{"name": "flux_a"}, {"name": "flux_b"}, {"name": "alias"}], "loras", "at most 2 LoRAs"),
    ],
)
def test_bad_loras_name_the_field(lora_dir, loras, field, words):
    with pytest.raises(RequestError) as caught:
        _service(lora_dir).plan(ImageRequest(prompt="a fox", loras=loras))
    assert caught.value.field == field and words in caught.value.message
    assert caught.value.detail()[0]["loc"] == ["body", *(int(part) if part.isdigit() else part for part in field.split("."))]


@pytest.mark.parametrize("name", TRAVERSAL_NAMES)
def test_path_names_fail_schema_validation(name):
    with pytest.raises(ValidationError) as caught:
        ImageRequest(prompt="a fox", loras=[{"name": name}])
    assert caught.value.errors()[0]["loc"] == ("loras", 0, "name")


@pytest.mark.parametrize("scale", [-2.5, 2.5])
def test_scale_out_of_range_fails_schema_validation(scale):
    with pytest.raises(ValidationError) as caught:
        ImageRequest(prompt="a fox", loras=[{"name": "flux_a", "scale": scale}])
    assert caught.value.errors()[0]["loc"] == ("loras", 0, "scale")


def test_model_without_lora_support_refuses_them(lora_dir):
    service = _service(lora_dir)
    spec = service.specs["flux-schnell"]
    service.specs["flux-schnell"] = type(spec)(**{**spec.public(), "supports_loras": False})
    with pytest.raises(RequestError) as caught:
        service.plan(ImageRequest(prompt="a fox", loras=[{"name": "flux_a"}]))
    assert caught.value.field == "loras"


def test_response_and_png_name_the_loras(lora_dir):
    request = ImageRequest(prompt="a fox", seed=3, loras=[{"name": "flux_a", "scale": 0.5}])
    response = asyncio.run(_service(lora_dir).generate_images(request))
    assert [lora.model_dump() for lora in response.loras] == [{"name": "flux_a", "scale": 0.5}]
    import base64

    meta = read_png_meta(base64.b64decode(response.images[0].b64_png))
    assert meta["loras"] == [{"name": "flux_a", "scale": 0.5}]
    assert a1111_parameters(meta).splitlines()[0] == "a fox, enhanced <lora:flux_a:0.5>"


# --- the manager on the tiny FLUX pipeline ------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_flux():
    return ImageGenerator.func_or_class(TINY_FLUX, lora_cache_size=2)


def _image(generator, *refs: LoraRef) -> np.ndarray:
    params = GenerationParams(seeds=[11], width=64, height=64, num_inference_steps=2, loras=tuple(refs))
    return asyncio.run(generator.generate(params, PROMPT)).images[0]


def _ref(lora_dir, name: str, scale: float = 1.0) -> LoraRef:
    return LoraRegistry(lora_dir).resolve(name).ref(scale)


def test_lora_changes_the_image_and_does_not_leak_into_the_next_call(tiny_flux, lora_dir):
    baseline = _image(tiny_flux)
    styled = _image(tiny_flux, _ref(lora_dir, "flux_a"))
    assert np.abs(styled.astype(int) - baseline.astype(int)).mean() > 2
    assert np.array_equal(_image(tiny_flux), baseline)
    assert np.array_equal(_image(tiny_flux, _ref(lora_dir, "flux_a")), styled)  # cached, same effect
    assert np.array_equal(_image(tiny_flux), baseline)


def test_scales_and_combinations(tiny_flux, lora_dir):
    baseline = _image(tiny_flux)
    a = _image(tiny_flux, _ref(lora_dir, "flux_a"))
    b = _image(tiny_flux, _ref(lora_dir, "flux_b"))
    both = _image(tiny_flux, _ref(lora_dir, "flux_a"), _ref(lora_dir, "flux_b"))
    assert not np.array_equal(a, b) and not np.array_equal(both, a) and not np.array_equal(both, b)
    assert np.array_equal(_image(tiny_flux, _ref(lora_dir, "flux_a", 0.0)), baseline)
    assert np.array_equal(_image(tiny_flux, _ref(lora_dir, "flux_a", 0.0), _ref(lora_dir, "flux_b")), b)
    half = _image(tiny_flux, _ref(lora_dir, "flux_a", 0.5))
    assert not np.array_equal(half, a) and not np.array_equal(half, baseline)
    assert np.array_equal(_image(tiny_flux), baseline)


def test_cache_evicts_least_recently_used_and_reloads_it(tiny_flux, lora_dir):
    a = _image(tiny_flux, _ref(lora_dir, "flux_a"))
    _image(tiny_flux, _ref(lora_dir, "flux_b"))
    alias = _image(tiny_flux, _ref(lora_dir, "alias"))  # the same file under another name: cache of 2 is full
    assert tiny_flux.info()["loras_loaded"] == ["flux_b", "alias"]
    adapters = tiny_flux._model.pipeline.get_list_adapters()["transformer"]
    assert len(adapters) == 2 and adapter_key(_ref(lora_dir, "flux_a")) not in adapters
    assert np.array_equal(alias, a)
    assert np.array_equal(_image(tiny_flux, _ref(lora_dir, "flux_a")), a)  # loaded again
    assert tiny_flux.info()["loras_loaded"] == ["alias", "flux_a"]


def test_manager_refuses_other_files_before_loading(lora_dir, tmp_path):
    class NoLoading:
        def load_lora_weights(self, *args, **kwargs):
            raise AssertionError("load_lora_weights called")

    manager = LoraManager(NoLoading(), cache_size=2)
    (tmp_path / "x.bin").write_bytes(b"pickle")
    with pytest.raises(ValueError, match="only .safetensors"):
        manager.apply([LoraRef("x", str(tmp_path), "x.bin")])
    with pytest.raises(ValueError, match="no longer a file directly inside"):
        manager.apply([LoraRef("escape", str(lora_dir), "escape.safetensors")])
    with pytest.raises(ValueError, match="no longer a file directly inside"):
        manager.apply([LoraRef("nested", str(lora_dir), "sub/nested.safetensors")])


def test_manager_is_generic_over_lora_pipelines(lora_dir):
    """The same manager on a StableDiffusionXLPipeline (UNet + two text encoders)."""
    import torch

    pipeline = build_tiny_sdxl()
    manager = LoraManager(pipeline, cache_size=2)

    def image(*refs):
        manager.apply(refs)
        with torch.inference_mode():
            return pipeline(prompt="a fox", width=64, height=64, num_inference_steps=2, output_type="np",
                            generator=torch.Generator().manual_seed(3)).images[0]

    baseline = image()
    styled = image(_ref(lora_dir, "sdxl_a"))
    assert np.abs(styled - baseline).max() > 1e-3
    assert np.array_equal(image(), baseline)
    assert np.array_equal(image(_ref(lora_dir, "sdxl_a")), styled)


def test_hub_refs_take_the_hub_loading_path_with_safetensors_only():
    class Recorder:
        calls = []

        def load_lora_weights(self, *args, **kwargs):
            self.calls.append((args, kwargs))
            raise OSError("offline")

        def get_list_adapters(self):
            return {}

    config = LoraConfig(hub=[LoraHubEntry(name="pixel", repo="org/pixel-xl", weight_name="pixel.safetensors", family="sdxl")])
    ref = LoraRegistry.from_config(config).resolve("pixel").ref(0.8)
    manager = LoraManager(Recorder(), cache_size=1)
    with pytest.raises(OSError, match="offline"):
        manager.apply([ref])
    [(args, kwargs)] = Recorder.calls
    assert args == ("org/pixel-xl",)
    assert kwargs == {"weight_name": "pixel.safetensors", "adapter_name": adapter_key(ref), "use_safetensors": True,
                      "local_files_only": False}
    assert manager.loaded() == []


def test_a_failed_load_leaves_the_pipeline_as_it_was(tiny_flux, tmp_path):
    baseline = _image(tiny_flux)
    (tmp_path / "torn.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    with pytest.raises(Exception):  # noqa: B017 - safetensors, peft or diffusers may be the one to refuse it
        _image(tiny_flux, LoraRef("torn", str(tmp_path), "torn.safetensors"))
    assert "torn" not in tiny_flux.info()["loras_loaded"]
    assert np.array_equal(_image(tiny_flux), baseline)
