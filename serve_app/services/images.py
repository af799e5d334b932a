"""The image service: request -> plan -> graph -> response.

The Serve ingress delegates here with real handles; the benchmark and unit tests use the same class
with `LocalHandle`s, so the in-process baseline runs exactly the code the service runs.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import functools
import logging
import time
import uuid

import numpy as np

from deployments.enhancer.prompt_rules import validate_prompt
from deployments.runtime.loading import NOISE_GENERATOR
from deployments.runtime.previews import small_png_data_url
from deployments.runtime.types import ControlInput, EditInput, EnhancedPrompt, ProgressTarget
from serve_app.protocol.schemas import (
    DEFAULT_STRENGTH,
    Attempt,
    CandidateInfo,
    ControlOptions,
    ControlPreviewRequest,
    ControlPreviewResponse,
    EnhanceRequest,
    EnhanceResponse,
    GeneratedImage,
    HiresInfo,
    ImageRequest,
    ImageResponse,
    Lora,
    PromptAdviceInfo,
    Scores,
    random_seed,
)
from serve_app.services.admission import Admission
from serve_app.services.graph import (
    Candidate,
    GraphResult,
    ImagePlan,
    OnGenerated,
    call_stage,
    run_image_graph,
    turn_first,
)
from serve_app.services.inputs import decode_image, fit_image, fit_mask, upload_sha256
from serve_app.services.media import encode_image_b64, encode_plain_png, encoding_of
from serve_app.services.metrics import GateMetrics
from serve_app.services.quality import MemoryQualityBook, QualityBook, tally_of
from serve_app.services.settings import Handles, Settings
from serve_app.services.validation import (
    ModelSpec,
    check_blocklist,
    check_image,
    check_mask_size,
    control_catalogue,
    dropped_terms,
    spec_of,
)

logger = logging.getLogger(__name__)


class ImageService:
    def __init__(self, settings: Settings, handles: Handles):
        """Built by `Services.build` (services/facade.py), from the config's settings and the deployments."""
        missing = set(handles.generators) ^ set(settings.specs)
        if missing:
            raise ValueError(f"generators and model specs must name the same models; mismatch: {sorted(missing)}")
        self.enhancer = handles.enhancer
        self.generators = handles.generators
        self.scorer = handles.scorer
        self.specs = settings.specs
        self.policy = settings.policy
        self.request_timeout_s = settings.request_timeout_s
        self.loras = settings.loras
        self.blocklist = settings.blocklist
        # The gate scores the deployed scorer computes (`AppArgs.gate_metrics()`).
        self.gate_metrics = settings.gate_metrics
        self.max_input_pixels = settings.max_input_pixels
        # The model a request gets when it names none: the config's default_model, else the first entry.
        self.default_model = settings.default_model
        # What the gate has seen (calibration, pass rates): this process's until the ingress or the
        # JobRunner puts the job store's in its place (serve_app.jobs.quality).
        self.quality: QualityBook = MemoryQualityBook(settings.calibration)
        # The gate's Prometheus metrics (services/metrics.py), set by Services.build when metrics are on.
        self.gate_metrics_recorder: GateMetrics | None = None
        self.admission = Admission(settings.admission)

    def spec_of(self, model: str | None) -> ModelSpec:
        """The spec of the model a request names, the default when it names none (422 otherwise)."""
        return spec_of(self.specs, model, self.default_model)

    def control_input(self, control: ControlOptions, width: int, height: int, field: str = "control.image") -> ControlInput:
        """Decode the reference image (pixel limit checked before decoding; 422 naming `field`) and fit
        it to the output size: the map, or the picture the generator makes the map from."""
        image = fit_image(decode_image(control.image, field, self.max_input_pixels), width, height)
        return ControlInput(
            type=control.type, image=image, conditioning_scale=control.conditioning_scale,
            preprocess=control.preprocess, low_threshold=control.low_threshold, high_threshold=control.high_threshold,
        )

    def edit_input(self, request: ImageRequest, width: int, height: int) -> tuple[EditInput, dict[str, str]]:
        """Decode `init_image` and `mask` (pixel limit before decoding; 422 naming the field), fit both
        to the output size alike, and hash the uploads for the images' metadata."""
        image = decode_image(request.init_image, "init_image", self.max_input_pixels)
        hashes = {"init_image_sha256": upload_sha256(request.init_image, "init_image")}
        mask = None
        if request.mask is not None:
            mask_image = decode_image(request.mask, "mask", self.max_input_pixels)
            check_mask_size(mask_image.size, image.size)
            mask = fit_mask(mask_image, width, height)
            hashes["mask_sha256"] = upload_sha256(request.mask, "mask")
        edit = EditInput(
            image=fit_image(image, width, height),
            strength=DEFAULT_STRENGTH if request.strength is None else request.strength,
            mask=mask,
            mask_blur=4 if request.mask_blur is None else request.mask_blur,
            preserve_unmasked=request.preserve_unmasked is not False,
        )
        return edit, hashes

    async def calibration_for(self, request: ImageRequest) -> dict[int, float] | None:
        """The score histogram a `quality_percentile` is read from (None when the request gives none):
        what `plan` needs, read before it because the job store may be a call away."""
        if request.quality_percentile is None:
            return None
        spec = self.spec_of(request.model)
        return await self.quality.calibration(spec.id, request.quality_metric or self.policy.metric)

    def reference_inputs(self, request: ImageRequest, spec: ModelSpec) -> tuple[tuple[np.ndarray, ...], list[str]]:
        """Decode `reference_images` (pixel limit before decoding, then the model's size rules; 422 naming
        `reference_images.<i>`) as they are: the pipeline fits each itself. And their SHA-256, for metadata."""
        images, hashes = [], []
        for index, data in enumerate(request.reference_images):
            field = f"reference_images.{index}"
            image = decode_image(data, field, self.max_input_pixels)
            spec.check_reference_size(field, image.size)
            images.append(np.asarray(image.convert("RGB")))
            hashes.append(upload_sha256(data, field))
        return tuple(images), hashes

    def plan(self, request: ImageRequest, calibration: dict[int, float] | None = None,
             ) -> tuple[ImagePlan, ModelSpec, list[str]]:
        """Fill in defaults and check what depends on the model and the config (422 on failure, decided
        in serve_app.services.validation). `calibration`: from `calibration_for`.

        `control`, `init_image` and `mask` images are decoded here, so a bad one is refused before
        anything is generated."""
        spec = self.spec_of(request.model)
        checked = check_image(request, spec, self.policy, self.gate_metrics, self.blocklist, self.loras,
                              calibration, self.specs)
        warnings = []
        guidance_scale = checked.guidance_scale
        # Diffusers runs classifier-free guidance only above a scale of 1; below, a negative prompt does nothing.
        use_negative_prompt = spec.uses_negative_prompt and guidance_scale > 1
        if request.negative_prompt and not spec.uses_negative_prompt:
            warnings.append(
                f"negative_prompt is not used by {spec.id}: it is guidance-distilled and runs without "
                "classifier-free guidance"
            )
        elif request.negative_prompt and not use_negative_prompt:
            warnings.append(
                f"negative_prompt is not used at guidance_scale {guidance_scale:g}: classifier-free guidance "
                "runs only above 1"
            )
        width, height = checked.width, checked.height
        control = None if request.control is None else self.control_input(request.control, width, height)
        edit, input_hashes = (None, {}) if request.init_image is None else self.edit_input(request, width, height)
        references, reference_hashes = self.reference_inputs(request, spec)
        if reference_hashes:
            input_hashes["reference_images_sha256"] = reference_hashes
        plan = ImagePlan(
            prompt=request.prompt,
            negative_prompt=request.negative_prompt,
            style=request.style,
            quality=request.quality,
            enhance=request.enhance,
            use_negative_prompt=use_negative_prompt,
            width=width,
            height=height,
            num_inference_steps=checked.num_inference_steps,
            guidance_scale=guidance_scale,
            base_seed=random_seed() if request.seed is None else request.seed,
            num_images=request.num_images,
            metric=checked.metric,
            threshold=checked.threshold,
            max_attempts=checked.max_attempts,
            candidates=checked.candidates,
            percentile=request.quality_percentile,
            target=spec.prompt_form,
            revise_prompt=self.policy.revise_prompt if request.revise_prompt is None else request.revise_prompt,
            loras=checked.loras,
            weights=checked.weights,
            control=control,
            edit=edit,
            hires=checked.hires,
            references=references,
            input_hashes=input_hashes,
        )
        return plan, spec, warnings

    def loras_available(self) -> dict:
        """`GET /v1/loras`: the registry, with the deployed models that take each family."""
        models: dict[str, list[str]] = {}
        for spec in self.specs.values():
            if spec.supports_loras:
                models.setdefault(spec.family, []).append(spec.id)
        return self.loras.public(models)

    async def run(self, request: ImageRequest, progress: ProgressTarget | None = None, encoding: dict | None = None,
                  ) -> tuple[ImagePlan, ModelSpec, list[str], GraphResult]:
        """Plan and run the graph; the images stay arrays (text-to-video animates one of them). Once
        the request is planned and (under load) has its turn in the fair queue, a model that cannot
        take it turns it away before any model runs (services/admission.py). With `encoding`
        (`encoding_of`), each image that will be returned unless its scores fail it starts encoding
        while it is scored (`Candidate.encoding`)."""
        model = self.spec_of(request.model).id
        calibration = await self.calibration_for(request)
        # Off the event loop: planning decodes the control image, if any.
        plan, spec, warnings = await asyncio.to_thread(self.plan, request, calibration)
        await turn_first()
        with self.admission.admitted(model):
            early = None
            # Best-of-N keeps only some of a round's images: encoding them all would be wasted work.
            if encoding is not None and plan.extra_candidates == 0:
                early = functools.partial(_start_encoding, plan, spec, encoding)
            return plan, spec, warnings, await self.run_plan(plan, spec, progress, early)

    async def run_plan(self, plan: ImagePlan, spec: ModelSpec, progress: ProgressTarget | None = None,
                       on_generated: OnGenerated | None = None) -> GraphResult:
        """Run the graph for a plan already made by `plan`; what the gate did is recorded."""
        result = await run_image_graph(
            plan, self.enhancer, self.generators[spec.id], self.scorer, timeout_s=self.request_timeout_s,
            progress=progress, on_generated=on_generated,
        )
        self.record_gate(spec.id, plan, result)
        return result

    def record_gate(self, model: str, plan: ImagePlan, result: GraphResult) -> None:
        """Tally what the gate did (calibration, pass rates: off the request's path) and count it in metrics."""
        first = [c for c in result.candidates if c.attempt == 1]
        accepted = sum(c.passed for c in result.chosen)
        self.quality.add_later(model, tally_of(
            plan.metric, len(first), sum(c.passed for c in first), [c.scores for c in result.candidates],
            accepted, result.device_seconds,
        ))
        if self.gate_metrics_recorder is not None:
            self.gate_metrics_recorder.record(model, plan.metric, result, accepted)

    async def generate_images(self, request: ImageRequest | dict, progress: ProgressTarget | None = None,
                              ) -> ImageResponse:
        """The whole request; `progress` (async jobs) receives the generator's denoising steps."""
        if not isinstance(request, ImageRequest):
            request = ImageRequest.model_validate(request)
        accepted = time.time()
        started = time.perf_counter()
        if progress is not None:
            progress = dataclasses.replace(progress, preview=request.preview)
        encoding = encoding_of(request)
        plan, spec, warnings, result = await self.run(request, progress, encoding)
        width, height = plan.output_size
        encode_started = time.perf_counter()  # what is left of it: most images began while being scored
        images, attempts = await _encoded(result, plan, spec, encoding)
        timings = dict(result.timings)
        timings["encode"] = time.perf_counter() - encode_started
        timings["total"] = time.perf_counter() - started
        timings["device"] = result.device_seconds  # its share of the GPU's time: what fair queueing charges
        return ImageResponse(
            id=uuid.uuid4().hex,
            created=int(accepted),
            model=spec.id,
            prompt=request.prompt,
            enhanced_prompt=result.enhanced.prompt,
            negative_prompt=result.negative_prompt,
            style=None if result.enhanced.enhancer == "none" else result.enhanced.style,
            enhancer=result.enhanced.enhancer,
            enhancer_fallback=result.enhanced.fallback_reason,
            enhancer_dropped=dropped_terms(result.enhanced, spec),
            prompt_advice=advice_of(request.prompt),
            width=width,
            height=height,
            num_inference_steps=plan.num_inference_steps,
            guidance_scale=plan.guidance_scale,
            quality_metric=plan.metric,
            quality_threshold=plan.threshold,
            quality_percentile=plan.percentile,
            quality_weights=plan.weights,
            passed=result.passed,
            images=images,
            attempts=attempts,
            candidates=candidates_of(result),
            timings={key: round(value, 4) for key, value in timings.items()},
            warnings=warnings,
            loras=loras_of(plan),
            mode=plan.mode,
            strength=None if plan.edit is None else plan.edit.strength,
            hires=hires_of(plan),
            simulated=spec.simulated,
        )

    async def enhance_prompt(self, request: EnhanceRequest | dict) -> EnhanceResponse:
        """The enhance step alone, as the image graph would run it for `request.model`."""
        if not isinstance(request, EnhanceRequest):
            request = EnhanceRequest.model_validate(request)
        spec = self.spec_of(request.model)
        check_blocklist(request.prompt, self.blocklist)
        started = time.perf_counter()
        enhanced: EnhancedPrompt = await call_stage(
            self.enhancer.enhance.remote(
                request.prompt, request.style, request.quality, request.negative_prompt, target=spec.prompt_form
            ),
            "enhance", self.request_timeout_s,
        )
        return EnhanceResponse(
            prompt=request.prompt,
            enhanced_prompt=enhanced.prompt,
            negative_prompt=enhanced.negative_prompt if spec.uses_negative_prompt else None,
            style=enhanced.style,
            model=spec.id,
            enhancer=enhanced.enhancer,
            enhancer_fallback=enhanced.fallback_reason,
            enhancer_dropped=dropped_terms(enhanced, spec),
            prompt_advice=advice_of(request.prompt),
            seconds=round(time.perf_counter() - started, 4),
        )

    def models(self) -> list[dict]:
        return [spec.public() for spec in self.specs.values()]

    async def quality_figures(self) -> dict[str, dict[str, dict]] | None:
        """The gate's figures per model and metric for GET /v1/models; None when the job store
        cannot be read now (the catalogue still answers; GET /v1/admin/quality reports the error)."""
        try:
            return await self.quality.summary(list(self.specs))
        except Exception:
            logger.exception("could not read the quality gate's tallies for GET /v1/models")
            return None

    async def preview_control(self, request: ControlPreviewRequest) -> tuple[ControlPreviewResponse, bytes]:
        """The control map `request` would give the model: computed by the model's own replica
        (where the depth estimator lives), or the fitted image itself when `preprocess` is false."""
        model = request.model
        if model is None:  # the first model that takes this control type, else one with any ControlNet (422 below)
            specs = self.specs.values()
            model = next((spec.id for spec in specs if request.type in spec.control_types),
                         next((spec.id for spec in specs if spec.control_types), None))
        spec = self.spec_of(model)
        spec.check_control(request.type, none_field="model", type_field="type")
        width, height = request.width or spec.default_width, request.height or spec.default_height
        started = time.perf_counter()
        control = await asyncio.to_thread(self.control_input, request, width, height, "image")
        if control.preprocess:
            control = await call_stage(
                self.generators[spec.id].preprocess.remote(control), "preprocess", self.request_timeout_s
            )
        png = await asyncio.to_thread(encode_plain_png, control.image)
        response = ControlPreviewResponse(
            type=request.type, model=spec.id, width=width, height=height, preprocessed=request.preprocess,
            seconds=round(time.perf_counter() - started, 4), b64_png=base64.b64encode(png).decode("ascii"),
        )
        return response, png

    def controls(self) -> list[dict]:
        """The control types with their parameters and the models that take them (GET /v1/controls)."""
        return [
            {**control, "models": [spec.id for spec in self.specs.values() if control["type"] in spec.control_types]}
            for control in control_catalogue()
        ]


def advice_of(prompt: str) -> PromptAdviceInfo:
    advice = validate_prompt(prompt)
    return PromptAdviceInfo(score=advice.score, issues=[dataclasses.asdict(issue) for issue in advice.issues])


def attempts_of(result: GraphResult) -> list[Attempt]:
    """Every candidate with its scores; those not returned keep a thumbnail, to compare with the chosen."""
    chosen = {id(candidate) for candidate in result.chosen}
    return [
        Attempt(attempt=c.attempt, seed=c.seed, prompt=c.prompt, scores=Scores(**c.scores), passed=c.passed,
                thumbnail=None if id(c) in chosen else small_png_data_url(c.image))
        for c in result.candidates
    ]


def candidates_of(result: GraphResult) -> list[CandidateInfo]:
    """Every image generated, with its scores and whether it was returned: what best-of-N chose from."""
    chosen = {id(candidate) for candidate in result.chosen}
    return [CandidateInfo(attempt=c.attempt, seed=c.seed, scores=Scores(**c.scores), passed=c.passed,
                          chosen=id(c) in chosen) for c in result.candidates]


def loras_of(plan: ImagePlan) -> list[Lora]:
    return [Lora(name=ref.name, scale=ref.scale) for ref in plan.loras]


def hires_of(plan: ImagePlan) -> HiresInfo | None:
    hires = plan.hires
    if hires is None:
        return None
    return HiresInfo(scale=round(hires.width / plan.width, 4), strength=hires.strength, steps=hires.steps,
                     first_width=plan.width, first_height=plan.height)


def edit_meta(plan: ImagePlan) -> dict:
    """What a result's metadata needs to reproduce an image-to-image, inpainting, instruction-edit or
    hires request: the mode, and the uploads' hashes."""
    meta = {}
    if plan.references:
        meta.update(mode=plan.mode, **plan.input_hashes)
    edit = plan.edit
    if edit is not None:
        meta.update(mode=edit.mode, strength=edit.strength, **plan.input_hashes)
        if edit.mask is not None:
            meta.update(mask_blur=edit.mask_blur, preserve_unmasked=edit.preserve_unmasked)
    if plan.hires is not None:
        meta["hires"] = hires_of(plan).model_dump()
    return meta


def _start_encoding(plan: ImagePlan, spec: ModelSpec, encoding: dict, enhanced: EnhancedPrompt, seed: int,
                    image: np.ndarray) -> asyncio.Future:
    """One image's encoding, begun as it arrives (`OnGenerated`): its metadata is known then, its
    scores are not needed."""
    negative_prompt = enhanced.negative_prompt if plan.use_negative_prompt else None
    return _encoding(plan, spec, encoding, enhanced.prompt, negative_prompt, seed, image)


def _encoding(plan: ImagePlan, spec: ModelSpec, encoding: dict, prompt: str, negative_prompt: str | None,
              seed: int, image: np.ndarray) -> asyncio.Future:
    """One image's `encode_image_b64` fields, encoded in a worker thread."""
    meta = image_meta(plan, spec, prompt, negative_prompt, seed)
    return asyncio.ensure_future(asyncio.to_thread(encode_image_b64, image, meta, **encoding))


async def _encoded(result: GraphResult, plan: ImagePlan, spec: ModelSpec, encoding: dict,
                   ) -> tuple[list[GeneratedImage], list[Attempt]]:
    """The chosen images, encoded (awaiting those begun early, encoding the rest), and every attempt.
    Early encodings of images not chosen are dropped."""
    chosen = {id(candidate) for candidate in result.chosen}
    for candidate in result.candidates:
        if id(candidate) not in chosen and candidate.encoding is not None:
            candidate.encoding.cancel()  # its thread may still finish; the result is not wanted
    images = []
    for candidate in result.chosen:
        fields = await (candidate.encoding or _encoding(plan, spec, encoding, candidate.prompt,
                                                        result.negative_prompt, candidate.seed, candidate.image))
        images.append(_generated_image(candidate, plan, fields))
    return images, await asyncio.to_thread(attempts_of, result)


def image_meta(plan: ImagePlan, spec: ModelSpec, prompt: str, negative_prompt: str | None, seed: int) -> dict:
    """What an image's file says of how it was made (PNG text chunks, EXIF of JPEG and WebP)."""
    width, height = plan.output_size
    meta = {
        "prompt": prompt,
        "original_prompt": plan.prompt,
        "negative_prompt": negative_prompt,
        "seed": seed,
        # The initial noise is drawn on the CPU from `seed` wherever the model runs (see docs/gpu.md).
        "generator": NOISE_GENERATOR,
        "steps": plan.num_inference_steps,
        "guidance_scale": plan.guidance_scale,
        "width": width,
        "height": height,
        "model": spec.id,
        "loras": [{"name": ref.name, "scale": ref.scale} for ref in plan.loras],
        **edit_meta(plan),
    }
    if spec.simulated is not None:  # a placeholder image from a simulated device must never pass for a real one
        meta["simulated"] = spec.simulated
    if plan.control is not None:
        control = plan.control
        meta["control"] = {"type": control.type, "conditioning_scale": control.conditioning_scale,
                           "preprocess": control.preprocess}
        if control.type == "canny" and control.preprocess:
            meta["control"].update(low_threshold=control.low_threshold, high_threshold=control.high_threshold)
    return meta


def _generated_image(candidate: Candidate, plan: ImagePlan, encoded: dict) -> GeneratedImage:
    """`encoded`: the image's `encode_image_b64` fields."""
    width, height = plan.output_size
    return GeneratedImage(
        **encoded,
        seed=candidate.seed,
        width=width,
        height=height,
        attempt=candidate.attempt,
        scores=Scores(**candidate.scores),
        passed=candidate.passed,
    )

