"""The image service: request -> plan -> graph -> response.

The Serve ingress delegates here with real handles; the benchmark and unit tests use the same class
with `LocalHandle`s, so the in-process baseline runs exactly the code the service runs.
"""

from __future__ import annotations

import asyncio
import base64
import time
import uuid

from deployments.clip_scorer import SCORE_RANGES
from deployments.types import ControlInput, ProgressTarget
from serve_app.config import QualityPolicy, check_threshold
from serve_app.graph import Candidate, GraphResult, ImagePlan, call_stage, run_image_graph
from serve_app.images import encode_plain_png, encode_png_b64
from serve_app.inputs import decode_image, fit_image
from serve_app.models import ModelSpec, RequestError, control_catalogue
from serve_app.schemas import (
    Attempt,
    ControlOptions,
    ControlPreviewRequest,
    ControlPreviewResponse,
    GeneratedImage,
    ImageRequest,
    ImageResponse,
    Scores,
    random_seed,
)


class ImageService:
    def __init__(self, enhancer, generators: dict, scorer, specs: dict[str, ModelSpec], policy: QualityPolicy,
                 request_timeout_s: float = 600.0, max_input_pixels: int = 4096 * 4096):
        missing = set(generators) ^ set(specs)
        if missing:
            raise ValueError(f"generators and model specs must name the same models; mismatch: {sorted(missing)}")
        self.enhancer = enhancer
        self.generators = generators
        self.scorer = scorer
        self.specs = specs
        self.policy = policy
        self.request_timeout_s = request_timeout_s
        self.max_input_pixels = max_input_pixels

    def spec_of(self, model: str) -> ModelSpec:
        spec = self.specs.get(model)
        if spec is None:
            known = sorted(self.specs)
            raise RequestError("model", f"must be one of {known}; got {model!r}", "one of " + ", ".join(map(repr, known)))
        return spec

    def control_input(self, control: ControlOptions, width: int, height: int, field: str = "control.image") -> ControlInput:
        """Decode the reference image (pixel limit checked before decoding; 422 naming `field`) and fit
        it to the output size: the map, or the picture the generator makes the map from."""
        image = fit_image(decode_image(control.image, field, self.max_input_pixels), width, height)
        return ControlInput(
            type=control.type, image=image, conditioning_scale=control.conditioning_scale,
            preprocess=control.preprocess, low_threshold=control.low_threshold, high_threshold=control.high_threshold,
        )

    def plan(self, request: ImageRequest) -> tuple[ImagePlan, ModelSpec, list[str]]:
        """Fill in defaults and check what depends on the model and the config (422 on failure).

        A `control` image is decoded here, so a bad one is refused before anything is generated."""
        spec = self.spec_of(request.model)
        spec.check(request)
        metric = request.quality_metric or self.policy.metric
        threshold = self.policy.threshold if request.quality_threshold is None else request.quality_threshold
        try:
            check_threshold(metric, threshold)
        except ValueError as error:
            low, high = SCORE_RANGES[metric]
            raise RequestError("quality_threshold", str(error), f"{low:g}-{high:g}") from None
        warnings = []
        guidance_scale = spec.default_guidance if request.guidance_scale is None else request.guidance_scale
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
        width = request.width or spec.default_width
        height = request.height or spec.default_height
        control = None if request.control is None else self.control_input(request.control, width, height)
        plan = ImagePlan(
            prompt=request.prompt,
            negative_prompt=request.negative_prompt,
            style=request.style,
            quality=request.quality,
            enhance=request.enhance,
            use_negative_prompt=use_negative_prompt,
            width=width,
            height=height,
            num_inference_steps=request.num_inference_steps or spec.default_steps,
            guidance_scale=guidance_scale,
            base_seed=random_seed() if request.seed is None else request.seed,
            num_images=request.num_images,
            metric=metric,
            threshold=threshold,
            max_attempts=request.max_attempts or self.policy.max_attempts,
            control=control,
        )
        return plan, spec, warnings

    async def run(self, request: ImageRequest, progress: ProgressTarget | None = None,
                  ) -> tuple[ImagePlan, ModelSpec, list[str], GraphResult]:
        """Plan and run the graph; the images stay arrays (text-to-video animates one of them)."""
        # Off the event loop: planning decodes the control image, if any.
        plan, spec, warnings = await asyncio.to_thread(self.plan, request)
        result = await run_image_graph(
            plan, self.enhancer, self.generators[spec.id], self.scorer, timeout_s=self.request_timeout_s,
            progress=progress,
        )
        return plan, spec, warnings, result

    async def generate_images(self, request: ImageRequest | dict, progress: ProgressTarget | None = None,
                              ) -> ImageResponse:
        """The whole request; `progress` (async jobs) receives the generator's denoising steps."""
        if not isinstance(request, ImageRequest):
            request = ImageRequest.model_validate(request)
        accepted = time.time()
        started = time.perf_counter()
        plan, spec, warnings, result = await self.run(request, progress)
        encode_started = time.perf_counter()
        images = await asyncio.to_thread(self._encode, result, plan, spec)
        timings = dict(result.timings)
        timings["encode"] = time.perf_counter() - encode_started
        timings["total"] = time.perf_counter() - started
        return ImageResponse(
            id=uuid.uuid4().hex,
            created=int(accepted),
            model=spec.id,
            prompt=request.prompt,
            enhanced_prompt=result.enhanced.prompt,
            negative_prompt=result.negative_prompt,
            style=None if result.enhanced.enhancer == "none" else result.enhanced.style,
            enhancer=result.enhanced.enhancer,
            width=plan.width,
            height=plan.height,
            num_inference_steps=plan.num_inference_steps,
            guidance_scale=plan.guidance_scale,
            quality_metric=plan.metric,
            quality_threshold=plan.threshold,
            passed=result.passed,
            images=images,
            attempts=attempts_of(result),
            timings={key: round(value, 4) for key, value in timings.items()},
            warnings=warnings,
        )

    @staticmethod
    def _encode(result: GraphResult, plan: ImagePlan, spec: ModelSpec) -> list[GeneratedImage]:
        return [_generated_image(candidate, result, plan, spec) for candidate in result.chosen]

    def models(self) -> list[dict]:
        return [spec.public() for spec in self.specs.values()]

    async def preview_control(self, request: ControlPreviewRequest) -> tuple[ControlPreviewResponse, bytes]:
        """The control map `request` would give the model: computed by the model's own replica
        (where the depth estimator lives), or the fitted image itself when `preprocess` is false."""
        spec = self.spec_of(request.model)
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


def attempts_of(result: GraphResult) -> list[Attempt]:
    return [
        Attempt(attempt=c.attempt, seed=c.seed, prompt=c.prompt, scores=Scores(**c.scores), passed=c.passed)
        for c in result.candidates
    ]


def _generated_image(candidate: Candidate, result: GraphResult, plan: ImagePlan, spec: ModelSpec) -> GeneratedImage:
    meta = {
        "prompt": candidate.prompt,
        "original_prompt": plan.prompt,
        "negative_prompt": result.negative_prompt,
        "seed": candidate.seed,
        "steps": plan.num_inference_steps,
        "guidance_scale": plan.guidance_scale,
        "width": plan.width,
        "height": plan.height,
        "model": spec.id,
    }
    if plan.control is not None:
        control = plan.control
        meta["control"] = {"type": control.type, "conditioning_scale": control.conditioning_scale,
                           "preprocess": control.preprocess}
        if control.type == "canny" and control.preprocess:
            meta["control"].update(low_threshold=control.low_threshold, high_threshold=control.high_threshold)
    return GeneratedImage(
        b64_png=encode_png_b64(candidate.image, meta),
        seed=candidate.seed,
        width=plan.width,
        height=plan.height,
        attempt=candidate.attempt,
        scores=Scores(**candidate.scores),
        passed=candidate.passed,
    )
