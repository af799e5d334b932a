"""PickScore v1 (yuvalkirstain/PickScore_v1): a CLIP-H fine-tuned on Pick-a-Pic's human choices.

It is a transformers `CLIPModel` as published, loaded with `from_pretrained`; its tokenizer and
image processor are OpenCLIP ViT-H-14's (`options.processor`), as its model card loads them.
`pickscore` = the model's logit scale (100) x cosine(image, prompt), clipped at 0 (range 0-100;
about 18-24 for real images). Its model card states no licence, so the profiles list it with
`enabled: false`: enable it only once you have the right to use the weights.
"""

from __future__ import annotations

from deployments.config import TINY, ScorerEntry
from deployments.scoring.families.base import ClipTower, processor_parts
from deployments.scoring.families.preference import PreferenceFamily

TINY_SEED = 2  # a tiny tower of its own, distinct from the clip and hps ones


class PickScoreFamily(PreferenceFamily):
    name = "pickscore"
    metric = "pickscore"
    logit_scaled = True
    description = "PickScore v1: human preference (Pick-a-Pic), 100 x cosine of a fine-tuned CLIP-H"
    licence = "none stated on the model card (yuvalkirstain/PickScore_v1): disabled by default"

    def weight_sources(self, entry: ScorerEntry) -> list:
        from deployments.runtime.weights import WeightSource

        options = self.options_of(entry)
        return [WeightSource("PickScore", entry.source, "transformers"),
                WeightSource("PickScore processor", options.processor, "processor")][:1 if entry.source == TINY else 2]

    def save_tiny(self, folder, seed: int = TINY_SEED) -> None:
        """A CLIPModel folder with its processor: load it with `source: <folder>`, `options: {processor: <folder>}`."""
        from deployments.runtime.tiny import build_tiny_clip

        for part in build_tiny_clip(seed).values():
            part.save_pretrained(folder)

    def tower(self, entry: ScorerEntry, placement) -> ClipTower:
        from deployments.runtime.loading import is_tiny, pretrained_location

        if is_tiny(entry.source):
            from deployments.runtime.tiny import build_tiny_clip

            parts = build_tiny_clip(TINY_SEED)
            return ClipTower(parts["model"], parts["tokenizer"], parts["image_processor"], placement)
        from transformers import CLIPModel

        model = CLIPModel.from_pretrained(pretrained_location(entry.source), dtype=placement.dtype)
        processor = self.options_of(entry).processor
        return ClipTower(model, **processor_parts(pretrained_location(processor)), placement=placement)


FAMILY = PickScoreFamily()
