"""What the human-preference scorers share (HPSv2.1, PickScore v1): a CLIP-H tower fine-tuned on
people's choices between images, scoring an image by its embedding's agreement with the prompt's.

Each gives one metric: `scale` x cosine(image, prompt), clipped at 0 (HPSv2.1's own score is the
bare cosine, PickScore's the model's logit scale times it). With `alignment: true` the same tower
also gives CLIPScore `alignment` (100 x the cosine), so one replica holding one CLIP-H can serve
alignment and preference together; then the clip entry sets `alignment: false`.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field

from deployments.config import ScorerEntry
from deployments.scoring.families.base import ClipTower, LoadedScorer, ScorerFamily

# The tokenizer and image processor of OpenCLIP ViT-H-14 (laion2B): what both preference models use.
VIT_H_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


class PreferenceOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    processor: str = Field(VIT_H_PROCESSOR, min_length=1,
                           description="Hub id or local folder of the CLIP tokenizer and image processor "
                                       "(ignored for source: tiny).")
    alignment: bool = Field(False, description="Also compute `alignment` (CLIPScore) through this tower.")


class PreferenceLoaded(LoadedScorer):
    def __init__(self, family: str, metric: str, metrics: tuple[str, ...], tower: ClipTower, logit_scaled: bool):
        super().__init__(family, metrics, tower)
        self.metric = metric
        self.scale = tower.logit_scale if logit_scaled else 1.0

    def score(self, images, prompts):
        import torch

        tower = self.tower
        with torch.inference_mode():
            image_features = tower.images(images)
            prompt_features = tower.prompts(prompts)
            cosine = (image_features * prompt_features).sum(-1).float()
            preference = (self.scale * cosine).clamp(min=0.0).cpu()
            alignment = tower.alignment(image_features, prompt_features) if "alignment" in self.metrics else None
        results = []
        for index in range(len(images)):
            scores = {self.metric: float(preference[index])}
            if alignment is not None:
                scores["alignment"] = float(alignment[index])
            results.append(scores)
        return results


class PreferenceFamily(ScorerFamily):
    """A preference scorer family: its metric, and whether the score is logit-scaled."""

    metric: ClassVar[str] = ""
    logit_scaled: ClassVar[bool] = False
    Options = PreferenceOptions

    def metrics(self, entry: ScorerEntry) -> tuple[str, ...]:
        return (self.metric,) + (("alignment",) if self.options_of(entry).alignment else ())

    def tower(self, entry: ScorerEntry, placement) -> ClipTower:
        raise NotImplementedError

    def load(self, entry: ScorerEntry, placement) -> PreferenceLoaded:
        return PreferenceLoaded(self.name, self.metric, self.metrics(entry), self.tower(entry, placement),
                                self.logit_scaled)
