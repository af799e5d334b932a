"""CLIP scoring deployment: how well each image matches its prompt, and how good it looks."""

from __future__ import annotations

import asyncio
import logging
import time

import numpy as np
from ray import serve

from deployments.config import ScorerConfig
from deployments.loading import check_device_health, is_tiny, pretrained_location, resolve_placement
from deployments.metrics import ModelMetrics
from deployments.types import GenerationOutput

logger = logging.getLogger("ray.serve")

SCORE_RANGES = {
    "alignment": (0.0, 100.0),
    "aesthetic": (0.0, 1.0),
}


def load_clip(config: ScorerConfig, placement) -> dict:
    """CLIPModel, tokenizer and image processor: `from_pretrained` or the tiny factory."""
    if is_tiny(config.source):
        from deployments.tiny import build_tiny_clip

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


@serve.deployment(name="ClipScorer", max_ongoing_requests=8, ray_actor_options={"num_cpus": 1})
class ClipScorer:
    """Scores a batch of images against a prompt in one forward pass.

    - `alignment`: CLIPScore, 100 x cosine(image, prompt), clipped at 0 (range 0-100).
    - `aesthetic`: the probability CLIP gives the "beautiful" text over the "ugly" one, i.e. a
      softmax of the model's own logit scale times both cosines (range 0-1). The text embeddings
      of both sides are computed once, when the replica starts.
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
        with torch.inference_mode():
            self._aesthetic_texts = self._embed_texts([config.aesthetic_positive, config.aesthetic_negative])
            self._logit_scale = float(self._model.logit_scale.exp())
        logger.info("CLIP scorer loaded from %s on %s", config.source, self._placement.device)

    async def score(self, images: GenerationOutput | np.ndarray, prompt: str) -> list[dict[str, float]]:
        """One dict of scores per image, in order. Accepts a generator's output directly."""
        array = images.images if isinstance(images, GenerationOutput) else images
        return await asyncio.to_thread(self._score, np.asarray(array), prompt)

    def _embed_texts(self, texts: list[str]):
        tokens = self._tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(self._placement.device)
        features = self._model.get_text_features(**tokens).pooler_output
        return features / features.norm(dim=-1, keepdim=True)

    def _score(self, images: np.ndarray, prompt: str) -> list[dict[str, float]]:
        import torch

        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 of shape (N, H, W, 3); got {images.dtype} {images.shape}")
        started = time.perf_counter()
        pixels = self._image_processor(images=list(images), return_tensors="pt").pixel_values
        with self._metrics.track(), torch.inference_mode():
            pixels = pixels.to(device=self._placement.device, dtype=self._placement.dtype)
            image_features = self._model.get_image_features(pixel_values=pixels).pooler_output
            image_features = image_features / image_features.norm(dim=-1, keepdim=True)
            prompt_features = self._embed_texts([prompt])
            alignment = (100.0 * image_features @ prompt_features.T).squeeze(-1).clamp(min=0.0)
            logits = self._logit_scale * image_features @ self._aesthetic_texts.T
            aesthetic = logits.float().softmax(dim=-1)[:, 0]
        logger.debug("scored %d images in %.3fs", len(images), time.perf_counter() - started)
        return [
            {"alignment": float(a), "aesthetic": float(b)}
            for a, b in zip(alignment.float().cpu(), aesthetic.cpu())
        ]

    def info(self) -> dict:
        return {
            "source": self._config.source,
            "device": self._placement.device,
            "dtype": self._placement.dtype_name,
            "memory_fraction": self._placement.memory_fraction,
            "scores": {name: list(bounds) for name, bounds in SCORE_RANGES.items()},
        }

    def check_health(self) -> None:
        check_device_health(self._placement)
