"""The CLIP scorer: CLIPScore alignment, the aesthetic and aspect text pairs, the LAION aesthetic head.

Per image (see README, "Scores"):
- `alignment`: CLIPScore, 100 x cosine(image, prompt), clipped at 0 (range 0-100); off with
  `options.alignment: false` when another scorer's tower serves it.
- `aesthetic`: the probability CLIP gives the "beautiful" text over the "ugly" one, a softmax of
  the model's own logit scale times both cosines (range 0-1).
- `laion` (when `laion.enabled`): the LAION improved-aesthetic-predictor's rating of the
  L2-normalised image embedding, clipped to 1-10.
- `aspects`: {composition, lighting, colors, sharpness, style}, each scored like `aesthetic`.
The pair texts are embedded once, at load. Weights: openai/clip-vit-large-patch14 (MIT); the
public LAION head (MIT).
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

from pydantic import Field

from deployments.config import TINY, ClipOptions, ScorerEntry
from deployments.names import ASPECTS
from deployments.scoring.families.base import ClipTower, LoadedScorer, ScorerFamily, processor_parts

logger = logging.getLogger("ray.serve")


class Options(ClipOptions):
    alignment: bool = Field(True, description="Compute `alignment` here; false when an hps or pickscore entry "
                                              "serves it through its own CLIP-H tower.")


def load_tower(source: str, placement, seed: int = 0) -> ClipTower:
    """A CLIPModel with its tokenizer and image processor: `from_pretrained`, or tiny random weights."""
    from deployments.runtime.loading import is_tiny, pretrained_location

    if placement.simulated is not None:
        from deployments.runtime.sim.models import simulated_clip_parts

        parts = simulated_clip_parts(source, placement)
    elif is_tiny(source):
        from deployments.runtime.tiny import build_tiny_clip

        parts = build_tiny_clip(seed)
    else:
        from transformers import CLIPModel

        location = pretrained_location(source)
        parts = {"model": CLIPModel.from_pretrained(location, dtype=placement.dtype, use_safetensors=True),
                 **processor_parts(location)}
    return ClipTower(parts["model"], parts["tokenizer"], parts["image_processor"], placement)


def _prompt_features(tower: ClipTower, prompts: list[str]):
    import torch

    with torch.inference_mode():
        return tower.prompts(prompts)


class ClipLoaded(LoadedScorer):
    def __init__(self, entry: ScorerEntry, options: Options, placement):
        import torch

        from deployments.scoring.laion_head import load_head

        tower = load_tower(entry.source, placement)
        super().__init__("clip", FAMILY.metrics(entry), tower)
        self.options = options
        self._texts = ThreadPoolExecutor(1, thread_name_prefix="clip-prompts")
        self.laion_source = options.laion_source_for(entry.source) if options.laion.enabled else None
        self.head = None
        if options.laion.enabled:
            width = int(tower.model.config.projection_dim)
            # A simulated CLIP's embeddings are placeholders: a random head rates them, no weights are fetched.
            source = TINY if placement.simulated is not None else self.laion_source
            self.head = load_head(options.laion, source, width).to(placement.torch_device)
        # Pairs of (positive, negative) texts: the aesthetic one first, then one per aspect.
        pairs = [(options.aesthetic_positive, options.aesthetic_negative)]
        pairs += [(getattr(options.aspects, aspect).positive, getattr(options.aspects, aspect).negative)
                  for aspect in ASPECTS]
        with torch.inference_mode():
            self.pair_texts = tower.texts([text for pair in pairs for text in pair])
        logger.info("CLIP scorer loaded from %s on %s (LAION head: %s)", entry.source, placement.device,
                    self.laion_source or "off")

    def score(self, images, prompts):
        import torch

        from deployments.scoring.laion_head import LAION_RANGE

        tower = self.tower
        # The prompts' embeddings are computed on a second thread while this one prepares the images
        # (CLIP's resize of a 1024x1024 image is tens of ms of CPU): on a GPU the text tower runs
        # meanwhile instead of after. inference_mode is per thread, so each enters its own.
        texts = self._texts.submit(_prompt_features, tower, prompts) if self.options.alignment else None
        with torch.inference_mode():
            image_features = tower.images(images)
            alignment = tower.alignment(image_features, texts.result()) if texts is not None else None
            logits = tower.logit_scale * image_features @ self.pair_texts.T  # (N, 2 x pairs)
            pair_scores = logits.float().reshape(len(images), -1, 2).softmax(dim=-1)[..., 0].cpu()
            laion = None
            if self.head is not None:
                laion = self.head(image_features.float()).squeeze(-1).clamp(*LAION_RANGE).cpu()
        results = []
        for index in range(len(images)):
            scores: dict = {"aesthetic": float(pair_scores[index, 0])}
            if alignment is not None:
                scores["alignment"] = float(alignment[index])
            if laion is not None:
                scores["laion"] = float(laion[index])
            scores["aspects"] = {aspect: float(pair_scores[index, 1 + i]) for i, aspect in enumerate(ASPECTS)}
            results.append(scores)
        return results

    def info(self) -> dict:
        return {**super().info(), "laion_head": self.laion_source}


class ClipFamily(ScorerFamily):
    name = "clip"
    description = "CLIPScore alignment, CLIP's aesthetic and aspect text pairs, the LAION aesthetic head"
    licence = "MIT (openai/clip-vit-large-patch14; the LAION improved-aesthetic-predictor head)"
    Options = Options

    def metrics(self, entry: ScorerEntry) -> tuple[str, ...]:
        options = self.options_of(entry)
        return (("alignment",) if options.alignment else ()) + ("aesthetic",) \
            + (("laion",) if options.laion.enabled else ())

    def weight_sources(self, entry: ScorerEntry) -> list:
        from deployments.runtime.weights import WeightSource

        options = self.options_of(entry)
        found = [WeightSource("CLIP scorer", entry.source, "transformers")]
        if options.laion.enabled:
            found.append(WeightSource("LAION aesthetic head", options.laion_source_for(entry.source), "file",
                                      filename=options.laion.filename))
        return found

    def load(self, entry: ScorerEntry, placement) -> ClipLoaded:
        return ClipLoaded(entry, self.options_of(entry), placement)


FAMILY = ClipFamily()
