"""CLIP scoring deployment: how well each image matches its prompt, and how good it looks."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from ray import serve

from deployments.config import SCORER_MAX_ONGOING_REQUESTS, TINY, CombinedWeights, ScorerConfig

# Re-exported: the scorer's callers read the score names from here or from deployments.names.
from deployments.names import ASPECTS, COMBINABLE, GATE_METRICS, SCORE_RANGES  # noqa: F401
from deployments.runtime.loading import (
    check_device_health,
    in_serve_replica,
    is_tiny,
    pretrained_location,
    resolve_placement,
)
from deployments.runtime.metrics import ModelMetrics
from deployments.runtime.types import GenerationOutput
from deployments.scoring.laion_head import LAION_RANGE, load_head
from deployments.scoring.perceptual import PERCEPTUAL_RANGES, perceptual_scores

logger = logging.getLogger("ray.serve")

ASPECT_RANGE = (0.0, 1.0)


def load_clip(config: ScorerConfig, placement) -> dict:
    """CLIPModel, tokenizer and image processor: `from_pretrained` or the tiny factory."""
    if placement.simulated is not None:
        from deployments.runtime.sim.models import simulated_clip_parts

        return simulated_clip_parts(config.source, placement)
    if is_tiny(config.source):
        from deployments.runtime.tiny import build_tiny_clip

        parts = build_tiny_clip()
    else:
        from transformers import CLIPModel, CLIPTokenizer
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        # The PIL image processor needs no torchvision (none builds for these CPU wheels).
        location = pretrained_location(config.source)
        parts = {
            "model": CLIPModel.from_pretrained(location, dtype=placement.dtype, use_safetensors=True),
            "tokenizer": CLIPTokenizer.from_pretrained(location),
            "image_processor": CLIPImageProcessorPil.from_pretrained(location),
        }
    parts["model"] = parts["model"].to(device=placement.device, dtype=placement.dtype).eval()
    return parts


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


@serve.deployment(name="ClipScorer", max_ongoing_requests=SCORER_MAX_ONGOING_REQUESTS, ray_actor_options={"num_cpus": 1})
class ClipScorer:
    """Scores a batch of images against a prompt: one CLIP forward pass for all of them.

    Each image gets one dict (see README, "Scores"):
    - `alignment`: CLIPScore, 100 x cosine(image, prompt), clipped at 0 (range 0-100).
    - `aesthetic`: the probability CLIP gives the "beautiful" text over the "ugly" one, i.e. a
      softmax of the model's own logit scale times both cosines (range 0-1).
    - `laion` (when `laion.enabled`): the LAION improved-aesthetic-predictor's rating of the
      L2-normalised image embedding, clipped to 1-10.
    - `combined`: weighted mean of the above, each scaled to 0-1 over its range (0-1).
    - `aspects`: {composition, lighting, colors, sharpness, style}, each scored like `aesthetic`
      with its own pair of texts (range 0-1).
    - `perceptual`: {brightness, contrast, saturation, sharpness} from the pixels (deployments.scoring.perceptual).
    All text embeddings but the prompt's are computed once, when the replica starts.
    """

    def __init__(self, config: ScorerConfig, metrics: bool = True):
        import torch

        self._config = config
        self._placement = resolve_placement(config.device)
        self._metrics = ModelMetrics("clip", self._placement.device, enabled=metrics)
        parts = load_clip(config, self._placement)
        self._model = parts["model"]
        self._tokenizer = parts["tokenizer"]
        self._image_processor = parts["image_processor"]
        self._head = None
        if config.laion.enabled:
            width = int(self._model.config.projection_dim)
            # A simulated CLIP's embeddings are placeholders: a random head rates them, no weights are fetched.
            source = TINY if self._placement.simulated is not None else config.laion_source
            self._head = load_head(config.laion, source, width).to(self._placement.torch_device)
        # Pairs of (positive, negative) texts: the aesthetic one first, then one per aspect.
        pairs = [(config.aesthetic_positive, config.aesthetic_negative)]
        pairs += [(getattr(config.aspects, aspect).positive, getattr(config.aspects, aspect).negative)
                  for aspect in ASPECTS]
        with torch.inference_mode():
            self._pair_texts = self._embed_texts([text for pair in pairs for text in pair])
            self._logit_scale = float(self._model.logit_scale.exp())
        self._pixels_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="perceptual")
        self._default_weights = CombinedWeights(**{metric: 1.0 for metric in self.gate_metrics if metric in COMBINABLE})
        batching = config.batching
        # Per instance, as in ImageGenerator: Serve's batch queue belongs to the function it decorates
        # (and reads its replica's settings, so in process calls simply run one by one).
        self._batched = serve.batch(
            max_batch_size=batching.max_batch_images, batch_wait_timeout_s=batching.wait_ms / 1000,
            batch_size_fn=lambda calls: sum(len(images) for images, _, _ in calls),
        )(self._score_batch) if batching.enabled and in_serve_replica() else None
        logger.info("CLIP scorer loaded from %s on %s (LAION head: %s)", config.source, self._placement.device,
                    config.laion_source if self._head is not None else "off")

    @property
    def gate_metrics(self) -> tuple[str, ...]:
        """The flat scores this replica computes."""
        return tuple(metric for metric in GATE_METRICS if metric != "laion" or self._head is not None)

    @property
    def input_size(self) -> int:
        """The side CLIP sees: the image processor resizes the shorter side to it and crops a square."""
        size, crop = self._image_processor.size, self._image_processor.crop_size
        return int(max(size.get("shortest_edge") or 0, crop.get("height") or 0, crop.get("width") or 0))

    async def score(self, images: GenerationOutput | np.ndarray | Sequence[np.ndarray], prompt: str,
                    weights: CombinedWeights | Mapping[str, float] | None = None) -> list[dict]:
        """One dict of scores per image, in order. Accepts a generator's output directly, an
        (N, H, W, 3) uint8 array, or a list of (H, W, 3) uint8 arrays of any sizes.

        `weights`: of the `combined` score; None weighs every computed gate score equally."""
        array = images.images if isinstance(images, GenerationOutput) else images
        if isinstance(weights, Mapping):
            weights = CombinedWeights(**weights)
        images, weights = _image_list(array), weights or self._default_weights
        if self._batched is not None and len(images) <= self._config.batching.max_batch_images:
            return await self._batched((images, prompt, weights))
        return await asyncio.to_thread(self._score, images, [prompt] * len(images), [weights] * len(images))

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

    def _embed_texts(self, texts: list[str]):
        tokens = self._tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(self._placement.torch_device)
        features = self._model.get_text_features(**tokens).pooler_output
        return features / features.norm(dim=-1, keepdim=True)

    def _score(self, images: list[np.ndarray], prompts: list[str], weights: list[CombinedWeights]) -> list[dict]:
        """Scores of image i against prompts[i], combined with weights[i]."""
        import torch

        started = time.perf_counter()
        # The pixel checks run on a second thread while CLIP preprocesses and runs (numpy, PIL and
        # torch release the GIL), so on a GPU they overlap the forward pass instead of adding to it.
        perceptual_future = self._pixels_pool.submit(lambda: [perceptual_scores(image) for image in images])
        pixels = self._image_processor(images=images, return_tensors="pt").pixel_values
        with self._metrics.track(), torch.inference_mode():
            pixels = pixels.to(device=self._placement.torch_device, dtype=self._placement.dtype)
            image_features = self._model.get_image_features(pixel_values=pixels).pooler_output
            image_features = image_features / image_features.norm(dim=-1, keepdim=True)
            distinct = list(dict.fromkeys(prompts))  # each distinct prompt encoded once
            prompt_features = self._embed_texts(distinct)[[distinct.index(prompt) for prompt in prompts]]
            alignment = (100.0 * (image_features * prompt_features).sum(-1)).clamp(min=0.0).float().cpu()
            logits = self._logit_scale * image_features @ self._pair_texts.T  # (N, 2 x pairs)
            pair_scores = logits.float().reshape(len(images), -1, 2).softmax(dim=-1)[..., 0].cpu()
            laion = None
            if self._head is not None:
                laion = self._head(image_features.float()).squeeze(-1).clamp(*LAION_RANGE).cpu()
        perceptual = perceptual_future.result()
        results = []
        for index in range(len(images)):
            scores: dict = {"alignment": float(alignment[index]), "aesthetic": float(pair_scores[index, 0])}
            if laion is not None:
                scores["laion"] = float(laion[index])
            scores["combined"] = combined_score(scores, weights[index])
            scores["aspects"] = {aspect: float(pair_scores[index, 1 + i]) for i, aspect in enumerate(ASPECTS)}
            scores["perceptual"] = perceptual[index]
            results.append(scores)
        logger.debug("scored %d images in %.3fs", len(images), time.perf_counter() - started)
        return results

    def info(self) -> dict:
        return {
            "source": self._config.source,
            "device": self._placement.device,
            "dtype": self._placement.dtype_name,
            "memory_fraction": self._placement.memory_fraction,
            "laion_head": self._config.laion_source if self._head is not None else None,
            "input_size": self.input_size,
            "scores": {name: list(SCORE_RANGES[name]) for name in self.gate_metrics},
            "aspects": {name: list(ASPECT_RANGE) for name in ASPECTS},
            "perceptual": {name: [low, None if high == float("inf") else high]
                           for name, (low, high) in PERCEPTUAL_RANGES.items()},
        }

    async def device_time(self) -> dict:
        """This replica's model-call totals, as the generators give them (`genserve bench` reads both)."""
        return self._metrics.device_time()

    def check_health(self) -> None:
        check_device_health(self._placement)


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
