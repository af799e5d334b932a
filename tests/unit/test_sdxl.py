"""SDXL + ControlNet in process (no Ray): the generic ImageGenerator on tiny SDXL models, control request
validation, the control preprocessors and the ImageService planning around them."""

import asyncio
import base64
import io

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from deployments.config import ImageModelConfig
from deployments.families.sdxl import canny_map
from deployments.image_generator import ImageGenerator
from deployments.runtime.types import ControlInput, EnhancedPrompt, GenerationParams
from deployments.tiny import save_tiny
from serve_app.config import AppArgs, ImageModelEntry, QualityPolicy
from serve_app.protocol.errors import RequestError, allowed_values
from serve_app.protocol.schemas import ControlOptions, ControlPreviewRequest, ImageRequest
from serve_app.services.local import LocalHandle
from serve_app.services.media import read_png_meta
from serve_app.services.settings import job_slots, model_specs
from serve_app.services.validation import ModelSpec, control_catalogue
from tests.control_images import BOTTOM, LEFT, RIGHT, TOP, on_border, rectangle
from tests.fakes import fake_services
from tests.helpers import app_settings, image_b64, model_entry

PROMPT = EnhancedPrompt(prompt="a red house", negative_prompt="blurry", style="none", enhancer="none")
TINY_SDXL = ImageModelConfig(
    id="sdxl", family="sdxl", source="tiny", default_width=256, default_height=256, default_steps=2,
    options={"controlnets": {"canny": "tiny", "depth": "tiny"}, "depth_estimator": "tiny"},
    warmup={"default_shape": False},  # not under test here (tests/unit/test_acceleration.py covers it)
)


def sdxl_with(**options) -> ImageModelConfig:
    return TINY_SDXL.model_copy(update={"options": options})


@pytest.fixture(scope="module")
def sdxl() -> ImageGenerator:
    return ImageGenerator.func_or_class(TINY_SDXL, metrics=False)


def _service(sdxl_generator, max_input_pixels: int = 4096 * 4096, policy: QualityPolicy | None = None):
    settings = app_settings(model_entry(), TINY_SDXL.model_dump(exclude_unset=True), max_input_pixels=max_input_pixels,
                            policy=policy or QualityPolicy())
    return fake_services(settings, generators={"sdxl": sdxl_generator}).images


def _control(kind: str = "canny", **fields) -> dict:
    return {"type": kind, "image": image_b64(rectangle()), **fields}


# --- the request model -----------------------------------------------------------------------------

@pytest.mark.parametrize(
    "control, field",
    [
        (_control(conditioning_scale=2.5), ("control", "conditioning_scale")),
        (_control(conditioning_scale=-0.1), ("control", "conditioning_scale")),
        (_control(low_threshold=-1), ("control", "low_threshold")),
        (_control(high_threshold=256), ("control", "high_threshold")),
        (_control(low_threshold=150, high_threshold=150), ("control", "high_threshold")),
        (_control(low_threshold=220), ("control", "high_threshold")),  # above the default high (200)
        (_control("pose"), ("control", "type")),
        (_control(strength=1), ("control", "strength")),
        ({"type": "canny"}, ("control", "image")),
    ],
)
def test_bad_control_fields_are_refused_naming_the_field(control, field):
    with pytest.raises(ValidationError) as caught:
        ImageRequest(prompt="a house", model="sdxl", control=control)
    assert [tuple(error["loc"]) for error in caught.value.errors()] == [field]


def test_control_defaults_and_the_422_allowed_text_of_nested_fields():
    control = ControlOptions(type="depth", image="aGVsbG8=")
    assert (control.conditioning_scale, control.preprocess, control.low_threshold, control.high_threshold) == (
        0.5, True, 100, 200)
    assert allowed_values(ImageRequest, "control", "conditioning_scale") == "0-2"
    assert allowed_values(ImageRequest, "control", "type") == "one of 'canny', 'depth'"
    assert allowed_values(ImageRequest, "width") == "256-2048, a multiple of 16"


def test_catalogue_lists_each_type_with_the_request_models_defaults_and_ranges():
    catalogue = {entry["type"]: entry for entry in control_catalogue()}
    assert set(catalogue) == {"canny", "depth"}
    canny = {param["name"]: param for param in catalogue["canny"]["params"]}
    assert canny["low_threshold"] == {**canny["low_threshold"], "default": 100, "min": 0, "max": 255}
    assert canny["conditioning_scale"]["max"] == 2 and canny["preprocess"]["default"] is True
    assert {param["name"] for param in catalogue["depth"]["params"]} == {"conditioning_scale", "preprocess"}


# --- preprocessors ---------------------------------------------------------------------------------

def test_canny_edges_of_a_drawn_rectangle_lie_on_its_border():
    edges = canny_map(rectangle(), 100, 200)
    assert edges.shape == (256, 256, 3) and edges.dtype == np.uint8
    assert set(np.unique(edges)) == {0, 255}
    assert np.array_equal(edges[..., 0], edges[..., 2])  # one map, three identical channels
    precise, covered = on_border(edges[..., 0] > 0)
    assert precise == 1.0 and covered > 0.95, (precise, covered)


def test_canny_thresholds_decide_which_edges_survive():
    image = rectangle()
    image[TOP:BOTTOM + 1, LEFT:RIGHT + 1] = 20  # a faint rectangle: weak gradients
    assert canny_map(image, 10, 30).any()
    assert not canny_map(image, 200, 250).any()


def test_depth_map_is_a_full_range_grey_image_at_the_input_size(sdxl):
    control = asyncio.run(sdxl.preprocess(ControlInput("depth", rectangle(320, 256), 0.5)))
    assert control.preprocess is False and control.type == "depth"
    depth = control.image
    assert depth.shape == (256, 320, 3) and depth.dtype == np.uint8
    assert depth.min() == 0 and depth.max() == 255
    assert np.array_equal(depth[..., 0], depth[..., 1]) and np.array_equal(depth[..., 1], depth[..., 2])


def test_a_map_given_as_a_map_is_not_preprocessed_again(sdxl):
    given = ControlInput("canny", rectangle(), 0.5, preprocess=False)
    assert asyncio.run(sdxl.preprocess(given)) is given


# --- the deployment --------------------------------------------------------------------------------

def test_controlnet_pipelines_share_the_base_pipelines_components(sdxl):
    base = sdxl._model.pipeline
    assert set(sdxl._model.controlled) == {"canny", "depth"}
    for pipeline in sdxl._model.controlled.values():
        for name in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
            assert getattr(pipeline, name) is getattr(base, name), name
    assert sdxl._model.controlled["canny"].controlnet is not sdxl._model.controlled["depth"].controlnet
    # One UNet's parameters in the process: the ControlNet pipelines hold no copy.
    unets = {id(module) for pipeline in (base, *sdxl._model.controlled.values()) for module in [pipeline.unet]}
    assert len(unets) == 1


def _params(*seeds, control=None, guidance=5.0):
    return GenerationParams(seeds=list(seeds), width=256, height=256, num_inference_steps=2, guidance_scale=guidance,
                            control=control)


def test_control_steers_the_image_deterministically(sdxl):
    canny = ControlInput("canny", rectangle(), 1.0)
    plain = asyncio.run(sdxl.generate(_params(5), PROMPT)).images
    guided = asyncio.run(sdxl.generate(_params(5, control=canny), PROMPT)).images
    again = asyncio.run(sdxl.generate(_params(5, control=canny), PROMPT)).images
    shifted = np.roll(rectangle(), 40, axis=1)
    other = asyncio.run(sdxl.generate(_params(5, control=ControlInput("canny", shifted, 1.0)), PROMPT)).images
    weak = asyncio.run(sdxl.generate(_params(5, control=ControlInput("canny", rectangle(), 0.0)), PROMPT)).images
    assert guided.shape == (1, 256, 256, 3) and np.array_equal(guided, again)
    assert not np.array_equal(plain, guided) and not np.array_equal(guided, other)
    assert np.abs(weak.astype(int) - plain.astype(int)).max() <= 1  # scale 0: the ControlNet adds nothing


def test_negative_prompt_changes_the_image_under_guidance(sdxl):
    other = EnhancedPrompt(prompt=PROMPT.prompt, negative_prompt="green", style="none", enhancer="none")
    first = asyncio.run(sdxl.generate(_params(3), PROMPT)).images
    second = asyncio.run(sdxl.generate(_params(3), other)).images
    assert not np.array_equal(first, second)


def test_a_control_image_of_another_size_is_refused_by_the_generator(sdxl):
    with pytest.raises(ValueError, match="not the requested 256x256"):
        asyncio.run(sdxl.generate(_params(1, control=ControlInput("canny", rectangle(320, 256), 0.5)), PROMPT))


def test_saved_tiny_models_load_through_from_pretrained_and_match_the_in_memory_ones(sdxl, tmp_path):
    config = TINY_SDXL.model_copy(update={
        "source": str(save_tiny("sdxl", tmp_path / "sdxl")),
        "options": {"controlnets": {"canny": str(save_tiny("sdxl-controlnet", tmp_path / "canny"))},
                    "depth_estimator": str(save_tiny("depth", tmp_path / "depth"))},
    })
    loaded = ImageGenerator.func_or_class(config, metrics=False)
    assert set(loaded._model.controlled) == {"canny"} and loaded._model.depth is None  # no depth ControlNet
    canny = ControlInput("canny", rectangle(), 1.0)
    from_disk = asyncio.run(loaded.generate(_params(9, control=canny), PROMPT)).images
    in_memory = asyncio.run(sdxl.generate(_params(9, control=canny), PROMPT)).images
    assert np.array_equal(from_disk, in_memory)
    assert loaded.info()["controlnets"] == {"canny": config.options["controlnets"]["canny"]}


def test_saved_tiny_depth_estimator_loads_through_the_auto_classes(tmp_path):
    from deployments.families.sdxl import DepthEstimator
    from deployments.runtime.loading import resolve_placement

    estimator = DepthEstimator(str(save_tiny("depth", tmp_path / "depth")), resolve_placement(TINY_SDXL.device))
    assert type(estimator.model).__name__ == "DPTForDepthEstimation"
    depth = estimator.estimate(rectangle())
    assert depth.shape == (256, 256, 3) and depth.max() == 255


# --- planning and the service ----------------------------------------------------------------------

@pytest.mark.parametrize(
    "fields, field, words",
    [
        ({"model": "flux-schnell", "control": _control()}, "control", "flux-schnell has no ControlNet"),
        ({"control": {"type": "canny", "image": "not base64!"}}, "control.image", "not valid base64"),
        ({"control": {"type": "canny", "image": image_b64(rectangle(), "GIF")}}, "control.image", "format GIF"),
        ({"control": {"type": "canny", "image": base64.b64encode(b"GIF89a....").decode()}}, "control.image",
         "not a readable PNG or JPEG"),
        ({"num_inference_steps": 51}, "num_inference_steps", None),
    ],
)
def test_bad_control_input_is_refused_before_any_model_runs(sdxl, fields, field, words):
    request = {"prompt": "a house", "model": "sdxl", **fields}
    if field == "num_inference_steps":
        with pytest.raises(ValidationError):  # the schema's own bound (50) already refuses it
            ImageRequest.model_validate(request)
        return
    with pytest.raises(RequestError) as caught:
        _service(sdxl).plan(ImageRequest.model_validate(request))
    assert caught.value.field == field and words in caught.value.message


def test_reference_over_the_pixel_limit_is_refused_naming_control_image(sdxl):
    request = ImageRequest(prompt="a house", model="sdxl",
                           control={"type": "canny", "image": image_b64(rectangle(300, 300))})
    with pytest.raises(RequestError) as caught:
        _service(sdxl, max_input_pixels=256 * 256).plan(request)
    assert caught.value.field == "control.image" and "over the limit" in caught.value.message
    assert caught.value.detail()[0]["loc"] == ["body", "control", "image"]


def test_control_type_the_model_lacks_is_refused_naming_control_type(sdxl):
    spec = ModelSpec.of(sdxl_with(controlnets={"canny": "tiny"}))
    with pytest.raises(RequestError) as caught:
        spec.check(ImageRequest(prompt="a house", model="sdxl", control=_control("depth")))
    assert caught.value.field == "control.type" and "'canny'" in caught.value.allowed


def test_plan_fits_the_reference_to_the_output_size(sdxl):
    request = ImageRequest(prompt="a house", model="sdxl", width=320, height=256,
                           control={"type": "canny", "image": image_b64(rectangle(200, 400)),
                                    "conditioning_scale": 0.8})
    plan, spec, warnings = _service(sdxl).plan(request)
    assert plan.control.image.shape == (256, 320, 3) and plan.control.conditioning_scale == 0.8
    assert (plan.num_inference_steps, plan.guidance_scale, plan.use_negative_prompt) == (2, 5.0, True)
    assert spec.control_types == ("canny", "depth") and warnings == []


def test_negative_prompt_below_guidance_one_is_reported_unused(sdxl):
    _, _, warnings = _service(sdxl).plan(
        ImageRequest(prompt="a house", model="sdxl", negative_prompt="rain", guidance_scale=1.0))
    assert any("classifier-free guidance runs only above 1" in warning for warning in warnings)


class CountingPreprocess:
    """The real generator, counting preprocess calls and recording what each round received."""

    def __init__(self, generator):
        self._generator = generator
        self.preprocessed = 0
        self.rounds: list[ControlInput] = []

    async def preprocess(self, control):
        self.preprocessed += 1
        return await self._generator.preprocess(control)

    async def generate(self, params, prompt):
        self.rounds.append(params.control)
        return await self._generator.generate(params, prompt)


def test_every_regeneration_round_reuses_the_one_preprocessed_map(sdxl):
    counting = CountingPreprocess(sdxl)
    service = _service(sdxl, policy=QualityPolicy(metric="aesthetic", threshold=1.0, max_attempts=3))
    service.generators["sdxl"] = LocalHandle(counting)
    response = asyncio.run(service.generate_images(
        {"prompt": "a house", "model": "sdxl", "seed": 4, "control": _control("depth", conditioning_scale=0.7)}))
    assert len(response.attempts) == 3 and counting.preprocessed == 1
    assert [control.preprocess for control in counting.rounds] == [False] * 3
    assert all(control is counting.rounds[0] for control in counting.rounds)
    assert "preprocess" in response.timings
    meta = read_png_meta(base64.b64decode(response.images[0].b64_png))
    assert meta["control"] == {"type": "depth", "conditioning_scale": 0.7, "preprocess": True}


def test_preview_returns_the_canny_map_of_the_reference(sdxl):
    request = ControlPreviewRequest(type="canny", image=image_b64(rectangle()))
    response, png = asyncio.run(_service(sdxl).preview_control(request))
    assert (response.model, response.width, response.height, response.preprocessed) == ("sdxl", 256, 256, True)
    edges = np.asarray(Image.open(io.BytesIO(png)))
    assert np.array_equal(edges, canny_map(rectangle(), 100, 200))
    assert base64.b64decode(response.b64_png) == png


def test_preview_of_a_control_the_model_lacks_is_refused(sdxl):
    with pytest.raises(RequestError) as caught:
        asyncio.run(_service(sdxl).preview_control(ControlPreviewRequest(type="canny", image=image_b64(rectangle()),
                                                                         model="flux-schnell")))
    assert caught.value.field == "model"
    depth_only = _service(sdxl)
    depth_only.specs["sdxl"] = ModelSpec.of(sdxl_with(controlnets={"depth": "tiny"}))
    with pytest.raises(RequestError) as caught:
        asyncio.run(depth_only.preview_control(ControlPreviewRequest(type="canny", image=image_b64(rectangle()))))
    assert caught.value.field == "type" and caught.value.allowed == "one of 'depth'"


# --- config and wiring -----------------------------------------------------------------------------

def test_a_turbo_entry_narrows_the_family_to_four_steps_without_guidance_and_no_controlnet():
    turbo = ImageModelEntry(id="sdxl-turbo", family="sdxl", source="stabilityai/sdxl-turbo", default_steps=1,
                            limits={"max_steps": 4, "max_guidance": 0})
    family = turbo.model_family
    assert (family.steps_default(turbo), family.guidance_default(turbo), turbo.options) == (1, 0.0, {})
    with pytest.raises(ValidationError, match="default_steps"):
        ImageModelEntry(id="sdxl-turbo", family="sdxl", source="tiny", default_steps=5, limits={"max_steps": 4})
    with pytest.raises(ValidationError, match="limits"):
        ImageModelEntry(id="sdxl-turbo", family="sdxl", source="tiny", limits={"max_steps": 60})
    spec = ModelSpec.of(turbo)
    assert (spec.max_steps, spec.guidance_range, spec.uses_negative_prompt, spec.control_types) == (
        4, (0.0, 0.0), False, ())


def test_configured_sdxl_models_get_specs_and_image_job_slots():
    turbo = {"id": "sdxl-turbo", "family": "sdxl", "source": "tiny", "limits": {"max_steps": 4, "max_guidance": 0},
             "deployment": {"max_ongoing_requests": 1}}
    flux = {"id": "flux-schnell", "family": "flux", "source": "tiny", "deployment": {"max_ongoing_requests": 2}}
    args = AppArgs(image_models=[flux, {**TINY_SDXL.model_dump(), "deployment": {"num_replicas": 2}}, turbo])
    assert list(model_specs(args)) == ["flux-schnell", "sdxl", "sdxl-turbo"]
    assert job_slots(args)["image"] == 2 + 2 * 4 + 1
    assert list(model_specs(AppArgs())) == ["flux-schnell"]
    with pytest.raises(ValidationError, match="controlnets"):
        AppArgs(image_models=[{"id": "sdxl", "family": "sdxl", "source": "tiny", "options": {"controlnets": {"pose": "tiny"}}}])


def test_dev_profile_serves_tiny_sdxl_and_fits_a_two_core_machine():
    from pathlib import Path

    from serve_app.config import app_args_from_config

    args = app_args_from_config(Path(__file__).parents[2] / "configs" / "dev.yaml")
    sdxl = args.image_model("sdxl")
    assert sdxl.source == "tiny" and [entry.id for entry in args.image_models] == ["flux-schnell", "sdxl",
                                                                                       "flux2-klein"]
    assert sdxl.options == {"controlnets": {"canny": "tiny", "depth": "tiny"}, "depth_estimator": "tiny"}
    # `genserve serve configs/dev.yaml` starts Ray with the machine's cores: every replica must fit in 2.
    assert sum(options.num_cpus for options in args.all_deployment_options().values()) <= 2
