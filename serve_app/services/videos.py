"""The video service: a request resolved against its video model (`VideoSpec`), then image-to-video,
native text-to-video, or a keyframe from the image graph animated (svd)."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import time
import uuid

from pydantic import ValidationError

from deployments.runtime.types import ProgressTarget, VideoOutput, VideoParams
from serve_app.protocol.errors import RequestError
from serve_app.protocol.schemas import (
    ImageRequest,
    KeyframeInfo,
    Scores,
    VideoRequest,
    VideoResponse,
    VideoScores,
    random_seed,
)
from serve_app.services.graph import ImagePlan, call_stage
from serve_app.services.images import ImageService, advice_of, attempts_of
from serve_app.services.inputs import decode_image, fit_image
from serve_app.services.settings import Handles, Settings
from serve_app.services.validation import ModelSpec, VideoPlan, VideoSpec, dropped_terms, quality_gate


class VideoService:
    def __init__(self, settings: Settings, handles: Handles, images: ImageService):
        """Built by `Services.build` (services/facade.py); `images` makes text-to-video's keyframes."""
        self.generators = handles.video_generators  # video model id -> VideoGenerator handle
        self.specs = {model_id: VideoSpec(entry) for model_id, entry in settings.video_models.items()}
        self.default_model = settings.default_video_model
        self.images = images
        self.max_input_pixels = settings.max_input_pixels
        self.video_frames = settings.scores.video_frames  # frames of each video scored; 0: none

    def spec(self, model: str | None) -> VideoSpec:
        model = model or self.default_model
        if model not in self.specs:
            known = list(self.specs)
            raise RequestError("model", f"must be one of the video models {known}; got {model!r}",
                               "one of " + ", ".join(map(repr, known)))
        return self.specs[model]

    def frames(self, request: VideoRequest | dict) -> int:
        """The frames a request generates (what a key's daily image budget is charged): its
        `num_frames`, or its model's default. RequestError (422) for a request its model refuses."""
        if not isinstance(request, VideoRequest):
            request = VideoRequest.model_validate(request)
        return self.spec(request.model).plan(request).num_frames

    def check(self, request: VideoRequest) -> VideoPlan:
        """Every check `run` makes before a model runs, without running one: the model's family rules,
        the uploaded image decodes within the limits, or the keyframe's image request is valid for its
        model. Raises RequestError naming the field. Async jobs call it at submit. Decodes: call it in
        a thread."""
        plan = self.spec(request.model).plan(request)
        self._gate(request)
        if request.image is not None:
            decode_image(request.image, "image", self.max_input_pixels)
        elif plan.keyframe:
            self._keyframe_plan(request, plan.width, plan.height, seed=0)
        return plan

    async def run(self, request: VideoRequest | dict, progress: ProgressTarget | None = None,
                  ) -> tuple[VideoResponse, VideoOutput]:
        """The response (with the file base64-encoded) and the raw output it was made from.

        `progress` (async jobs) receives the denoising steps of the keyframe and of the video.
        """
        if not isinstance(request, VideoRequest):
            request = VideoRequest.model_validate(request)
        accepted = time.time()
        started = time.perf_counter()
        spec = self.spec(request.model)
        plan = spec.plan(request)
        gate = self._gate(request)
        width, height = plan.width, plan.height
        seed = random_seed() if request.seed is None else request.seed
        timings: dict[str, float] = {}
        keyframe = None
        metadata = {}
        image = None
        if request.image is not None:
            image = await asyncio.to_thread(self._input_image, request.image, width, height)
        elif plan.keyframe:
            keyframe_started = time.perf_counter()
            keyframe_progress = None if progress is None else dataclasses.replace(progress, stage="keyframe")
            image, keyframe = await self._keyframe(request, width, height, seed, keyframe_progress)
            timings["keyframe"] = time.perf_counter() - keyframe_started
            metadata = {"prompt": keyframe.enhanced_prompt, "original_prompt": keyframe.prompt,
                        "keyframe_seed": keyframe.seed, "keyframe_model": keyframe.model}
        if request.prompt is not None and not plan.keyframe:
            metadata = {"prompt": request.prompt}
        simulated = spec.entry.device.simulated
        if simulated is not None:  # placeholder frames from a simulated device say so, in the file too
            metadata = {**metadata, "simulated": simulated}
        params = VideoParams(
            seed=seed, width=width, height=height, num_frames=plan.num_frames, fps=plan.fps,
            num_inference_steps=plan.num_inference_steps, output_format=request.output_format,
            prompt=None if plan.keyframe else request.prompt, options=plan.params, interpolate=request.interpolate,
            metadata=metadata, progress=None if progress is None else dataclasses.replace(progress, stage="video"),
            score_frames=self.video_frames,
        )
        response = self.generators[spec.id].animate.remote(params, image)
        output: VideoOutput = await call_stage(response, "video", self.images.request_timeout_s)
        timings["video"] = output.generate_seconds
        if request.interpolate > 1:
            timings["interpolate"] = output.interpolate_seconds
        timings["encode"] = output.encode_seconds
        scores = None
        if output.frames is not None:
            scoring_started = time.perf_counter()
            scores = await self._score(output, request.prompt, gate)
            timings["score"] = time.perf_counter() - scoring_started
        timings["total"] = time.perf_counter() - started
        response = VideoResponse(
            id=uuid.uuid4().hex, created=int(accepted), model=spec.id, family=spec.family.name,
            source=spec.entry.source, mode=plan.mode, prompt=params.prompt,
            b64_video=base64.b64encode(output.data).decode("ascii"), content_type=output.content_type,
            output_format=request.output_format, seed=seed, num_frames=output.num_frames, fps=output.fps,
            source_frames=output.source_frames, source_fps=output.source_fps, interpolate=request.interpolate,
            duration_s=round(output.num_frames / output.fps, 4), width=output.width, height=output.height,
            num_inference_steps=params.num_inference_steps, params=plan.params, keyframe=keyframe, scores=scores,
            timings={key: round(value, 4) for key, value in timings.items()}, simulated=simulated,
        )
        return response, output

    def _gate(self, request: VideoRequest) -> tuple | None:
        """The video's quality gate (metric, threshold, weights), as for images; None without a prompt
        (the frames are scored against it), where a gate given is a 422 naming the field."""
        if request.prompt is None:
            for field in ("quality_threshold", "quality_metric"):
                if getattr(request, field) is not None:
                    raise RequestError(field, "needs a prompt: a video's frames are scored against it",
                                       "a request with prompt")
            return None
        images = self.images
        return quality_gate(request.quality_metric, request.quality_threshold, None, images.policy, images.gate_metrics)

    async def _score(self, output: VideoOutput, prompt: str | None, gate: tuple | None) -> VideoScores:
        """The sampled frames scored (against `prompt`) and compared frame to frame, in one scorer call."""
        weights = gate[2] if gate is not None else None
        call = self.images.scorer.score_video.remote(output.frames, prompt, weights=weights)
        result = await call_stage(call, "score", self.images.request_timeout_s)
        frames = result["frames"]
        flat = [name for name in frames[0] if isinstance(frames[0][name], float)] if frames else []
        mean = {name: sum(frame[name] for frame in frames) / len(frames) for name in flat}
        metric, threshold = (gate[0], gate[1]) if gate is not None else (None, None)
        return VideoScores(sampled_frames=list(output.sampled_frames), frames=[Scores(**frame) for frame in frames],
                           mean=mean, temporal_consistency=result["temporal_consistency"], quality_metric=metric,
                           quality_threshold=threshold, passed=None if metric is None else mean[metric] >= threshold)

    def _input_image(self, data: str, width: int, height: int):
        return fit_image(decode_image(data, "image", self.max_input_pixels), width, height)

    def _keyframe_plan(self, request: VideoRequest, width: int, height: int, seed: int) -> tuple[ImagePlan, ModelSpec]:
        """The keyframe's image plan, checked against its model; errors name the video's fields.
        Decodes a keyframe control image: call it in a thread."""
        options = request.keyframe.model_dump(exclude_unset=True)
        try:
            image_request = ImageRequest(prompt=request.prompt, width=width, height=height, seed=seed, **options)
            plan, spec, _ = self.images.plan(image_request)
        except RequestError as error:
            field = error.field if error.field in ("prompt", "width", "height", "seed") else f"keyframe.{error.field}"
            raise error.renamed(field) from None
        except ValidationError as error:  # e.g. a width fine for video but not for the image model
            first = error.errors()[0]
            field = ".".join(str(part) for part in first["loc"])
            raise RequestError(field, first["msg"], "see GET /v1/models") from None
        return plan, spec

    async def _keyframe(self, request: VideoRequest, width: int, height: int, seed: int,
                        progress: ProgressTarget | None = None):
        # Planned once, off the event loop (a control image is decoded), then run as planned.
        plan, spec = await asyncio.to_thread(self._keyframe_plan, request, width, height, seed)
        result = await self.images.run_plan(plan, spec, progress)
        best = result.chosen[0]
        info = KeyframeInfo(
            model=spec.id, seed=best.seed, prompt=request.prompt, enhanced_prompt=best.prompt,
            enhancer=result.enhanced.enhancer, enhancer_fallback=result.enhanced.fallback_reason,
            enhancer_dropped=dropped_terms(result.enhanced, spec),
            prompt_advice=advice_of(request.prompt),
            scores=Scores(**best.scores), passed=best.passed, attempts=attempts_of(result),
        )
        return best.image, info
