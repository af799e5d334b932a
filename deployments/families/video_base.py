"""What a video model family declares, and what a loaded video model of it does.

The video counterpart of `deployments.families.base`. A video family is one module with one
`VideoFamily` instance; a `video_models:` entry picks it (`family: svd`, `family: ltx`, or an import
path) and says where the weights are, its defaults and its memory options. The family says, as data:

- its capabilities: `image_to_video` (animates an uploaded image) and `text_to_video` ('native': the
  pipeline takes a prompt; 'keyframe': genserve draws a keyframe with an image model first and
  animates it; None: no text-to-video);
- its frame rule (`FrameRule`: SVD 2-25 frames; LTX-Video 8k+1) and size rule (`SizeRule`): a request
  breaking either gets a 422 naming the field and the rule, never a silently rounded video;
- its own request parameters (`Params`: SVD's motion bucket and noise augmentation, LTX's guidance
  and negative prompt), as a pydantic model with their defaults and ranges, declared only here: a
  request's fields beyond the common ones are checked against it
  (`serve_app.services.validation.VideoSpec`), GET /v1/models lists it (`param_schema`), and the
  published request schema documents the built-in families' parameters from it;
- its memory options (`Options`, validated from the entry's `options:`);
- how to build a tiny random-weight pipeline (`build_tiny`) and how to load the real one.

At run time the generic `deployments.video_generator.VideoGenerator` deployment calls
`family.load(config, placement)` and gets a `LoadedVideoModel`, which turns one `VideoParams` (and an
image, for image-to-video) into float frames.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict

from deployments.families.base import LoadedModel, NoOptions
from deployments.runtime.loading import denoiser_of, place_pipeline, store_weights

if TYPE_CHECKING:
    from deployments.config import VideoModelConfig
    from deployments.runtime.loading import Placement
    from deployments.runtime.types import VideoParams
    from deployments.runtime.weights import WeightSource


@dataclass(frozen=True)
class FrameRule:
    """Frame counts a family generates: `minimum`-`maximum`, and (n - 1) a multiple of `step`
    (step 1: any count; LTX-Video's causal VAE compresses 8 frames into one latent after the first,
    so its counts are 8k+1)."""

    minimum: int
    maximum: int
    step: int = 1

    def allows(self, frames: int) -> bool:
        return self.minimum <= frames <= self.maximum and (frames - 1) % self.step == 0

    def describe(self) -> str:
        if self.step == 1:
            return f"{self.minimum}-{self.maximum} frames"
        return f"{self.step}k+1 frames between {self.minimum} and {self.maximum}"

    def fewest(self) -> int:
        return next(count for count in range(self.minimum, self.maximum + 1) if self.allows(count))

    def nearest(self, frames: int) -> list[int]:
        """The allowed counts either side of `frames`, for the 422's suggestion; past either end, the
        end's count."""
        low = frames - (frames - 1) % self.step
        near = sorted({count for count in (low, low + self.step if low < frames else low) if self.allows(count)})
        if near:
            return near
        return [self.fewest()] if frames < self.minimum else [self.most()]

    def most(self) -> int:
        return next(count for count in range(self.maximum, self.minimum - 1, -1) if self.allows(count))


@dataclass(frozen=True)
class SizeRule:
    """Widths and heights a family generates: `minimum`-`maximum` pixels, a multiple of `multiple_of`
    (the VAE's downsampling times the transformer's patch size)."""

    minimum: int
    maximum: int
    multiple_of: int

    def allows(self, pixels: int) -> bool:
        return self.minimum <= pixels <= self.maximum and pixels % self.multiple_of == 0

    def describe(self) -> str:
        return f"a multiple of {self.multiple_of} between {self.minimum} and {self.maximum}"

    def smallest(self) -> int:
        return -(-self.minimum // self.multiple_of) * self.multiple_of

    def nearest(self, pixels: int) -> list[int]:
        """The allowed sizes either side of `pixels`, for the 422's suggestion."""
        low = pixels - pixels % self.multiple_of
        return sorted({size for size in (low, low + self.multiple_of) if self.allows(size)} or {self.smallest()})


class NoParams(BaseModel):
    """A family without request parameters of its own."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _inlined(schema, definitions: dict):
    """`schema` with each `$ref` to `definitions` replaced by the definition itself, so that one
    parameter's schema stands alone (in GET /v1/models, or inside another model's schema)."""
    if isinstance(schema, list):
        return [_inlined(item, definitions) for item in schema]
    if not isinstance(schema, dict):
        return schema
    if "$ref" in schema:
        return _inlined(definitions[schema["$ref"].rpartition("/")[2]], definitions)
    return {key: _inlined(value, definitions) for key, value in schema.items()}


class LoadedVideoModel(LoadedModel):
    """A family's pipeline(s), loaded on the device. Subclasses implement `__call__`."""

    family: "VideoFamily"
    config: "VideoModelConfig"

    def __call__(self, params: "VideoParams", image, generator, callback) -> Any:
        """Frames as floats (F, H, W, 3) in [0, 1]. `image`: uint8 (H, W, 3) at the video's size for
        image-to-video, None for native text-to-video. `params.options` holds the family's `Params`
        (read them with `request_params`)."""
        raise NotImplementedError

    def run_pipeline(self, pipeline, params: "VideoParams", generator, callback, **own) -> Any:
        """`pipeline` called with what every video family passes it (the request's size, frames and
        steps, the seeded generator, the step callback) and the family's `own` arguments: its frames
        as floats."""
        return pipeline(
            width=params.width,
            height=params.height,
            num_frames=params.num_frames,
            num_inference_steps=params.num_inference_steps,
            generator=generator,
            output_type="np",
            callback_on_step_end=callback,
            **own,
        ).frames[0]

    def request_params(self, params: "VideoParams") -> BaseModel:
        """The family's own parameters of this run as its `Params`, the family's defaults for any left
        out (a warm-up call, or a handle caller, may give none)."""
        return self.family.Params.model_validate(params.options)

    def info(self) -> dict:
        """What GET /v1/models shows of this replica beyond id, family, source, device and dtype."""
        return {}


class VideoFamily:
    """One family of video models. Subclass it, set the class attributes, instantiate once."""

    name: ClassVar[str]
    description: ClassVar[str]
    pipeline_class: ClassVar[str]
    image_to_video: ClassVar[bool] = True
    # 'native': the pipeline takes a prompt; 'keyframe': an image model draws the first frame.
    text_to_video: ClassVar[Literal["native", "keyframe"] | None] = None
    frames: ClassVar[FrameRule]
    size: ClassVar[SizeRule]
    default_size: ClassVar[tuple[int, int]]
    default_frames: ClassVar[int]
    default_fps: ClassVar[int] = 8
    min_steps: ClassVar[int] = 1
    max_steps: ClassVar[int] = 100
    default_steps: ClassVar[int] = 25
    # The family's own request parameters, with their defaults and ranges: the one place they are
    # declared. A request gives them as fields of POST /v1/videos beside the common ones, checked
    # strictly as request fields are ("5" is no int; give choices as Literal). Each needs a default.
    Params: ClassVar[type[BaseModel]] = NoParams
    # The entry's `options:` (memory options and the like).
    Options: ClassVar[type[BaseModel]] = NoOptions
    loaded_class: ClassVar[type[LoadedVideoModel]] = LoadedVideoModel
    # The weight variant published for a dtype (dtype name -> variant, e.g. float16 -> fp16), as for
    # image families: `genserve download` fetches it and loading asks for it when it is on disk.
    weight_variants: ClassVar[dict[str, str]] = {}

    # An entry's defaults: its own where it sets them, else this family's.

    def size_default(self, config: "VideoModelConfig") -> tuple[int, int]:
        width, height = self.default_size
        return (config.default_width or width, config.default_height or height)

    def frames_default(self, config: "VideoModelConfig") -> int:
        return config.default_num_frames or self.default_frames

    def fps_default(self, config: "VideoModelConfig") -> int:
        return config.default_fps or self.default_fps

    def steps_default(self, config: "VideoModelConfig") -> int:
        return config.default_steps or self.default_steps

    def check_entry(self, config: "VideoModelConfig") -> None:
        """Raise ValueError, naming the field, where the entry does not fit this family: its options,
        and its defaults against the size and frame rules and the step range. `AppArgs` runs it when
        the config loads."""
        try:
            self.options_of(config)
        except ValueError as error:
            raise ValueError(f"options for video family {self.name!r}: {error}") from None
        if config.device.simulated is not None:  # a simulated device models a published architecture
            from deployments.runtime.sim.flops import architecture_for

            architecture_for(config.source)
        for name, value in zip(("default_width", "default_height"), self.size_default(config)):
            if not self.size.allows(value):
                raise ValueError(f"{name} ({value}) breaks the {self.name} family's size rule: {self.size.describe()}")
        frames = self.frames_default(config)
        if not self.frames.allows(frames):
            raise ValueError(f"default_num_frames ({frames}) breaks the {self.name} family's frame "
                             f"rule: {self.frames.describe()}")
        steps = self.steps_default(config)
        if not self.min_steps <= steps <= self.max_steps:
            raise ValueError(f"default_steps ({steps}) must lie within the {self.name} family's "
                             f"{self.min_steps}-{self.max_steps}")

    def weight_sources(self, config: "VideoModelConfig") -> list["WeightSource"]:
        """Every set of weights a deployment of this entry loads (`genserve download` fetches them)."""
        from deployments.runtime.weights import WeightSource, variant_for

        return [WeightSource(f"{config.id} pipeline", config.source, "diffusers-pipeline",
                             variant_for(self.weight_variants, config.device.dtype))]

    def options_of(self, config: "VideoModelConfig") -> BaseModel:
        return self.Options.model_validate(config.options)

    def param_names(self) -> tuple[str, ...]:
        return tuple(self.Params.model_fields)

    def param_defaults(self) -> dict[str, Any]:
        return self.Params().model_dump()

    def param_schema(self) -> dict[str, dict]:
        """Each of the family's own parameters as a JSON schema: type, bounds, default, description."""
        schema = self.Params.model_json_schema()
        definitions = schema.get("$defs", {})
        return {name: {key: value for key, value in _inlined(field, definitions).items() if key != "title"}
                for name, field in schema.get("properties", {}).items()}

    def capabilities(self) -> dict:
        return {"image_to_video": self.image_to_video, "text_to_video": self.text_to_video,
                "frames": self.frames.describe(), "size": self.size.describe(), "params": list(self.param_names())}

    def build_tiny(self, seed: int = 0, config: "VideoModelConfig | None" = None):
        raise NotImplementedError(f"video family {self.name!r} has no tiny builder")

    def save_tiny(self, folder, seed: int = 0, config: "VideoModelConfig | None" = None) -> None:
        """Write the tiny pipeline in diffusers' layout, loadable like a hub checkpoint."""
        self.build_tiny(seed, config).save_pretrained(folder)

    def load_pipeline(self, config: "VideoModelConfig", placement: "Placement"):
        """`<pipeline_class>.from_pretrained` for hub ids and folders, `build_tiny` for 'tiny' (on the CPU;
        `place` moves it to the device or sets up offloading); the dtype's weight variant where it is on disk."""
        from deployments.runtime.loading import load_diffusers_pipeline
        from deployments.runtime.weights import local_variant

        variant = local_variant(config.source, self.weight_variants.get(placement.dtype_name))
        return load_diffusers_pipeline(self.pipeline_class, config.source, placement,
                                       lambda: self.build_tiny(config=config), variant)

    def place(self, pipeline, options: BaseModel, placement: "Placement"):
        """Move the pipeline to its device, or set up the CPU offload its `options` ask for."""
        return place_pipeline(pipeline, getattr(options, "offload", "none"), placement)

    def load(self, config: "VideoModelConfig", placement: "Placement") -> LoadedVideoModel:
        if placement.simulated is not None:  # modelled, nothing loaded (deployments.runtime.sim)
            from deployments.runtime.sim.pipeline import load_simulated_video

            return self.loaded_class(self, config, placement, load_simulated_video(config, placement))
        pipeline = self.load_pipeline(config, placement)
        store_weights(pipeline, denoiser_of(pipeline), config.memory.weights, placement)
        options = self.options_of(config)
        if not (config.memory.residency == "on_demand" and getattr(options, "offload", "none") == "none"):
            pipeline = self.place(pipeline, options, placement)  # an on-demand model waits in host RAM
        return self.loaded_class(self, config, placement, pipeline)
