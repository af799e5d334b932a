"""Image-to-image, inpainting and the hires pass in process (no Ray): request checks, planning,
metadata, component sharing, and the generic ImageGenerator on tiny models."""

import asyncio
import base64
import dataclasses
import io

import numpy as np
import pytest
from PIL import Image

from deployments.config import ImageModelConfig
from deployments.families import get_family
from deployments.image_generator import ImageGenerator, paste_unmasked
from deployments.runtime.loading import Placement
from deployments.runtime.types import EditInput, EnhancedPrompt, GenerationParams, HiresPass, denoising_steps
from serve_app.protocol.errors import RequestError
from serve_app.protocol.schemas import ImageRequest
from serve_app.services.media import read_png_meta
from serve_app.services.validation import ModelSpec
from tests.fakes import FakeGenerator, fake_services
from tests.helpers import app_settings, image_b64, model_spec

PROMPT = EnhancedPrompt(prompt="a red house", negative_prompt=None, style="none", enhancer="none")
CPU = Placement(device="cpu", dtype_name="float32")


def gradient(width: int = 256, height: int = 256) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width]
    return np.stack([xx * 255 // max(width - 1, 1), yy * 255 // max(height - 1, 1), 255 - xx * 255 // max(width - 1, 1)],
                    -1).astype(np.uint8)


def square_mask(width: int = 256, height: int = 256) -> np.ndarray:
    mask = np.zeros((height, width, 3), np.uint8)
    mask[height // 4: 3 * height // 4, width // 4: 3 * width // 4] = 255
    return mask


def _service(*specs: ModelSpec, max_input_pixels: int = 4096 * 4096):
    specs = specs or (model_spec(),)
    # Specs as given (one with a family's flag changed) and pixel limits below AppArgs' floor: what
    # no config gives, so they replace the config's.
    settings = dataclasses.replace(app_settings(), specs={spec.id: spec for spec in specs}, default_model=specs[0].id,
                                   max_input_pixels=max_input_pixels)
    return fake_services(settings).images


INIT = image_b64(gradient())
MASK = image_b64(square_mask())


# --- request checks: 422 naming the field, before anything runs ---------------------------------------

@pytest.mark.parametrize(
    "fields, field, words",
    [
        ({"strength": 0.5}, "strength", "only with init_image"),
        ({"mask": MASK}, "mask", "only with init_image"),
        ({"init_image": INIT, "mask_blur": 8}, "mask_blur", "only with mask"),
        ({"init_image": INIT, "preserve_unmasked": False}, "preserve_unmasked", "only with mask"),
        # flux-schnell's 4 steps x 0.2 is 0.8 of a step: nothing would run.
        ({"init_image": INIT, "strength": 0.2}, "strength", "num_inference_steps 4 leaves no denoising step"),
        ({"init_image": INIT, "strength": 0.5, "num_inference_steps": 1}, "strength", "num_inference_steps 1"),
        ({"hires": {"scale": 2}, "width": 1040}, "hires.scale", "over 2048 pixels a side"),
        ({"hires": {"steps": 9}}, "hires.steps", "1-4 steps; got 9"),
        ({"hires": {"strength": 0.1}}, "hires.strength", "hires.steps 4 leaves no denoising step"),
        ({"hires": {}, "init_image": INIT, "mask": MASK}, "hires", "does not combine with mask"),
        ({"init_image": "not base64!"}, "init_image", "not valid base64"),
        ({"init_image": base64.b64encode(b"GIF89a....").decode()}, "init_image", "not a readable PNG or JPEG"),
        ({"init_image": INIT, "mask": image_b64(square_mask(128, 128))}, "mask",
         "is 128x128 but init_image is 256x256"),
    ],
)
def test_edit_checks_name_the_field(fields, field, words):
    with pytest.raises(RequestError) as caught:
        _service().plan(ImageRequest(prompt="a fox", **fields))
    assert caught.value.field == field and words in caught.value.message, caught.value
    assert caught.value.detail()[0]["loc"] == ["body", *[int(p) if p.isdigit() else p for p in field.split(".")]]


def test_strength_times_steps_names_both_fields_and_the_least_strength():
    with pytest.raises(RequestError) as caught:
        _service().plan(ImageRequest(prompt="a fox", init_image=INIT, strength=0.2))
    assert "strength" in caught.value.message and "num_inference_steps" in caught.value.message
    assert caught.value.allowed.startswith("at least 0.25 with 4 steps")


def test_uploads_over_the_pixel_limit_are_refused_before_decoding():
    with pytest.raises(RequestError) as caught:
        _service(max_input_pixels=100 * 100).plan(ImageRequest(prompt="a fox", init_image=INIT))
    assert caught.value.field == "init_image" and "over the limit" in caught.value.message
    small = image_b64(gradient(100, 100))
    with pytest.raises(RequestError) as caught:
        _service(max_input_pixels=100 * 100).plan(ImageRequest(prompt="a fox", init_image=small, mask=MASK))
    assert caught.value.field == "mask" and "over the limit" in caught.value.message


def test_a_family_without_edit_pipelines_refuses_init_image_mask_and_hires():
    toy = ModelSpec.of(ImageModelConfig(id="toy", family="tests.toy_family:FAMILY", source="tiny"))
    assert not toy.supports_img2img and not toy.supports_inpainting
    for fields, field in (({"init_image": INIT}, "init_image"), ({"hires": {}}, "hires")):
        with pytest.raises(RequestError) as caught:
            _service(toy).plan(ImageRequest(prompt="a fox", model="toy", **fields))
        assert caught.value.field == field


def test_control_with_init_image_needs_a_family_that_combines_them():
    sdxl = model_spec("sdxl", "sdxl", options={"controlnets": {"canny": "tiny"}})
    assert sdxl.control_edits and sdxl.supports_inpainting
    control = {"type": "canny", "image": INIT, "preprocess": False}
    plan, _, _ = _service(sdxl).plan(ImageRequest(prompt="a fox", model="sdxl", init_image=INIT, control=control))
    assert plan.control is not None and plan.edit is not None
    without = dataclasses.replace(sdxl, control_edits=False)
    with pytest.raises(RequestError) as caught:
        _service(without).plan(ImageRequest(prompt="a fox", model="sdxl", init_image=INIT, control=control))
    assert caught.value.field == "init_image" and "control" in caught.value.message


def test_the_models_list_says_which_models_edit():
    spec = model_spec().public()
    assert (spec["supports_img2img"], spec["supports_inpainting"]) == (True, True)
    assert get_family("sd15").capabilities(get_family("sd15").Options())["inpainting"] is True


# --- planning ---------------------------------------------------------------------------------------

def test_init_image_and_mask_are_fitted_alike_and_the_mask_thresholded():
    wide = gradient(512, 256)
    mask = np.zeros((256, 512, 3), np.uint8)
    mask[:, 256:] = 200  # the right half, grey above 128: repainted
    request = ImageRequest(prompt="a fox", init_image=image_b64(wide), mask=image_b64(mask), width=256, height=256)
    plan, _, _ = _service().plan(request)
    edit = plan.edit
    assert edit.image.shape == (256, 256, 3) and edit.mask.shape == (256, 256)
    assert set(np.unique(edit.mask)) == {0, 255}
    # Centre crop of a 512-wide image to 256: columns 128-383, so the mask flips at column 128.
    assert (edit.mask[:, :127] == 0).all() and (edit.mask[:, 129:] == 255).all()
    assert np.abs(edit.image.astype(int) - wide[:, 128:384].astype(int)).max() <= 2
    assert (edit.strength, edit.mask_blur, edit.preserve_unmasked, plan.mode) == (0.75, 4, True, "inpainting")


def test_webp_and_jpeg_uploads_are_accepted():
    for fmt in ("WEBP", "JPEG"):
        plan, _, _ = _service().plan(ImageRequest(prompt="a fox", init_image=image_b64(gradient(), fmt)))
        assert plan.edit.image.shape == (256, 256, 3) and plan.mode == "image-to-image"


def test_hires_size_is_the_scaled_size_rounded_to_16():
    plan, _, _ = _service().plan(ImageRequest(prompt="a fox", width=272, height=256, hires={"scale": 1.25}))
    assert plan.hires == HiresPass(width=336, height=320, steps=4, strength=0.5)
    assert plan.output_size == (336, 320) and (plan.width, plan.height) == (272, 256)


def test_response_and_png_metadata_reproduce_an_edit():
    request = {"prompt": "a fox", "seed": 7, "init_image": INIT, "mask": MASK, "strength": 0.5, "mask_blur": 2}
    response = asyncio.run(_service().generate_images(request))
    assert (response.mode, response.strength, response.hires) == ("inpainting", 0.5, None)
    meta = read_png_meta(base64.b64decode(response.images[0].b64_png))
    import hashlib

    assert meta["init_image_sha256"] == hashlib.sha256(base64.b64decode(INIT)).hexdigest()
    assert meta["mask_sha256"] == hashlib.sha256(base64.b64decode(MASK)).hexdigest()
    assert (meta["mode"], meta["strength"], meta["mask_blur"], meta["preserve_unmasked"]) == ("inpainting", 0.5, 2, True)
    with Image.open(io.BytesIO(base64.b64decode(response.images[0].b64_png))) as image:
        assert "Denoising strength: 0.5, Mask blur: 2" in image.text["parameters"]


def test_hires_response_reports_both_sizes_and_the_generator_gets_the_pass():
    generator = FakeGenerator()
    service = fake_services(generator=generator).images
    response = asyncio.run(service.generate_images({"prompt": "a fox", "seed": 1, "hires": {"strength": 0.5}}))
    params, _ = generator.calls[0]
    assert params.hires == HiresPass(width=512, height=512, steps=4, strength=0.5)
    assert (response.width, response.height, response.mode) == (512, 512, "text-to-image")
    assert response.hires.model_dump() == {"scale": 2.0, "strength": 0.5, "steps": 4, "first_width": 256,
                                           "first_height": 256}
    meta = read_png_meta(base64.b64decode(response.images[0].b64_png))
    assert (meta["width"], meta["hires"]["first_width"]) == (512, 256)


# --- the generator side -----------------------------------------------------------------------------

def test_denoising_steps_follow_diffusers_and_progress_counts_both_passes():
    assert [denoising_steps(4, s) for s in (0.2, 0.25, 0.75, 1.0)] == [0, 1, 3, 4]
    edit = EditInput(image=np.zeros((16, 16, 3), np.uint8), strength=0.5)
    params = GenerationParams(seeds=[1], width=16, height=16, num_inference_steps=10, edit=edit,
                              hires=HiresPass(width=32, height=32, steps=4, strength=0.5))
    assert params.total_steps() == 5 + 2


def test_paste_back_keeps_every_pixel_where_the_mask_is_black():
    rng = np.random.default_rng(0)
    source = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    generated = rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    mask = np.zeros((8, 8), np.uint8)
    mask[2:6, 2:6] = 255
    out = paste_unmasked(generated, EditInput(image=source, strength=1.0, mask=mask))
    assert (out[:, mask == 0] == source[mask == 0]).all() and (out[:, mask == 255] == generated[:, mask == 255]).all()


@pytest.mark.parametrize(
    "family, entry, denoiser",
    [
        ("flux", {}, "transformer"),
        ("sdxl", {"options": {"controlnets": {"canny": "tiny"}}}, "unet"),
        ("sd15", {}, "unet"),
    ],
)
def test_edit_pipelines_share_the_base_pipelines_modules(family, entry, denoiser):
    config = ImageModelConfig(id=family, family=family, source="tiny", **entry)
    model = get_family(family).load(config, CPU)
    pipelines = list(model.edit_pipelines.values()) + list(getattr(model, "controlled_edits", {}).values())
    assert set(model.edit_pipelines) == {"image-to-image", "inpainting"}
    assert len(pipelines) == (4 if family == "sdxl" else 2)
    for pipeline in pipelines:
        assert getattr(pipeline, denoiser) is getattr(model.pipeline, denoiser)
        assert pipeline.vae is model.pipeline.vae and pipeline.text_encoder is model.pipeline.text_encoder
    for pipeline in getattr(model, "controlled_edits", {}).values():
        assert pipeline.controlnet is model.controlled["canny"].controlnet


@pytest.fixture(scope="module")
def sd15() -> ImageGenerator:
    # No warm-up: it would run the family's default 512x512 (these tests use 64x64).
    config = ImageModelConfig(id="sd15", family="sd15", source="tiny", warmup={"default_shape": False},
                              device={"device": "cpu", "torch_threads": 1})
    return ImageGenerator.func_or_class(config, metrics=False)


def _generate(generator: ImageGenerator, seeds_two: bool = False, **fields):
    params = GenerationParams(seeds=[3, 4] if seeds_two else [3], width=64, height=64, num_inference_steps=4, **fields)
    return asyncio.run(generator.generate(params, PROMPT))


def test_inpainting_keeps_unmasked_pixels_and_is_seeded(sd15):
    source = gradient(64, 64)
    mask = square_mask(64, 64)[:, :, 0]
    edit = EditInput(image=source, strength=1.0, mask=mask, mask_blur=4)
    first, again = _generate(sd15, edit=edit), _generate(sd15, edit=edit)
    assert np.array_equal(first.images, again.images)
    image = first.images[0]
    assert (image[mask == 0] == source[mask == 0]).all()
    assert not (image[mask == 255] == source[mask == 255]).all()
    # Without the paste-back the VAE round trip changes the unmasked pixels too.
    loose = _generate(sd15, edit=dataclasses.replace(edit, preserve_unmasked=False)).images[0]
    assert not (loose[mask == 0] == source[mask == 0]).all()


def test_hires_doubles_the_size_and_times_both_passes(sd15):
    output = _generate(sd15, hires=HiresPass(width=128, height=128, steps=4, strength=0.5))
    assert output.images.shape == (1, 128, 128, 3)
    assert set(output.timings) == {"first_pass", "hires"}


def test_an_init_image_of_the_wrong_size_never_reaches_the_pipeline(sd15):
    with pytest.raises(ValueError, match="init image is 32x32"):
        _generate(sd15, edit=EditInput(image=gradient(32, 32), strength=0.5))


def test_sdxl_controlnet_guides_inpainting_and_both_hires_passes():
    from deployments.runtime.types import ControlInput

    # No warm-up: it would run the family's default 1024x1024 (this test uses 64x64).
    config = ImageModelConfig(id="sdxl", family="sdxl", source="tiny", options={"controlnets": {"canny": "tiny"}},
                              warmup={"default_shape": False}, device={"device": "cpu", "torch_threads": 1})
    sdxl = ImageGenerator.func_or_class(config, metrics=False)
    control = ControlInput(type="canny", image=gradient(64, 64), conditioning_scale=0.5, preprocess=False)
    source, mask = gradient(64, 64), square_mask(64, 64)[:, :, 0]
    inpainted = _generate(sdxl, seeds_two=True, guidance_scale=2, control=control,
                          edit=EditInput(image=source, strength=1.0, mask=mask))
    assert inpainted.images.shape == (2, 64, 64, 3) and (inpainted.images[:, mask == 0] == source[mask == 0]).all()
    hires = _generate(sdxl, seeds_two=True, control=control, hires=HiresPass(width=96, height=128, steps=4, strength=0.5))
    assert hires.images.shape == (2, 128, 96, 3)
