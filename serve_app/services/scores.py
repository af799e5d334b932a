"""`POST /v1/scores`: uploaded images scored against a prompt by the same ClipScorer the graph uses."""

from __future__ import annotations

import asyncio
import math
import time

import numpy as np
from PIL import Image

from deployments.names import SCORE_RANGES
from serve_app.protocol.schemas import ScoredImage, ScoreRequest, ScoreResponse, Scores
from serve_app.services.graph import call_stage
from serve_app.services.inputs import load_image, open_image
from serve_app.services.settings import Settings
from serve_app.services.validation import check_total_pixels, quality_gate

# What the scorer's CLIP resizes every image to (its shorter side), if its `info` does not say.
DEFAULT_CLIP_INPUT_SIZE = 224


def scales(sizes: list[tuple[int, int]], budget: int, floor: int) -> list[float]:
    """The factor each image is scaled by so that all of them hold at most about `budget` pixels:
    one common factor, but none below `floor` pixels on its shorter side (what CLIP resizes to,
    so the copy CLIP sees is still a downscale) and none above 1. Images of one size stay one size."""
    total = sum(width * height for width, height in sizes)
    if total <= budget:
        return [1.0] * len(sizes)
    common = math.sqrt(budget / total)
    return [min(1.0, max(common, floor / min(width, height))) for width, height in sizes]


class ScoreService:
    def __init__(self, settings: Settings, scorer):
        """Built by `Services.build` (services/facade.py); `scorer` the ClipScorer's handle."""
        self.scorer = scorer
        self.policy = settings.policy
        self.gate_metrics = settings.gate_metrics
        self.scorers = settings.scorers
        self.max_input_pixels = settings.max_input_pixels
        self.request_timeout_s = settings.request_timeout_s
        self.budget = settings.scores
        self._clip_input_size: int | None = None

    def _open(self, request: ScoreRequest) -> list[Image.Image]:
        """Every upload's header read and checked, and their pixels in all within max_total_pixels."""
        opened = [open_image(data, f"images.{index}", self.max_input_pixels) for index, data in enumerate(request.images)]
        check_total_pixels("images", [image.size for image in opened], self.budget.max_total_pixels,
                           "scores.max_total_pixels")
        return opened

    def _decode(self, opened: list[Image.Image], factors: list[float]) -> list[np.ndarray]:
        """One image at a time, each scaled by its factor, and dropped from `opened` (which this
        empties) once copied into its array: at most one upload is held at full size at once."""
        images = []
        for index, factor in enumerate(factors):
            image = opened.pop(0)
            images.append(np.asarray(load_image(image, f"images.{index}", self.max_input_pixels, factor),
                                     dtype=np.uint8))
            del image  # its full-size pixels go before the next upload is decoded
        return images

    def gate_ranges(self) -> dict[str, tuple[float, float]]:
        """Each gate metric the deployed scorers compute, with its range (GET /v1/models, /v1/scores)."""
        return {name: SCORE_RANGES[name] for name in self.gate_metrics}

    async def clip_input_size(self) -> int:
        """The shorter side the scorer's CLIP resizes images to (asked once; 224 for ViT-L/14)."""
        if self._clip_input_size is None:
            info = await call_stage(self.scorer.info.remote(), "score", self.request_timeout_s)
            self._clip_input_size = int(info.get("input_size", DEFAULT_CLIP_INPUT_SIZE))
        return self._clip_input_size

    async def score(self, request: ScoreRequest | dict) -> ScoreResponse:
        if not isinstance(request, ScoreRequest):
            request = ScoreRequest.model_validate(request)
        started = time.perf_counter()
        metric, threshold, weights = quality_gate(request.quality_metric, request.quality_threshold,
                                                  request.quality_weights, self.policy, self.gate_metrics)
        opened = await asyncio.to_thread(self._open, request)
        sizes = [image.size for image in opened]
        factors = [1.0] * len(sizes)
        if sum(width * height for width, height in sizes) > self.budget.pixel_budget:
            factors = scales(sizes, self.budget.pixel_budget, await self.clip_input_size())
        images = await asyncio.to_thread(self._decode, opened, factors)
        decoded = time.perf_counter()
        scores = await call_stage(self.scorer.score.remote(images, request.prompt, weights=weights), "score",
                                  self.request_timeout_s)
        scored = time.perf_counter()
        results = [
            ScoredImage(index=index, width=width, height=height, scored_width=image.shape[1],
                        scored_height=image.shape[0], scores=Scores(**image_scores),
                        passed=image_scores[metric] >= threshold)
            for index, (image, (width, height), image_scores)
            in enumerate(zip(images, map(_upright, sizes, factors, images), scores))
        ]
        best = max(range(len(results)), key=lambda index: (scores[index][metric], -index))
        return ScoreResponse(
            prompt=request.prompt, quality_metric=metric, quality_threshold=threshold, quality_weights=weights,
            images=results, best=best,
            ranges=self.gate_ranges(),
            timings={"decode": round(decoded - started, 4), "score": round(scored - decoded, 4),
                     "total": round(time.perf_counter() - started, 4)},
        )


def _upright(size: tuple[int, int], factor: float, copy: np.ndarray) -> tuple[int, int]:
    """An upload's width and height as shown (EXIF orientation applied), from its header's size and
    the decoded copy: a quarter turn shows as the copy's sides matching the header's swapped."""
    width, height = size
    copy_height, copy_width = copy.shape[:2]
    kept = abs(copy_width - width * factor) + abs(copy_height - height * factor)
    turned = abs(copy_width - height * factor) + abs(copy_height - width * factor)
    return (height, width) if turned < kept else (width, height)
