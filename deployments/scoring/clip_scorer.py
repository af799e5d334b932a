"""The scorer deployment: how well each image matches its prompt, how good it looks, how people would rate it."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from ray import serve

from deployments.config import (
    SCORER_MAX_ONGOING_REQUESTS,
    CombinedWeights,
    ScorerConfig,
    ScoringConfig,
    clip_entry,
)

# Re-exported: the scorer's callers read the score names from here or from deployments.names.
from deployments.names import ASPECTS, COMBINABLE, GATE_METRICS, SCORE_RANGES, default_combined  # noqa: F401
from deployments.runtime.loading import check_device_health, in_serve_replica, resolve_placement
from deployments.runtime.metrics import BusyMeter, ModelMetrics
from deployments.runtime.types import GenerationOutput
from deployments.scoring.families import get_scorer_family
from deployments.scoring.perceptual import PERCEPTUAL_RANGES, perceptual_scores

logger = logging.getLogger("ray.serve")

ASPECT_RANGE = (0.0, 1.0)


def normalised(metric: str, value: float) -> float:
    """`value` of `metric` scaled to 0-1 over its documented range (clipped)."""
    low, high = SCORE_RANGES[metric]
    return float(min(1.0, max(0.0, (value - low) / (high - low))))


def combined_score(scores: Mapping[str, float], weights: CombinedWeights | Mapping[str, float]) -> float:
    """The weighted mean of the combinable scores, each scaled to 0-1 over its range (0-1).

    A score with weight 0 is not needed; one with a weight above 0 must be in `scores`."""
    if isinstance(weights, CombinedWeights):
        weights = weights.model_dump()
    used = {metric: weight for metric, weight in weights.items() if weight > 0}
    missing = sorted(set(used) - set(scores))
    if missing:
        raise ValueError(f"combined weights need scores that were not computed: {missing}")
    total = sum(used.values())
    if total <= 0:
        raise ValueError("combined weights must have at least one weight above 0")
    return sum(weight * normalised(metric, scores[metric]) for metric, weight in used.items()) / total


def scoring_config(config: ScoringConfig | ScorerConfig) -> ScoringConfig:
    """The scorers to load: a `ScoringConfig`, or the old single-CLIP `ScorerConfig` as one clip entry."""
    if isinstance(config, ScorerConfig):
        return ScoringConfig(scorers=(clip_entry(config),), batching=config.batching)
    return config


@serve.deployment(name="ClipScorer", max_ongoing_requests=SCORER_MAX_ONGOING_REQUESTS, ray_actor_options={"num_cpus": 1})
class ClipScorer:
    """Scores a batch of images against a prompt with every enabled `scorers:` entry: one forward
    pass per scorer for all of them (deployments.scoring.families), merged per image.

    Each image gets one dict (see README, "Scores"): the flat gate scores the scorers compute
    (`alignment`, `aesthetic`, `laion`, `hps`, `pickscore`; ranges in deployments.names.SCORE_RANGES),
    `combined` (their weighted mean, each scaled to 0-1 over its range), `aspects` (from the clip
    scorer) and `perceptual` ({brightness, contrast, saturation, sharpness} from the pixels).
    The deployment keeps its name (`deployments.ClipScorer` in configs) whatever scorers it holds.
    """

    def __init__(self, config: ScoringConfig | ScorerConfig, metrics: bool = True):
        config = scoring_config(config)
        self._config = config
        self._placement = resolve_placement(config.scorers[0].device)
        self._metrics = ModelMetrics("clip", self._placement.device, enabled=metrics)
        self._scorers = [get_scorer_family(entry.family).load(entry, resolve_placement(entry.device))
                         for entry in config.scorers]
        # Device time is the towers' forward passes, on one meter for the replica's one device: each
        # image's resize and each prompt's tokenising are CPU work around the model (docs/benchmarks.md).
        self._meter = BusyMeter()
        for scorer in self._scorers:
            scorer.tower.meter = self._meter
        self._pixels_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="perceptual")
        self._default_weights = CombinedWeights(**dict.fromkeys(default_combined(self.gate_metrics), 1.0))
        batching = config.batching
        # Per instance, as in ImageGenerator: Serve's batch queue belongs to the function it decorates
        # (and reads its replica's settings, so in process calls simply run one by one).
        self._batched = serve.batch(
            max_batch_size=batching.max_batch_images, batch_wait_timeout_s=batching.wait_ms / 1000,
            batch_size_fn=lambda calls: sum(len(images) for images, _, _ in calls),
        )(self._score_batch) if batching.enabled and in_serve_replica() else None

    @property
    def gate_metrics(self) -> tuple[str, ...]:
        """The flat scores this replica computes, `combined` included."""
        computed = {metric for scorer in self._scorers for metric in scorer.metrics} | {"combined"}
        return tuple(metric for metric in GATE_METRICS if metric in computed)

    @property
    def input_size(self) -> int:
        """The largest side any scorer's CLIP sees (each resizes the shorter side to its own and crops)."""
        return max(scorer.tower.input_size for scorer in self._scorers)

    async def score(self, images: GenerationOutput | np.ndarray | Sequence[np.ndarray], prompt: str,
                    weights: CombinedWeights | Mapping[str, float] | None = None) -> list[dict]:
        """One dict of scores per image, in order. Accepts a generator's output directly, an
        (N, H, W, 3) uint8 array, or a list of (H, W, 3) uint8 arrays of any sizes.

        `weights`: of the `combined` score; None weighs aesthetic, alignment and laion equally (where computed)."""
        array = images.images if isinstance(images, GenerationOutput) else images
        if isinstance(weights, Mapping):
            weights = CombinedWeights(**weights)
        images, weights = _image_list(array), weights or self._default_weights
        if self._batched is not None and len(images) <= self._config.batching.max_batch_images:
            return await self._batched((images, prompt, weights))
        return await asyncio.to_thread(self._score, images, [prompt] * len(images), [weights] * len(images))

    async def score_video(self, frames: np.ndarray, prompt: str | None,
                          weights: CombinedWeights | Mapping[str, float] | None = None) -> dict:
        """Sampled frames of one video (uint8 (N, H, W, 3), in order): each frame's scores against
        `prompt` (none without a prompt) and the temporal consistency, the mean cosine similarity of
        consecutive frames' CLIP image embeddings (1: identical frames; None for a single frame)."""
        frames_list = _image_list(frames)
        scores = await self.score(frames_list, prompt, weights) if prompt else []
        consistency = await asyncio.to_thread(self._temporal_consistency, frames_list)
        return {"frames": scores, "temporal_consistency": consistency}

    def _temporal_consistency(self, frames: list[np.ndarray]) -> float | None:
        """Mean frame-to-frame cosine of the first scorer's image embeddings (the clip scorer's, by default)."""
        import torch

        if len(frames) < 2:
            return None
        with self._metrics.track(self._meter), torch.inference_mode():
            features = self._scorers[0].tower.images(frames).float()
        return float((features[1:] * features[:-1]).sum(-1).mean())

    async def _score_batch(self, calls: list[tuple[list[np.ndarray], str, CombinedWeights]]) -> list[list[dict]]:
        """Serve's batch handler: every call's images in one forward pass, each against its own prompt."""
        images = [image for call_images, _, _ in calls for image in call_images]
        prompts = [prompt for call_images, prompt, _ in calls for _ in call_images]
        weights = [weight for call_images, _, weight in calls for _ in call_images]
        scores = await asyncio.to_thread(self._score, images, prompts, weights)
        results, offset = [], 0
        for call_images, _, _ in calls:
            results.append(scores[offset:offset + len(call_images)])
            offset += len(call_images)
        return results

    def _score(self, images: list[np.ndarray], prompts: list[str], weights: list[CombinedWeights]) -> list[dict]:
        """Scores of image i against prompts[i], combined with weights[i]."""
        started = time.perf_counter()
        # The pixel checks run on a second thread while the scorers preprocess and run (numpy, PIL and
        # torch release the GIL), so on a GPU they overlap the forward passes instead of adding to them.
        perceptual_future = self._pixels_pool.submit(lambda: [perceptual_scores(image) for image in images])
        merged: list[dict] = [{} for _ in images]
        with self._metrics.track(self._meter):
            for scorer in self._scorers:
                for into, scores in zip(merged, scorer.score(images, prompts)):
                    into.update(scores)
        perceptual = perceptual_future.result()
        results = []
        for index, scores in enumerate(merged):
            flat = {metric: scores[metric] for metric in GATE_METRICS if metric in scores}
            flat["combined"] = combined_score(flat, weights[index])
            if "aspects" in scores:
                flat["aspects"] = scores["aspects"]
            flat["perceptual"] = perceptual[index]
            results.append(flat)
        logger.debug("scored %d images in %.3fs", len(images), time.perf_counter() - started)
        return results

    def info(self) -> dict:
        clip = next((scorer for scorer in self._scorers if scorer.family == "clip"), None)
        first = self._config.scorers[0]
        return {
            "source": first.source,
            "device": self._placement.device,
            "dtype": self._placement.dtype_name,
            "memory_fraction": self._placement.memory_fraction,
            "laion_head": clip.laion_source if clip is not None else None,
            "input_size": self.input_size,
            "scores": {name: list(SCORE_RANGES[name]) for name in self.gate_metrics},
            "aspects": {name: list(ASPECT_RANGE) for name in ASPECTS} if clip is not None else {},
            "perceptual": {name: [low, None if high == float("inf") else high]
                           for name, (low, high) in PERCEPTUAL_RANGES.items()},
            "scorers": [scorer.info() for scorer in self._scorers],
        }

    async def device_time(self) -> dict:
        """This replica's model-call totals, as the generators give them (`genserve bench` reads both)."""
        return self._metrics.device_time()

    def check_health(self) -> None:
        for scorer in self._scorers:
            check_device_health(scorer.tower.placement)


def _image_list(images) -> list[np.ndarray]:
    """uint8 (H, W, 3) arrays from an (N, H, W, 3) array or a sequence of (H, W, 3) arrays."""
    if isinstance(images, np.ndarray) and images.ndim == 4:
        listed = list(images)
    elif isinstance(images, (list, tuple)):
        listed = [np.asarray(image) for image in images]
    else:
        shape = getattr(images, "shape", None)
        raise ValueError(f"images must be uint8 of shape (N, H, W, 3) or a list of (H, W, 3); got shape {shape}")
    if not listed:
        raise ValueError("images must hold at least one image")
    for image in listed:
        if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
            raise ValueError(f"images must be uint8 of shape (N, H, W, 3); got {image.dtype} {image.shape}")
    return listed
