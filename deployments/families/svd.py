"""Stable Video Diffusion (image-to-video): a spatio-temporal UNet conditioned on one image.

It animates an image; text-to-video goes through a keyframe that an image model draws first (the
image graph, scored and regenerated like any image). img2vid-xt makes 25 frames, img2vid 14 (set
`default_num_frames: 14` for it); both take up to 25. Its own request parameters are the motion
bucket (more motion when higher), the noise added to the conditioning image, and how many frames
the VAE decodes at once.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from deployments.families.video_base import FrameRule, LoadedVideoModel, SizeRule, VideoFamily


class SvdParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    motion_bucket_id: int = Field(127, ge=0, le=255, description="More motion when higher.")
    noise_aug_strength: float = Field(0.02, ge=0, le=1, description="Noise added to the image; more = freer motion.")
    decode_chunk_size: int | None = Field(
        None, ge=1, le=25, description="Frames decoded at once (lower = less memory); default: options.decode_chunk_size."
    )


class SvdOptions(BaseModel):
    """Memory tiers, from fastest to leanest (the seed guide's tiers).

    - whole model on the GPU: `offload: none` (fastest; SVD-XT needs the most memory);
    - `offload: model`: each sub-model moves to the GPU only while it runs (accelerate);
    - `offload: sequential`: layer by layer (slowest, least memory);
    - `unet_forward_chunking`: feed-forward layers run in chunks (less peak memory, a bit slower);
    - `decode_chunk_size`: frames the VAE decodes at once (lower uses less memory).
    Offloading moves weights between CPU and GPU, so it only applies when the model runs on CUDA.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    offload: Literal["none", "model", "sequential"] = Field("none", description="CPU offload tier on CUDA.")
    unet_forward_chunking: bool = Field(False, description="Chunk the UNet's feed-forward layers.")
    decode_chunk_size: int = Field(8, ge=1, le=25, description="Frames decoded at once when a request gives none.")


class LoadedSvd(LoadedVideoModel):
    def __call__(self, params, image, generator, callback):
        from PIL import Image

        own = self.request_params(params)
        return self.run_pipeline(
            self.pipeline, params, generator, callback,
            image=Image.fromarray(image),
            fps=params.fps,
            motion_bucket_id=own.motion_bucket_id,
            noise_aug_strength=own.noise_aug_strength,
            decode_chunk_size=own.decode_chunk_size or self.options.decode_chunk_size,
        )

    def info(self) -> dict:
        return {"model_num_frames": int(self.pipeline.unet.config.num_frames)}


class SvdFamily(VideoFamily):
    name = "svd"
    description = "Stable Video Diffusion: animates one image (text-to-video through a keyframe); up to 25 frames."
    pipeline_class = "StableVideoDiffusionPipeline"
    image_to_video = True
    text_to_video = "keyframe"
    frames = FrameRule(2, 25)
    # 8x VAE and three UNet downsamplings.
    size = SizeRule(256, 2048, 64)
    default_size = (1024, 576)
    default_frames = 25
    default_fps = 7
    min_steps, max_steps, default_steps = 1, 100, 25
    Params = SvdParams
    Options = SvdOptions
    loaded_class = LoadedSvd
    # Stable Video Diffusion's repos publish fp16 files beside the fp32 ones.
    weight_variants = {"float16": "fp16", "bfloat16": "fp16"}

    def build_tiny(self, seed: int = 0, config=None):
        from deployments.runtime.tiny import build_tiny_svd

        return build_tiny_svd(seed)

    def place(self, pipeline, options, placement):
        if options.unet_forward_chunking:
            pipeline.unet.enable_forward_chunking()
        return super().place(pipeline, options, placement)


FAMILY = SvdFamily()
