"""Qwen-Image-Edit (2509 and later): Qwen-Image's MMDiT fine-tuned to edit by instruction from one to
three reference images (diffusers' `QwenImageEditPlusPipeline`), Apache-2.0.

Qwen2.5-VL reads each reference (scaled to about 384x384) beside the instruction, and the VAE
latents of each (scaled to about 1 MP) join the transformer's sequence; the prompt says what to
make of them ("put the cat from picture 1 on the sofa of picture 2", "make it night"). That is
`reference_images` and `instruction_edits`; there is no strength and no mask. Without references
the same modules run `QwenImagePipeline` (text-to-image), since the edit pipeline needs an image.

The pipeline takes one prompt per call, so a batch of different prompts runs one call per prompt.
Its processor is Qwen2-VL's, whose video part needs torchvision, which has no build for the CPU
torch here: the family builds the processor from its image processor and tokenizer alone
(`ImageOnlyQwen2VLProcessor`), for the tiny model and for published weights alike.
"""

from __future__ import annotations

from functools import cache

from deployments.families.base import AccelerationSupport, ImageFamily, LoraSignature, derived_pipeline
from deployments.families.qwen_image import (
    QWEN_PROMPT_FORM,
    LoadedQwenImage,
    QwenImageOptions,
    tiny_qwen_components,
)

# Qwen's model card: the 2509 edit model works best with one to three input images.
MAX_REFERENCE_IMAGES = 3


@cache
def image_only_processor_class():
    """`Qwen2VLProcessor` without its video processor: its attributes come from `__init__`'s
    signature, so a signature without `video_processor` makes a processor of the image processor and
    tokenizer alone (images in prompts work; videos, which the pipeline never passes, do not)."""
    from transformers import Qwen2VLProcessor

    class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    return ImageOnlyQwen2VLProcessor


def load_processor(location: str):
    """The processor of a published checkpoint (its `processor` folder): the PIL image processor
    (no torchvision) and the tokenizer, without the video processor."""
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = AutoTokenizer.from_pretrained(location, subfolder="processor")
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(location, subfolder="processor")
    return image_only_processor_class()(image_processor=image_processor, tokenizer=tokenizer,
                                        chat_template=getattr(tokenizer, "chat_template", None))


class LoadedQwenImageEdit(LoadedQwenImage):
    def __init__(self, family, config, placement, pipeline):
        super().__init__(family, config, placement, pipeline)
        # Text-to-image over the same modules (no weights loaded twice) for requests without references.
        self.text_pipeline = derived_pipeline("QwenImagePipeline", pipeline)

    def pipeline_kwargs(self, pipeline, params, prompts, generators, callback) -> dict:
        arguments = super().pipeline_kwargs(pipeline, params, prompts, generators, callback)
        if params.references:
            from PIL import Image

            arguments["image"] = [Image.fromarray(image) for image in params.references]
        return arguments

    def __call__(self, params, prompts, control, generators, callback):
        """One call per distinct prompt (the edit pipeline takes one), images in `prompts`' order."""
        import numpy as np

        pipeline = self.pipeline if params.references else self.text_pipeline
        images, start = [], 0
        while start < len(prompts):
            end = start
            while end < len(prompts) and prompts[end] == prompts[start]:
                end += 1
            images.append(pipeline(**self.pipeline_kwargs(pipeline, params, prompts[start:end], generators[start:end],
                                                          callback)).images)
            start = end
        return np.concatenate(images)


class QwenImageEditFamily(ImageFamily):
    name = "qwen-image-edit"
    description = (f"Qwen-Image-Edit: Qwen-Image's MMDiT edits by instruction from 1-{MAX_REFERENCE_IMAGES} reference "
                   "images (text-to-image without them); true classifier-free guidance with a negative prompt.")
    pipeline_class = "QwenImageEditPlusPipeline"
    Options = QwenImageOptions
    min_steps, max_steps, default_steps = 1, 100, 40
    guidance_range = (0.0, 20.0)
    default_guidance = 4.0
    default_size = (1024, 1024)
    negative_prompt = True
    loaded_class = LoadedQwenImageEdit
    reference_images = MAX_REFERENCE_IMAGES
    instruction_edits = True
    # The pipeline scales each reference to ~384x384 for Qwen2-VL, whose processor refuses a side under
    # 28 px (a ratio of the sides past ~180:1 there); 100:1 stays clear of it.
    reference_max_aspect = 100.0
    acceleration = AccelerationSupport(denoiser="transformer", repeated_blocks=True)
    prompt_form = QWEN_PROMPT_FORM
    # Edit LoRAs have Qwen-Image's tensor names; metadata naming the edit model tells them apart.
    lora = LoraSignature(metadata_prefixes=("qwen-image-edit", "qwen_image_edit"), precedence=2)

    def load_pipeline(self, config, placement):
        """Published weights with the processor built without its video part (`load_processor`)."""
        from deployments.runtime.loading import is_tiny, load_diffusers_pipeline, pretrained_location
        from deployments.runtime.weights import local_variant

        variant = local_variant(config.source, self.weight_variants.get(placement.dtype_name))
        components = {} if is_tiny(config.source) else {"processor": load_processor(pretrained_location(config.source))}
        return load_diffusers_pipeline(self.pipeline_class, config.source, placement,
                                       lambda: self.build_tiny(config=config), variant, **components).to(placement.device)

    def save_tiny(self, folder, seed: int = 0, config=None) -> None:
        """Diffusers' layout, its model_index.json naming the processor as the published checkpoints'
        does (transformers' Qwen2VLProcessor, which the image-only one is), so the folder loads the way
        a hub checkpoint does (`load_pipeline`)."""
        import json
        from pathlib import Path

        self.build_tiny(seed, config).save_pretrained(folder)
        index = Path(folder) / "model_index.json"
        entries = json.loads(index.read_text())
        entries["processor"] = ["transformers", "Qwen2VLProcessor"]
        index.write_text(json.dumps(entries, indent=2))

    def build_tiny(self, seed: int = 0, config=None):
        """A QwenImageEditPlusPipeline of the real classes with tiny random weights: Qwen-Image's tiny
        components with Qwen2-VL's image tokens, and the image-only processor."""
        from diffusers import QwenImageEditPlusPipeline
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        components = tiny_qwen_components(seed, vision=True)
        processor = image_only_processor_class()(image_processor=Qwen2VLImageProcessorPil(),
                                                 tokenizer=components["tokenizer"])
        return QwenImageEditPlusPipeline(processor=processor, **components)


FAMILY = QwenImageEditFamily()
