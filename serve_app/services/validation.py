"""What each servable model accepts, and the request checks that depend on the model."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from deployments.config import ImageModelConfig
from deployments.runtime.types import PromptForm
from serve_app.api.schemas import ControlOptions, ImageRequest


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
            # Fused QKV projections leave the separate ones a LoRA patches unused: no LoRAs then.
            supports_loras=family.lora is not None and not entry.acceleration.fuse_qkv,
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
