"""What a scorer family declares, and what a loaded scorer does.

A scorer family is one module with one `ScorerFamily` instance. It says, as data, which gate
metrics an entry of it computes (their ranges are `deployments.names.SCORE_RANGES`, defined once),
its licence, its `options:` model, which weights it needs, and how to load them (`load`, with
'tiny' building random weights offline). The scorer deployment (`ClipScorer`) loads every enabled
`scorers:` entry and merges what each computes, per image.

All built-in families score through a CLIP tower (`ClipTower`: a transformers `CLIPModel`, its
tokenizer and image processor): CLIPScore alignment and the aesthetic pairs on CLIP ViT-L/14, the
preference scores on the CLIP-H towers HPSv2.1 and PickScore fine-tuned. Any of those towers can
also serve `alignment` (option `alignment: true`), so one replica can hold a single CLIP-H.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict

from deployments.runtime.metrics import BusyMeter

if TYPE_CHECKING:
    from pathlib import Path

    from deployments.config import ScorerEntry
    from deployments.runtime.loading import Placement
    from deployments.runtime.weights import WeightSource


class NoScorerOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ClipTower:
    """A CLIP model with its tokenizer and image processor, placed on one device: L2-normalised
    image and text embeddings, in batches."""

    def __init__(self, model, tokenizer, image_processor, placement: Placement):
        self.model = model.to(device=placement.torch_device, dtype=placement.dtype).eval()
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.placement = placement
        # The forward passes' time, which the scorer records as device time: the resize and
        # tokenising before them are CPU work around the model, as a GPU would see them.
        self.meter = BusyMeter()
        self._halves = ThreadPoolExecutor(1, thread_name_prefix="clip-resize")

    @contextlib.contextmanager
    def _on_device(self):
        with self.meter.running():
            yield
            if str(self.placement.torch_device).startswith("cuda"):
                import torch

                torch.cuda.synchronize(self.placement.torch_device)

    @property
    def input_size(self) -> int:
        """The side CLIP sees: the processor resizes the shorter side to it and crops a square."""
        size, crop = self.image_processor.size, self.image_processor.crop_size
        return int(max(size.get("shortest_edge") or 0, crop.get("height") or 0, crop.get("width") or 0))

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().exp())

    def images(self, images: list[np.ndarray]):
        """(N, D) unit image embeddings (call under torch.inference_mode)."""
        images = [self._resized(image) for image in images]
        pixels = self.image_processor(images=images, return_tensors="pt").pixel_values
        with self._on_device():
            pixels = pixels.to(device=self.placement.torch_device, dtype=self.placement.dtype)
            features = self.model.get_image_features(pixel_values=pixels).pooler_output
            return features / features.norm(dim=-1, keepdim=True)

    def _resized(self, image: np.ndarray) -> np.ndarray:
        """`image` resized as the processor would (its shortest edge, its resampling), the two halves
        at once: PIL resizes a box of the image to those rows of the whole resize, freeing the GIL
        meanwhile, and the processor's own resize then has nothing left to do. A 1024x1024 image's
        resize is 15 ms of a 2-core machine's CPU on the request's path; halved, about 10 ms. The pixels
        are the same to the bit for every square size tried (512 to 2048); otherwise PIL's coefficients
        for a box may differ in the last bit, and some pixels by one level of 255.
        """
        from PIL import Image
        from transformers.image_transforms import get_resize_output_image_size

        processor = self.image_processor
        edge = (processor.size or {}).get("shortest_edge") if processor.do_resize else None
        if not edge or min(image.shape[:2]) < 2 * edge or image.dtype != np.uint8 or image.ndim != 3:
            return image  # small already (a tiny test image): nothing to gain
        height, width = get_resize_output_image_size(image, size=edge, default_to_square=False,
                                                     input_data_format="channels_last")
        rows = image.shape[0]
        # Split where an output row's edge falls on a whole source row: there PIL's coefficients for
        # the box are those of the whole resize (a fractional edge differs in the last bit).
        top = next((top for top in range(height // 2, height // 2 - 16, -1) if top > 0 and rows * top % height == 0),
                   None)
        if top is None:
            return image
        picture, split = Image.fromarray(image), rows * top // height

        def half(size: tuple[int, int], box: tuple[float, float, float, float]) -> np.ndarray:
            return np.asarray(picture.resize(size, processor.resample, box=box))

        lower = self._halves.submit(half, (width, height - top), (0, split, image.shape[1], rows))
        return np.concatenate([half((width, top), (0, 0, image.shape[1], split)), lower.result()])

    def texts(self, texts: list[str]):
        """(N, D) unit text embeddings; longer texts are cut at the tokenizer's length (77 for CLIP)."""
        tokens = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        with self._on_device():
            features = self.model.get_text_features(**tokens.to(self.placement.torch_device)).pooler_output
            return features / features.norm(dim=-1, keepdim=True)

    def prompts(self, prompts: list[str]):
        """Text embeddings of `prompts`, each distinct prompt encoded once."""
        distinct = list(dict.fromkeys(prompts))
        return self.texts(distinct)[[distinct.index(prompt) for prompt in prompts]]

    def alignment(self, image_features, prompt_features):
        """CLIPScore: 100 x cosine(image, prompt), clipped at 0 (range 0-100), one float tensor per image."""
        return (100.0 * (image_features * prompt_features).sum(-1)).clamp(min=0.0).float().cpu()


class LoadedScorer:
    """One `scorers:` entry, loaded: `score` gives, per image, a dict of the metrics it computes
    (flat floats; the clip family adds `aspects`). `tower` is its CLIP tower (the video frame
    similarity uses the first scorer's)."""

    def __init__(self, family: str, metrics: tuple[str, ...], tower: ClipTower):
        self.family = family
        self.metrics = metrics
        self.tower = tower

    def score(self, images: list[np.ndarray], prompts: list[str]) -> list[dict[str, Any]]:
        raise NotImplementedError

    def info(self) -> dict:
        return {"family": self.family, "metrics": list(self.metrics), "device": self.tower.placement.device,
                "dtype": self.tower.placement.dtype_name, "input_size": self.tower.input_size}


class ScorerFamily:
    """A kind of scorer: what it computes and how it loads."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    # The weights' licence as their publisher states it (GET /v1/models shows it).
    licence: ClassVar[str] = ""
    Options: ClassVar[type[BaseModel]] = NoScorerOptions

    def options_of(self, entry: ScorerEntry) -> BaseModel:
        return self.Options.model_validate(entry.options)

    def metrics(self, entry: ScorerEntry) -> tuple[str, ...]:
        """The gate metrics (deployments.names.GATE_METRICS) an entry of this family computes."""
        raise NotImplementedError

    def check_entry(self, entry: ScorerEntry) -> None:
        """Raise ValueError naming the option when the entry's options do not fit this family."""
        try:
            self.options_of(entry)
        except ValueError as error:  # pydantic's ValidationError names the option
            raise ValueError(f"options for scorer family {self.name!r}: {error}") from None

    def weight_sources(self, entry: ScorerEntry) -> list[WeightSource]:
        raise NotImplementedError

    def load(self, entry: ScorerEntry, placement: Placement) -> LoadedScorer:
        raise NotImplementedError

    def save_tiny(self, folder: Path, seed: int = 0) -> None:
        """Write a tiny scorer of this family in its published layout (`genserve save-tiny <family>`)."""
        raise NotImplementedError

    def public(self, entry: ScorerEntry) -> dict:
        """What GET /v1/models shows of an entry (no paths: a source may be a local folder)."""
        return {"family": self.name, "description": self.description, "licence": self.licence,
                "metrics": list(self.metrics(entry))}


def processor_parts(location: str) -> dict:
    """The CLIP tokenizer and (PIL) image processor saved in `location` (a folder or hub id)."""
    from transformers import CLIPTokenizer
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    # The PIL image processor needs no torchvision (none builds for these CPU wheels).
    return {"tokenizer": CLIPTokenizer.from_pretrained(location),
            "image_processor": CLIPImageProcessorPil.from_pretrained(location)}
