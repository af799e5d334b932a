"""Hybrid serving: at a peak, a remote OpenAI-compatible images endpoint serves an image request the
local model cannot take (the research guide's section 7.4).

It is off unless the config enables it (`fallback:`), and a request must also ask for it
(`fallback: true`), because its prompt then goes to a third party. A request goes remote when

- the local model's deployment rejects it for back-pressure (Serve's `BackPressureError`, past the
  entry's `max_queued_requests`), or
- its estimated wait exceeds `fallback.max_estimated_wait_s` (see `WaitEstimator`).

The remote images are scored by the local CLIP scorer against the same quality gate, so the
response has the shape of a local one; `backend: "remote"` says who drew them. LoRAs and ControlNet
conditions cannot be sent to a remote API, so requests with them are refused (422) when they ask
for fallback rather than being served without them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid

import numpy as np

from deployments.secrets import read_secret
from serve_app.config import FallbackConfig
from serve_app.protocol.errors import RequestError
from serve_app.protocol.schemas import Attempt, GeneratedImage, ImageRequest, ImageResponse, Scores
from serve_app.services.graph import call_stage
from serve_app.services.inputs import decode_image
from serve_app.services.media import encode_image_b64, encoding_of

logger = logging.getLogger("ray.serve")

EWMA_WEIGHT = 0.3  # weight of the newest service-time sample
MAX_REMOTE_PIXELS = 4096 * 4096


class FallbackFailed(Exception):
    """The remote endpoint did not serve the request: 502 (it answered with an error or nothing
    usable) or 504 (it took longer than `fallback.timeout_s`)."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status = status
        self.detail = detail


def logged_failure(public: str, detail: str, status: int = 502) -> FallbackFailed:
    """A 502 saying `public` and a request id; the remote's own `detail` goes to the log under that
    id only: it can quote the caller's key (OpenAI's 401 shows its last characters) or the URL."""
    request_id = uuid.uuid4().hex[:12]
    logger.warning("remote fallback failed (request id %s): %s: %s", request_id, public, detail)
    return FallbackFailed(status, f"{public}; the detail is in the ingress log under request id {request_id}")


class WaitEstimator:
    """How long a new request for a model would wait before its generation starts, as this ingress
    replica sees it: the model's requests already in flight here, times the model's service time,
    divided by the replicas that serve it (a replica generates one request at a time).

    The service time is an exponentially weighted mean of the generate stage's seconds, sampled
    only from requests that found no other request of their model in flight when they started
    (so queueing inside the replica is not counted twice). Until a first sample exists there is
    no estimate, and only back-pressure sends requests remote. The estimate sees this replica's
    requests only: with several ingress replicas, or async jobs using the same model, it is low.
    """

    def __init__(self, replicas: dict[str, int]):
        self.replicas = {model: max(1, count) for model, count in replicas.items()}
        self.in_flight: dict[str, int] = {}
        self.service_s: dict[str, float] = {}

    def estimate(self, model: str) -> float | None:
        ahead = self.in_flight.get(model, 0)
        if ahead == 0:
            return 0.0
        service = self.service_s.get(model)
        if service is None:
            return None
        return ahead * service / self.replicas.get(model, 1)

    @contextlib.contextmanager
    def tracking(self, model: str):
        """Count a local request in flight while it runs; yields whether it started alone."""
        alone = self.in_flight.get(model, 0) == 0
        self.in_flight[model] = self.in_flight.get(model, 0) + 1
        try:
            yield alone
        finally:
            self.in_flight[model] -= 1

    def record(self, model: str, generate_s: float) -> None:
        previous = self.service_s.get(model)
        self.service_s[model] = generate_s if previous is None else (
            EWMA_WEIGHT * generate_s + (1 - EWMA_WEIGHT) * previous)


class RemoteImages:
    """The remote endpoint, through the official `openai` SDK: POST {base_url}/images/generations."""

    def __init__(self, config: FallbackConfig):
        from openai import AsyncOpenAI

        # Read here, on the ingress replica: the key is in no deployment argument, and an error names only its
        # source. api_key_env: null with no api_key_file is an endpoint without keys.
        key = read_secret(config.api_key_env, config.api_key_file, field="fallback.api_key", required=True)
        self.config = config
        # No SDK retries: this is the peak path, and the caller's client decides whether to retry.
        self.client = AsyncOpenAI(base_url=config.base_url, api_key=key or "no-key", timeout=config.timeout_s,
                                  max_retries=0)

    async def generate(self, prompt: str, n: int, width: int, height: int) -> tuple[list[str], str | None]:
        """Base64 images, and the prompt the remote says it used (if it revised it)."""
        import openai

        options = {"response_format": self.config.response_format} if self.config.response_format else {}
        try:
            answer = await self.client.images.generate(model=self.config.model, prompt=prompt, n=n,
                                                       size=f"{width}x{height}", **options)
        except openai.APITimeoutError:
            raise FallbackFailed(504, f"the remote fallback took longer than {self.config.timeout_s:g}s") from None
        except openai.APIStatusError as error:
            raise logged_failure(f"the remote fallback answered {error.status_code}", error.message) from None
        except openai.APIConnectionError as error:
            raise logged_failure("the remote fallback is unreachable", str(error)) from None
        images = [item.b64_json for item in answer.data or [] if item.b64_json]
        if len(images) != n:
            raise FallbackFailed(502, f"the remote fallback returned {len(images)} base64 image(s) for {n} asked "
                                      "(set fallback.response_format: b64_json for endpoints that return URLs)")
        revised = next((item.revised_prompt for item in answer.data if item.revised_prompt), None)
        return images, revised


class Fallback:
    """Decides when an image request goes remote, and serves it there."""

    def __init__(self, config: FallbackConfig, replicas: dict[str, int], images, remote: RemoteImages | None = None):
        self.config = config
        self.images = images  # the ImageService: its plan (validation, gate) and its scorer
        self.remote = remote or RemoteImages(config)
        self.estimator = WaitEstimator(replicas)

    def check(self, request: ImageRequest) -> None:
        """422 on `fallback` when the request asks for what a remote API cannot do."""
        local_only = {"loras": bool(request.loras), "control": request.control is not None,
                      "reference_images": bool(request.reference_images)}
        what = next((name for name, given in local_only.items() if given), None)
        if what is not None:
            raise RequestError("fallback", f"a remote endpoint cannot apply {what}; send fallback: false to wait "
                               "for the local model", "false with loras, control or reference_images")
        # The remote makes num_images, and the local model's calibration says nothing of its scores.
        if request.candidates is not None or request.quality_percentile is not None:
            what = "candidates" if request.candidates is not None else "quality_percentile"
            raise RequestError("fallback", f"the remote endpoint is not gated by {what} (best-of-N and percentiles "
                               "are the local models'); send fallback: false", "false with candidates or "
                               "quality_percentile")

    def reason_to_skip_local(self, model: str) -> str | None:
        """'estimated_wait' when the model's estimated wait passes the configured bound."""
        bound = self.config.max_estimated_wait_s
        if bound is None:
            return None
        estimate = self.estimator.estimate(model)
        return "estimated_wait" if estimate is not None and estimate > bound else None

    async def generate(self, request: ImageRequest, reason: str) -> ImageResponse:
        accepted, started = time.time(), time.perf_counter()
        plan, spec, warnings = await asyncio.to_thread(self.images.plan, request)
        b64_images, revised = await self.remote.generate(request.prompt, plan.num_images, plan.width, plan.height)
        remote_at = time.perf_counter()
        arrays = await asyncio.to_thread(_decode_all, b64_images)
        scores = await call_stage(self.images.scorer.score.remote(arrays, request.prompt, weights=plan.weights),
                                  "score", self.images.request_timeout_s)
        scored_at = time.perf_counter()
        prompt = revised or request.prompt
        meta = {"prompt": prompt, "original_prompt": request.prompt, "model": self.config.model,
                "backend": "remote", "width": plan.width, "height": plan.height}
        generated = []
        for array, image_scores in zip(arrays, scores):
            passed = image_scores[plan.metric] >= plan.threshold
            generated.append((array, Scores(**image_scores), passed))
        images = await asyncio.to_thread(lambda: [
            GeneratedImage(**encode_image_b64(array, meta | {"width": array.shape[1], "height": array.shape[0]},
                                              **encoding_of(request), a1111=False),
                           seed=plan.base_seed, width=array.shape[1], height=array.shape[0], attempt=1,
                           scores=image_scores, passed=passed)
            for array, image_scores, passed in generated])
        from serve_app.services.images import advice_of

        warnings = [*warnings, f"served by the remote fallback ({reason}): seed, steps and guidance do not apply "
                                "there, and the same seed will not reproduce these images"]
        return ImageResponse(
            id=uuid.uuid4().hex, created=int(accepted), model=self.config.model, prompt=request.prompt,
            enhanced_prompt=prompt, negative_prompt=None, style=None, enhancer="none",
            prompt_advice=advice_of(request.prompt), width=images[0].width, height=images[0].height,
            num_inference_steps=0, guidance_scale=0.0, quality_metric=plan.metric, quality_threshold=plan.threshold,
            quality_weights=plan.weights, passed=all(image.passed for image in images), images=images,
            attempts=[Attempt(attempt=1, seed=plan.base_seed, prompt=prompt, scores=image.scores, passed=image.passed)
                      for image in images],
            timings={"remote": round(remote_at - started, 4), "score": round(scored_at - remote_at, 4),
                     "total": round(time.perf_counter() - started, 4)},
            warnings=warnings, backend="remote",
        )


def _decode_all(b64_images: list[str]) -> list[np.ndarray]:
    arrays = []
    for index, data in enumerate(b64_images):
        try:
            arrays.append(np.asarray(decode_image(data, f"remote image {index}", MAX_REMOTE_PIXELS), dtype=np.uint8))
        except RequestError as error:
            raise FallbackFailed(502, f"the remote fallback's image {index} {error.message}") from None
    return arrays
