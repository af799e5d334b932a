"""The image service: request -> plan -> graph -> response.

The Serve ingress delegates here with real handles; the benchmark and unit tests use the same class
with `LocalHandle`s, so the in-process baseline runs exactly the code the service runs.
"""

from __future__ import annotations

import asyncio
import time
import uuid

from deployments.clip_scorer import COMBINABLE, GATE_METRICS, SCORE_RANGES
from deployments.config import CombinedWeights
from deployments.types import ProgressTarget
from serve_app.config import QualityPolicy, check_threshold
from serve_app.graph import Candidate, GraphResult, ImagePlan, run_image_graph
from serve_app.images import encode_png_b64
from serve_app.models import ModelSpec, RequestError
from serve_app.schemas import Attempt, GeneratedImage, ImageRequest, ImageResponse, Scores, random_seed


class ImageService:
    def __init__(self, enhancer, generators: dict, scorer, specs: dict[str, ModelSpec], policy: QualityPolicy,
                 request_timeout_s: float = 600.0, gate_metrics: tuple[str, ...] = GATE_METRICS):
        """`gate_metrics`: the gate scores the deployed scorer computes (`AppArgs.gate_metrics()`)."""
        missing = set(generators) ^ set(specs)
        if missing:
            raise ValueError(f"generators and model specs must name the same models; mismatch: {sorted(missing)}")
        self.enhancer = enhancer
        self.generators = generators
        self.scorer = scorer
        self.specs = specs
        self.policy = policy
        self.request_timeout_s = request_timeout_s
        self.gate_metrics = tuple(gate_metrics)

    def plan(self, request: ImageRequest) -> tuple[ImagePlan, ModelSpec, list[str]]:
        """Fill in defaults and check what depends on the model and the config (422 on failure)."""
        spec = self.specs.get(request.model)
        if spec is None:
            known = sorted(self.specs)
            raise RequestError("model", f"must be one of {known}; got {request.model!r}", "one of " + ", ".join(map(repr, known)))
        spec.check(request)
        metric, threshold, weights = quality_gate(request.quality_metric, request.quality_threshold,
                                                  request.quality_weights, self.policy, self.gate_metrics)
        warnings = []
        if request.negative_prompt and not spec.uses_negative_prompt:
            warnings.append(
                f"negative_prompt is not used by {spec.id}: it is guidance-distilled and runs without "
                "classifier-free guidance"
            )
        plan = ImagePlan(
            prompt=request.prompt,
            negative_prompt=request.negative_prompt,
            style=request.style,
            quality=request.quality,
            enhance=request.enhance,
            use_negative_prompt=spec.uses_negative_prompt,
            width=request.width or spec.default_width,
            height=request.height or spec.default_height,
            num_inference_steps=request.num_inference_steps or spec.default_steps,
            guidance_scale=spec.default_guidance if request.guidance_scale is None else request.guidance_scale,
            base_seed=random_seed() if request.seed is None else request.seed,
            num_images=request.num_images,
            metric=metric,
            threshold=threshold,
            max_attempts=request.max_attempts or self.policy.max_attempts,
            weights=weights,
        )
        return plan, spec, warnings

    async def run(self, request: ImageRequest, progress: ProgressTarget | None = None,
                  ) -> tuple[ImagePlan, ModelSpec, list[str], GraphResult]:
        """Plan and run the graph; the images stay arrays (text-to-video animates one of them)."""
        plan, spec, warnings = self.plan(request)
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
            quality_weights=plan.weights,
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


def quality_gate(metric: str | None, threshold: float | None, weights: CombinedWeights | None,
                 policy: QualityPolicy, gate_metrics: tuple[str, ...]) -> tuple[str, float, CombinedWeights]:
    """The request's gate (metric, threshold, combined weights), the policy's where it gives none;
    422 naming the field when the metric or a weighted score is not computed, or the threshold is
    outside the metric's range."""
    metric = metric or policy.metric
    if metric not in gate_metrics:
        allowed = ", ".join(map(repr, gate_metrics))
        raise RequestError("quality_metric", f"{metric!r} is not computed by the deployed scorer "
                           "(scorer.laion.enabled is false)", f"one of {allowed}")
    threshold = policy.threshold if threshold is None else threshold
    try:
        check_threshold(metric, threshold)
    except ValueError as error:
        low, high = SCORE_RANGES[metric]
        raise RequestError("quality_threshold", str(error), f"{low:g}-{high:g}") from None
    weights = weights or policy.weights or default_weights(gate_metrics)
    if weights.laion > 0 and "laion" not in gate_metrics:
        raise RequestError("quality_weights.laion", "must be 0: the deployed scorer computes no laion score "
                           "(scorer.laion.enabled is false)", "0")
    return metric, threshold, weights


def default_weights(gate_metrics: tuple[str, ...]) -> CombinedWeights:
    """Equal weights over the combinable scores the scorer computes."""
    return CombinedWeights(**{metric: 1.0 for metric in COMBINABLE if metric in gate_metrics})


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
    return GeneratedImage(
        b64_png=encode_png_b64(candidate.image, meta),
        seed=candidate.seed,
        width=plan.width,
        height=plan.height,
        attempt=candidate.attempt,
        scores=Scores(**candidate.scores),
        passed=candidate.passed,
    )
