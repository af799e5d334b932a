"""What each servable model accepts, and the request checks that depend on the model."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from serve_app.schemas import ImageRequest


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
        """The shape of schema errors (see serve_app.errors), so clients parse one format.

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
    # The generator applies GenerationParams.loras (through deployments.lora.LoraManager); a
    # request naming LoRAs for a model without it gets 422 rather than an image without them.
    supports_loras: bool = False

    def check(self, request: ImageRequest) -> None:
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

    def public(self) -> dict:
        return asdict(self)


def flux_schnell_spec(default_width: int, default_height: int, default_steps: int) -> ModelSpec:
    return ModelSpec(
        id="flux-schnell",
        family="flux",
        description="FLUX.1-schnell: guidance-distilled, 1-4 steps, no negative prompt.",
        min_steps=1,
        max_steps=4,
        default_steps=default_steps,
        default_width=default_width,
        default_height=default_height,
        guidance_range=(0.0, 0.0),
        default_guidance=0.0,
        uses_negative_prompt=False,
        supports_loras=True,
    )
