"""What each servable model accepts, and the request checks that depend on the model."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from deployments.config import ImageModelConfig, VideoModelConfig
from deployments.runtime.types import PromptForm
from serve_app.api.schemas import ControlOptions, ImageRequest, VideoRequest


class RequestError(ValueError):
    """A request field the chosen model or config cannot accept. The ingress answers 422."""

    status = 422

    def __init__(self, field: str, message: str, allowed: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.allowed = allowed

    def __reduce__(self):  # Ray pickles it back to a handle caller
        return (type(self), (self.field, self.message, self.allowed))

    def renamed(self, field: str) -> "RequestError":
        """The same error about `field` (where the request sits inside a larger one)."""
        return type(self)(field, self.message, self.allowed)

    def detail(self, prefix: tuple[str, ...] = ()) -> list[dict]:
        """The shape of schema errors (see serve_app.api.errors), so clients parse one format.

        `prefix`: where the request sits inside the body (("request",) in a job submission)."""
        field = ".".join((*prefix, self.field))
        # A nested field ("loras.0.name") gets pydantic's loc: ["body", "loras", 0, "name"].
        path = [int(part) if part.isdigit() else part for part in self.field.split(".")]
        return [{"loc": ["body", *prefix, *path], "msg": f"{field}: {self.message}", "type": self.kind,
                 "allowed": self.allowed}]

    kind = "value_error"


class PromptBlocked(RequestError):
    """The prompt contains a term of the configured blocklist: refused with 400, naming the field."""

    status = 400
    kind = "blocked"


@dataclass(frozen=True)
class ModelSpec:
    """What one served image model accepts: its config entry and family, resolved for the request path."""

    id: str
    family: str
    description: str
    min_steps: int
    max_steps: int
    default_steps: int
    default_width: int
    default_height: int
    guidance_range: tuple[float, float]
    default_guidance: float
    uses_negative_prompt: bool
    # The generator applies GenerationParams.loras (through deployments.runtime.lora.LoraManager); a
    # request naming LoRAs for a model without it gets 422 rather than an image without them.
    supports_loras: bool = False
    control_types: tuple[str, ...] = ()
    # How the enhancer's LLM writes prompts for this family (None: the neutral form).
    prompt_form: PromptForm | None = field(default=None, compare=False)

    @classmethod
    def of(cls, entry: ImageModelConfig) -> "ModelSpec":
        family = entry.model_family
        width, height = entry.size_default()
        guidance = entry.guidance_limits()
        return cls(
            id=entry.id,
            family=family.name,
            description=entry.description or family.description,
            min_steps=entry.step_limits()[0],
            max_steps=entry.step_limits()[1],
            default_steps=entry.steps_default(),
            default_width=width,
            default_height=height,
            guidance_range=guidance,
            default_guidance=entry.guidance_default(),
            # Diffusers runs classifier-free guidance only above a scale of 1.
            uses_negative_prompt=family.negative_prompt and guidance[1] > 1,
            supports_loras=family.lora is not None,
            control_types=family.control_types(family.options_of(entry)),
            prompt_form=family.prompt_form,
        )

    def check(self, request: ImageRequest) -> None:
        if request.control is not None:
            self.check_control(request.control.type)
        steps = request.num_inference_steps
        if steps is not None and not self.min_steps <= steps <= self.max_steps:
            raise RequestError(
                "num_inference_steps",
                f"{self.id} takes {self.min_steps}-{self.max_steps} steps; got {steps}",
                f"{self.min_steps}-{self.max_steps}",
            )
        guidance = request.guidance_scale
        low, high = self.guidance_range
        if guidance is not None and not low <= guidance <= high:
            allowed = f"{low:g}" if low == high else f"{low:g}-{high:g}"
            rule = f"must be {low:g}" if low == high else f"must be between {low:g} and {high:g}"
            raise RequestError("guidance_scale", f"{self.id} guidance_scale {rule}; got {guidance:g}", allowed)

    def check_control(self, control_type: str, none_field: str = "control", type_field: str = "control.type") -> None:
        """422 unless this model has a ControlNet of `control_type`: naming `none_field` when it has
        none at all, `type_field` when it lacks this type (the preview names `model` and `type`)."""
        if not self.control_types:
            raise RequestError(none_field, f"{self.id} has no ControlNet; leave control out or pick a model that has one",
                               "a model with control_types in GET /v1/models")
        if control_type not in self.control_types:
            raise RequestError(
                type_field, f"{self.id} has no {control_type!r} ControlNet; it has {list(self.control_types)}",
                "one of " + ", ".join(map(repr, self.control_types)),
            )

    def public(self) -> dict:
        spec = asdict(self)
        spec.pop("prompt_form")
        spec["control_types"] = list(self.control_types)
        return spec


@dataclass(frozen=True)
class VideoPlan:
    """A video request resolved against its model: every default filled in, every rule checked."""

    model: str
    mode: str  # image-to-video | text-to-video
    keyframe: bool  # text-to-video through a keyframe drawn by an image model (svd)
    width: int
    height: int
    num_frames: int
    fps: int
    num_inference_steps: int
    params: dict


class VideoSpec:
    """What one served video model accepts: its config entry and family's rules and parameters."""

    def __init__(self, entry: VideoModelConfig):
        self.entry = entry
        self.family = entry.model_family

    @property
    def id(self) -> str:
        return self.entry.id

    def plan(self, request: VideoRequest) -> VideoPlan:
        """The request's video, or RequestError naming the first field that breaks a family rule."""
        family, model = self.family, self.id
        native = family.text_to_video == "native"
        if request.image is not None and not family.image_to_video:
            raise RequestError("image", f"{model} ({family.name}) has no image-to-video; give prompt only",
                               "a model with image_to_video in GET /v1/models")
        if request.image is None and family.text_to_video is None:
            raise RequestError("prompt", f"{model} ({family.name}) has no text-to-video; give image", "image")
        if request.image is not None and request.prompt is not None and not native:
            raise RequestError("prompt", f"{model} ({family.name}) animates an image without a prompt; give image "
                                         "or prompt (a keyframe is drawn from it), not both", "image or prompt")
        if "keyframe" in request.model_fields_set and family.text_to_video != "keyframe":
            raise RequestError("keyframe", f"{model} ({family.name}) makes text-to-video natively, without a "
                                           "keyframe; leave keyframe out", "no keyframe")
        width, height = self.entry.size_default()
        width, height = request.width or width, request.height or height
        for name, value in (("width", width), ("height", height)):
            if not family.size.allows(value):
                raise RequestError(name, f"{model} ({family.name}) needs {family.size.describe()}; got {value}",
                                   family.size.describe())
        frames = request.num_frames or self.entry.frames_default()
        if not family.frames.allows(frames):
            near = " or ".join(map(str, family.frames.nearest(frames)))
            hint = f" (nearest: {near})" if near else ""
            raise RequestError("num_frames", f"{model} ({family.name}) makes {family.frames.describe()}; got "
                                             f"{frames}{hint}", family.frames.describe())
        steps = request.num_inference_steps or self.entry.steps_default()
        if not family.min_steps <= steps <= family.max_steps:
            raise RequestError("num_inference_steps", f"{model} takes {family.min_steps}-{family.max_steps} steps; "
                                                      f"got {steps}", f"{family.min_steps}-{family.max_steps}")
        return VideoPlan(
            model=model, mode="text-to-video" if request.image is None else "image-to-video",
            keyframe=request.image is None and not native, width=width, height=height, num_frames=frames,
            fps=request.fps or self.entry.fps_default(), num_inference_steps=steps, params=self.params(request),
        )

    def params(self, request: VideoRequest) -> dict:
        """The family's own parameters, defaults filled in; 422 for another family's parameter."""
        from pydantic import ValidationError

        taken = self.family.param_names()
        given = {name: getattr(request, name) for name in request.family_param_names()
                 if getattr(request, name) is not None}
        for name in given:
            if name not in taken:
                takes = ", ".join(taken) or "none"
                raise RequestError(name, f"{self.id} ({self.family.name}) takes no {name}; its own parameters: {takes}",
                                   takes)
        try:
            return self.family.Params.model_validate(given).model_dump()
        except ValidationError as error:
            first = error.errors()[0]
            name = ".".join(str(part) for part in first["loc"])
            raise RequestError(name, f"{self.id} ({self.family.name}): {first['msg']}", "see GET /v1/models") from None

    def public(self) -> dict:
        family, entry = self.family, self.entry
        width, height = entry.size_default()
        return {
            "id": entry.id, "family": family.name, "description": entry.description or family.description,
            "source": entry.source, **family.capabilities(), "default_width": width, "default_height": height,
            "default_num_frames": entry.frames_default(), "default_fps": entry.fps_default(),
            "default_steps": entry.steps_default(), "min_steps": family.min_steps, "max_steps": family.max_steps,
            "param_defaults": family.Params().model_dump(),
        }


def _param(name: str) -> dict:
    """A ControlOptions field as the catalogue lists it: type, default, range and description."""
    field = ControlOptions.model_fields[name]
    param = {"name": name, "type": {bool: "boolean", int: "integer", float: "number"}[field.annotation],
             "default": field.default, "description": field.description}
    for constraint in field.metadata:
        if hasattr(constraint, "ge"):
            param["min"] = constraint.ge
        if hasattr(constraint, "le"):
            param["max"] = constraint.le
    return param


def control_catalogue() -> list[dict]:
    """Each control type with its preprocessor and parameters (read from `ControlOptions`), after
    the A1111 ControlNet extension's `module_list` (which lists each module's sliders)."""
    common = [_param("conditioning_scale"), _param("preprocess")]
    return [
        {
            "type": "canny",
            "description": "Edges of the reference image (OpenCV Canny over its RGB channels), white on black.",
            "preprocessor": "opencv Canny",
            "params": [*common, _param("low_threshold"), _param("high_threshold")],
        },
        {
            "type": "depth",
            "description": "Relative depth of the reference image, near bright and far dark.",
            "preprocessor": "the model's depth_estimator (transformers depth estimation)",
            "params": common,
        },
    ]
