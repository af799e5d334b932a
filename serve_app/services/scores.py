"""`POST /v1/scores`: uploaded images scored against a prompt by the same ClipScorer the graph uses."""

from __future__ import annotations

import asyncio
import time

import numpy as np

from deployments.scoring.clip_scorer import SCORE_RANGES
from serve_app.config import QualityPolicy
from serve_app.services.graph import call_stage
from serve_app.services.inputs import decode_image
from serve_app.api.schemas import ScoredImage, ScoreRequest, ScoreResponse, Scores
from serve_app.services.images import quality_gate


class ScoreService:
    def __init__(self, scorer, policy: QualityPolicy, gate_metrics: tuple[str, ...], max_input_pixels: int,
                 request_timeout_s: float = 600.0):
        self.scorer = scorer
        self.policy = policy
        self.gate_metrics = tuple(gate_metrics)
        self.max_input_pixels = max_input_pixels
        self.request_timeout_s = request_timeout_s

    def _decode(self, request: ScoreRequest) -> list[np.ndarray]:
        """Every image decoded within the pixel limit, or a 422 naming `images.N`."""
        return [np.asarray(decode_image(data, f"images.{index}", self.max_input_pixels), dtype=np.uint8)
                for index, data in enumerate(request.images)]

    async def score(self, request: ScoreRequest | dict) -> ScoreResponse:
        if not isinstance(request, ScoreRequest):
            request = ScoreRequest.model_validate(request)
        started = time.perf_counter()
        metric, threshold, weights = quality_gate(request.quality_metric, request.quality_threshold,
                                                  request.quality_weights, self.policy, self.gate_metrics)
        images = await asyncio.to_thread(self._decode, request)
        decoded = time.perf_counter()
        scores = await call_stage(self.scorer.score.remote(images, request.prompt, weights=weights), "score",
                                  self.request_timeout_s)
        scored = time.perf_counter()
        results = [
            ScoredImage(index=index, width=image.shape[1], height=image.shape[0], scores=Scores(**image_scores),
                        passed=image_scores[metric] >= threshold)
            for index, (image, image_scores) in enumerate(zip(images, scores))
        ]
        best = max(range(len(results)), key=lambda index: (scores[index][metric], -index))
        return ScoreResponse(
            prompt=request.prompt, quality_metric=metric, quality_threshold=threshold, quality_weights=weights,
            images=results, best=best,
            ranges={name: SCORE_RANGES[name] for name in self.gate_metrics},
            timings={"decode": round(decoded - started, 4), "score": round(scored - decoded, 4),
                     "total": round(time.perf_counter() - started, 4)},
        )
