"""Every request rule that depends on a model's capabilities or the service's config, in one place
(as TGI keeps its `validation`). The schemas (serve_app.protocol) check what holds for every model;
what is left is decided here, before any model runs. Each refusal is a RequestError (422;
PromptBlocked's 400 for the blocklist) naming the field and what it allows.

- `ModelSpec`: one image model entry resolved for the request path, its capabilities computed once
  by the family (`ImageFamily.capabilities_of`), with the rules on steps, guidance, control, edits,
  hires and the compute budget; GET /v1/models shows the same spec (`public`).
- `check_image`: every model- and config-dependent rule of an image request, in one call
  (`ImageService.plan` makes it): the model's rules, the blocklist, the LoRAs, the quality gate and
  the budget. `spec_of`, `check_blocklist`, `resolve_loras` and `quality_gate` are its parts.
- Uploads: `check_upload_pixels` (max_input_pixels), `check_mask_size`, `check_total_pixels`.
- `VideoSpec`: a video model entry's rules and parameters (`plan`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

from deployments.config import CombinedWeights, ImageModelConfig, VideoModelConfig
from deployments.enhancer.prompt_rules import blocked_terms
from deployments.families import get_family, get_video_family
from deployments.lora_registry import LoraNameError, LoraRegistry
from deployments.names import SCORE_RANGES, default_combined
from deployments.runtime.types import HiresPass, LoraRef, PromptForm, denoising_steps
from serve_app.config import QualityPolicy, check_threshold
from serve_app.protocol.errors import PromptBlocked, RequestError, allowed_values
from serve_app.protocol.schemas import DEFAULT_STRENGTH, ControlOptions, ImageRequest, VideoRequest
from serve_app.services.quality import MIN_SAMPLES, score_at


def _width_bound(name: str):
    return next(getattr(rule, name) for rule in ImageRequest.model_fields["width"].metadata if hasattr(rule, name))


# The largest side an image may have (ImageRequest's width and height), after a hires pass too,
# and the multiple every output side is.
MAX_SIDE = _width_bound("le")
SIZE_STEP = _width_bound("multiple_of")


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
    # Image-to-image (init_image) and inpainting (mask): the family's pipelines; with ControlNet too.
    supports_img2img: bool = False
    supports_inpainting: bool = False
    control_edits: bool = False
    # Reference images (the family's `reference_images`): how many one request may give, 0 for none;
    # whether the prompt may be an instruction editing them; what each must measure.
    reference_images: int = 0
    instruction_edits: bool = False
    reference_min_side: int = 0
    reference_max_aspect: float = 0.0
    # How the enhancer's LLM writes prompts for this family (None: the neutral form).
    prompt_form: PromptForm | None = field(default=None, compare=False)
    # The config entry's compute budget per request, in pixel-steps (None: none).
    max_pixel_steps: int | None = None
    # The simulated device profile the model runs on (deployments.runtime.sim); None on a real device.
    simulated: str | None = None

    @classmethod
    def of(cls, entry: ImageModelConfig) -> "ModelSpec":
        family = get_family(entry.family)
        capabilities = family.capabilities_of(entry)
        width, height = family.size_default(entry)
        guidance = family.guidance_limits(entry)
        return cls(
            id=entry.id,
            family=family.name,
            description=entry.description or family.description,
            min_steps=family.step_limits(entry)[0],
            max_steps=family.step_limits(entry)[1],
            default_steps=family.steps_default(entry),
            default_width=width,
            default_height=height,
            guidance_range=guidance,
            default_guidance=family.guidance_default(entry),
            # Diffusers runs classifier-free guidance only above a scale of 1.
            uses_negative_prompt=family.negative_prompt and guidance[1] > 1,
            supports_loras=capabilities.loras,
            control_types=capabilities.control_types,
            supports_img2img=capabilities.image_to_image,
            supports_inpainting=capabilities.inpainting,
            control_edits=capabilities.control_edits,
            reference_images=capabilities.reference_images,
            instruction_edits=capabilities.instruction_edits,
            reference_min_side=capabilities.reference_min_side,
            reference_max_aspect=capabilities.reference_max_aspect,
            prompt_form=family.prompt_form_of(entry),
            max_pixel_steps=getattr(entry, "max_pixel_steps", None),  # serve_app's ImageModelEntry has it
            simulated=entry.device.simulated,
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
        self.check_edit(request)
        self.hires_pass(request)

    def check_edit(self, request: ImageRequest) -> None:
        """init_image, strength, mask and its options: what they need of each other and of the model."""
        if request.init_image is None:
            for name in ("mask", "strength", "mask_blur", "preserve_unmasked"):
                if getattr(request, name) is not None:
                    raise RequestError(name, "applies only with init_image (image-to-image or inpainting)",
                                       "leave it out, or give init_image")
            return
        if not self.supports_img2img:
            raise RequestError("init_image", f"{self.id} cannot start from an image (no image-to-image pipeline)",
                               "a model with supports_img2img in GET /v1/models")
        if request.mask is None:
            for name in ("mask_blur", "preserve_unmasked"):
                if getattr(request, name) is not None:
                    raise RequestError(name, "applies only with mask (inpainting)", "leave it out, or give mask")
        elif not self.supports_inpainting:
            raise RequestError("mask", f"{self.id} cannot inpaint (no inpainting pipeline)",
                               "a model with supports_inpainting in GET /v1/models")
        if request.control is not None and not self.control_edits:
            raise RequestError("init_image", f"{self.id} cannot combine control with init_image",
                               "leave out control or init_image")
        steps = request.num_inference_steps or self.default_steps
        strength = DEFAULT_STRENGTH if request.strength is None else request.strength
        if denoising_steps(steps, strength) < 1:
            raise RequestError(
                "strength", f"strength {strength:g} x num_inference_steps {steps} leaves no denoising step "
                "(diffusers runs int(steps x strength))", f"at least {1 / steps:.3g} with {steps} steps, "
                "or more num_inference_steps",
            )

    def hires_pass(self, request: ImageRequest) -> HiresPass | None:
        """The request's second pass at its final size, or None; 422 naming the `hires` field that cannot be."""
        hires = request.hires
        if hires is None:
            return None
        if not self.supports_img2img:
            raise RequestError("hires", f"{self.id} has no image-to-image pipeline to refine with",
                               "a model with supports_img2img in GET /v1/models")
        if request.mask is not None:
            raise RequestError("hires", "does not combine with mask: inpainting keeps the input's pixels at the output "
                               "size; ask for the final width and height instead", "leave out hires or mask")
        sizes = [(request.width or self.default_width), (request.height or self.default_height)]
        width, height = (round(side * hires.scale / SIZE_STEP) * SIZE_STEP for side in sizes)
        if max(width, height) > MAX_SIDE:
            largest = MAX_SIDE / max(sizes)
            raise RequestError("hires.scale", f"{hires.scale:g} x {sizes[0]}x{sizes[1]} is {width}x{height}, over "
                               f"{MAX_SIDE} pixels a side", f"1-{largest:.3g}")
        steps = hires.steps or request.num_inference_steps or self.default_steps
        if not self.min_steps <= steps <= self.max_steps:
            raise RequestError("hires.steps", f"{self.id} takes {self.min_steps}-{self.max_steps} steps; got {steps}",
                               f"{self.min_steps}-{self.max_steps}")
        if denoising_steps(steps, hires.strength) < 1:
            raise RequestError(
                "hires.strength", f"hires.strength {hires.strength:g} x hires.steps {steps} leaves no denoising step",
                f"at least {1 / steps:.3g} with {steps} steps, or more hires.steps",
            )
        return HiresPass(width=width, height=height, steps=steps, strength=hires.strength)

    def check_references(self, request: ImageRequest, specs: dict[str, "ModelSpec"]) -> None:
        """`reference_images`: only for models whose family takes them, at most their count, and not with
        init_image or control (the reference pipeline has neither); 422 naming the field and, for a
        model without the capability, the families and models that have it."""
        count = len(request.reference_images)
        if not count:
            return
        if not self.reference_images:
            capable: dict[str, list[str]] = {}
            for spec in specs.values():
                if spec.reference_images:
                    capable.setdefault(spec.family, []).append(spec.id)
            which = "; ".join(f"family {family} (models {', '.join(ids)})" for family, ids in capable.items())
            raise RequestError("reference_images", f"{self.id} (family {self.family}) takes no reference images; "
                               f"{'those that do: ' + which if capable else 'no deployed model does'}",
                               "a model with reference_images in GET /v1/models" + (f": {which}" if capable else ""))
        if count > self.reference_images:
            raise RequestError("reference_images", f"{self.id} takes at most {self.reference_images} reference "
                               f"images; got {count}", f"1-{self.reference_images} images")
        for name in ("init_image", "control"):
            if getattr(request, name) is not None:
                raise RequestError(name, "does not combine with reference_images: the prompt edits the references "
                                   "themselves", f"leave out {name} or reference_images")

    def check_reference_size(self, field: str, size: tuple[int, int]) -> None:
        """422 naming `field` (reference_images.<i>) for a reference smaller or more elongated than the model takes."""
        width, height = size
        if self.reference_min_side and min(width, height) < self.reference_min_side:
            raise RequestError(field, f"is {width}x{height}; {self.id} needs at least {self.reference_min_side} "
                               "pixels a side", f"sides of at least {self.reference_min_side} pixels")
        if self.reference_max_aspect and max(width, height) / min(width, height) > self.reference_max_aspect:
            raise RequestError(field, f"is {width}x{height}; {self.id} takes sides at most "
                               f"{self.reference_max_aspect:g} times each other", f"an aspect ratio up to "
                               f"{self.reference_max_aspect:g}:1")

    def check_budget(self, width: int, height: int, steps: int, images: int, rounds: int,
                     field: str = "num_images") -> None:
        """422 when the request's work, width x height x steps x images x rounds, is over the budget;
        `images` counts `field` (candidates for best-of-N)."""
        if self.max_pixel_steps is None:
            return
        cost = width * height * steps * images * rounds
        if cost > self.max_pixel_steps:
            raise RequestError(
                field,
                f"width x height x num_inference_steps x {field} x max_attempts = {width}x{height}x{steps}x"
                f"{images}x{rounds} = {cost} pixel-steps, over {self.id}'s budget of {self.max_pixel_steps} "
                "(image_models[].max_pixel_steps): ask for fewer images, rounds, steps or pixels",
                f"width x height x num_inference_steps x {field} x max_attempts <= {self.max_pixel_steps}",
            )

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
class CheckedImage:
    """An image request's values that depend on its model and the config, defaults filled in and
    every rule checked: what `ImageService.plan` builds its plan from."""

    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    max_attempts: int
    loras: tuple[LoraRef, ...]
    metric: str
    threshold: float
    weights: CombinedWeights
    hires: HiresPass | None
    candidates: int | None = None


def check_image(request: ImageRequest, spec: ModelSpec, policy: QualityPolicy, gate_metrics: tuple[str, ...],
                blocklist: tuple[str, ...], loras: LoraRegistry,
                calibration: Mapping[int, float] | None = None, specs: dict[str, ModelSpec] | None = None,
                ) -> CheckedImage:
    """Every rule of `request` that depends on its model or the config, before any upload is decoded
    (the uploads' own limits are checked as they decode): the first one broken raises.
    `calibration`: the model's score histogram for the gate metric, when the request gives a
    quality_percentile (`ImageService.calibration_for`). `specs`, every served model's, names the
    ones that can do what `spec`'s cannot."""
    spec.check_references(request, specs or {spec.id: spec})  # first: its init_image/control refusal says why
    spec.check(request)
    for index, reference in enumerate(request.reference_images):
        if not isinstance(reference, str):
            raise RequestError(f"reference_images.{index}", f"job {reference.job_id!r}'s image is looked up by the HTTP, "
                               "jobs, MCP and A2A front ends; through the Python handle, send the image itself",
                               "base64 PNG, JPEG or WebP")
    check_blocklist(request.prompt, blocklist)
    refs = resolve_loras(request, spec, loras)
    metric, threshold, weights = quality_gate(request.quality_metric, request.quality_threshold,
                                              request.quality_weights, policy, gate_metrics)
    if request.quality_percentile is not None:
        threshold = percentile_threshold(request, spec.id, metric, calibration)
    candidates = check_candidates(request.candidates, request.num_images, policy.max_candidates)
    width, height = request.width or spec.default_width, request.height or spec.default_height
    steps = request.num_inference_steps or spec.default_steps
    rounds = request.max_attempts or policy.max_attempts
    if candidates is None:
        spec.check_budget(width, height, steps, request.num_images, rounds)
    else:
        spec.check_budget(width, height, steps, candidates, rounds, field="candidates")
    guidance = spec.default_guidance if request.guidance_scale is None else request.guidance_scale
    return CheckedImage(width=width, height=height, num_inference_steps=steps, guidance_scale=guidance,
                        max_attempts=rounds, loras=refs, metric=metric, threshold=threshold, weights=weights,
                        hires=spec.hires_pass(request), candidates=candidates)


def check_candidates(candidates: int | None, num_images: int, limit: int) -> int | None:
    """Best-of-N: 422 naming `candidates` unless num_images <= N <= policy.max_candidates."""
    if candidates is None:
        return None
    allowed = f"{num_images}-{limit} (num_images to policy.max_candidates)"
    if candidates < num_images:
        raise RequestError("candidates", f"must be at least num_images ({num_images}) to choose that many from; "
                           f"got {candidates}", allowed)
    if candidates > limit:
        raise RequestError("candidates", f"at most {limit} images per round on this service "
                           f"(policy.max_candidates); got {candidates}", allowed)
    return candidates


def percentile_threshold(request: ImageRequest, model: str, metric: str,
                         calibration: Mapping[int, float] | None) -> float:
    """The score `request.quality_percentile` percent of `model`'s images stay below; 422 naming
    the field when it also gives a threshold, or the model has no calibration for the metric."""
    if request.quality_threshold is not None:
        raise RequestError("quality_percentile", "give quality_percentile or quality_threshold, not both",
                           "one of them")
    threshold = None if calibration is None else score_at(metric, calibration, request.quality_percentile)
    if threshold is None:
        seen = 0 if calibration is None else int(sum(calibration.values()))
        raise RequestError(
            "quality_percentile",
            f"{model} has no calibration for {metric!r}: its profile ships none (policy.calibration) and it has "
            f"scored {seen} images, fewer than the {MIN_SAMPLES} a percentile needs; give quality_threshold",
            "a model calibrated for the metric (GET /v1/admin/quality)",
        )
    return threshold


def spec_of(specs: dict[str, ModelSpec], model: str | None, default_model: str) -> ModelSpec:
    """The spec of the model a request names (`default_model` when it names none); 422 for another id."""
    spec = specs.get(default_model if model is None else model)
    if spec is None:
        known = sorted(specs)
        raise RequestError("model", f"must be one of {known}; got {model!r}", "one of " + ", ".join(map(repr, known)))
    return spec


def check_blocklist(prompt: str, blocklist: tuple[str, ...], field: str = "prompt") -> None:
    """Refuse (400) a prompt naming a blocklisted term; the blocklist is empty (off) by default."""
    hits = blocked_terms(prompt, blocklist)
    if hits:
        raise PromptBlocked(field, f"contains blocked term(s): {', '.join(hits)}", "text without blocklisted terms")


def resolve_loras(request: ImageRequest, spec: ModelSpec, registry: LoraRegistry) -> tuple[LoraRef, ...]:
    """The request's LoRAs as refs the generator loads, each checked against the registry and the
    model (422 naming `loras.<i>.name` otherwise). Only the registry's entries can come out."""
    if not request.loras:
        return ()
    if not spec.supports_loras:
        raise RequestError("loras", f"{spec.id} does not take LoRA adapters", "an empty list")
    limit = registry.max_per_request
    if len(request.loras) > limit:
        raise RequestError("loras", f"at most {limit} LoRAs per request; got {len(request.loras)}", f"0-{limit} items")
    refs, seen = [], set()
    for index, lora in enumerate(request.loras):
        field = f"loras.{index}.name"
        try:
            entry = registry.resolve(lora.name)
        except LoraNameError as error:
            raise RequestError(field, str(error), error.allowed) from None
        if entry.family != spec.family:
            compatible = registry.names(spec.family)
            raise RequestError(
                field, f"LoRA {lora.name!r} is for {entry.family} models; {spec.id} takes {spec.family} LoRAs",
                "one of " + ", ".join(map(repr, compatible)) if compatible else f"none: no {spec.family} LoRA is configured",
            )
        if lora.name in seen:
            raise RequestError(field, f"LoRA {lora.name!r} is named twice", "each LoRA once")
        seen.add(lora.name)
        refs.append(entry.ref(lora.scale))
    return tuple(refs)


def quality_gate(metric: str | None, threshold: float | None, weights: CombinedWeights | None,
                 policy: QualityPolicy, gate_metrics: tuple[str, ...]) -> tuple[str, float, CombinedWeights]:
    """The request's gate (metric, threshold, combined weights), the policy's where it gives none;
    422 naming the field when the metric or a weighted score is not computed, or the threshold is
    outside the metric's range."""
    metric = metric or policy.metric
    if metric not in gate_metrics:
        allowed = ", ".join(map(repr, gate_metrics))
        raise RequestError("quality_metric", f"{metric!r} is not computed by the deployed scorers "
                           f"({not_computed_reason(metric)})", f"one of {allowed}")
    threshold = policy.threshold if threshold is None else threshold
    try:
        check_threshold(metric, threshold)
    except ValueError as error:
        low, high = SCORE_RANGES[metric]
        raise RequestError("quality_threshold", str(error), f"{low:g}-{high:g}") from None
    weights = weights or policy.weights or default_weights(gate_metrics)
    for name, weight in weights.model_dump().items():
        if weight > 0 and name not in gate_metrics:
            raise RequestError(f"quality_weights.{name}", f"must be 0: the deployed scorers compute no {name} "
                               f"score ({not_computed_reason(name)})", "0")
    return metric, threshold, weights


def not_computed_reason(metric: str) -> str:
    """Why a gate metric can be missing, for a 422: which config entry computes it."""
    if metric == "laion":
        return "the clip scorer's laion.enabled is false"
    return f"no enabled scorers: entry computes {metric}"


def default_weights(gate_metrics: tuple[str, ...]) -> CombinedWeights:
    """Equal weights over the default combined scores (aesthetic, alignment, laion) the scorers compute."""
    return CombinedWeights(**dict.fromkeys(default_combined(gate_metrics), 1.0))


def check_upload_pixels(field: str, size: tuple[int, int], max_pixels: int, allowed: str) -> None:
    """422 naming `field` when an upload's header declares more than `max_pixels` (max_input_pixels)."""
    width, height = size
    if width * height > max_pixels:
        raise RequestError(field, f"{width}x{height} is {width * height} pixels, over the limit", allowed)


def check_mask_size(mask: tuple[int, int], image: tuple[int, int]) -> None:
    """422 unless `mask` is its init_image's size: fitting crops by aspect ratio, so a mask of
    another size would not line up with its image."""
    if mask != image:
        (mw, mh), (iw, ih) = mask, image
        raise RequestError("mask", f"is {mw}x{mh} but init_image is {iw}x{ih}; a mask must match its image "
                           "pixel for pixel", f"a {iw}x{ih} image")


def check_total_pixels(field: str, sizes: list[tuple[int, int]], limit: int, setting: str) -> None:
    """422 naming `field` when the images' width x height, added up, is over `limit` (the config's `setting`)."""
    total = sum(width * height for width, height in sizes)
    if total > limit:
        raise RequestError(
            field,
            f"the {len(sizes)} image{'s' if len(sizes) != 1 else ''} hold {total} pixels in all, over the limit of "
            f"{limit} ({setting}): send fewer or smaller images",
            f"at most {limit} pixels in all",
        )


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
        self.family = get_video_family(entry.family)
        # The entry's compute budget per request, in pixel-frame-steps (None: none).
        self.max_pixel_frame_steps: int | None = getattr(entry, "max_pixel_frame_steps", None)  # VideoModelEntry's

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
        width, height = family.size_default(self.entry)
        width, height = request.width or width, request.height or height
        for name, value in (("width", width), ("height", height)):
            if not family.size.allows(value):
                near = " or ".join(map(str, family.size.nearest(value)))
                raise RequestError(name, f"{model} ({family.name}) needs {family.size.describe()}; got {value} "
                                         f"(nearest: {near})", family.size.describe())
        frames = request.num_frames or family.frames_default(self.entry)
        if not family.frames.allows(frames):
            near = " or ".join(map(str, family.frames.nearest(frames)))
            hint = f" (nearest: {near})" if near else ""
            raise RequestError("num_frames", f"{model} ({family.name}) makes {family.frames.describe()}; got "
                                             f"{frames}{hint}", family.frames.describe())
        steps = request.num_inference_steps or family.steps_default(self.entry)
        if not family.min_steps <= steps <= family.max_steps:
            raise RequestError("num_inference_steps", f"{model} takes {family.min_steps}-{family.max_steps} steps; "
                                                      f"got {steps}", f"{family.min_steps}-{family.max_steps}")
        self.check_budget(width, height, frames, steps)
        return VideoPlan(
            model=model, mode="text-to-video" if request.image is None else "image-to-video",
            keyframe=request.image is None and not native, width=width, height=height, num_frames=frames,
            fps=request.fps or family.fps_default(self.entry), num_inference_steps=steps, params=self.params(request),
        )

    def check_budget(self, width: int, height: int, frames: int, steps: int) -> None:
        """422 when the request's work, width x height x frames x steps, is over the entry's budget."""
        budget = self.max_pixel_frame_steps
        if budget is None:
            return
        cost = width * height * frames * steps
        if cost > budget:
            raise RequestError(
                "num_frames",
                f"width x height x num_frames x num_inference_steps = {width}x{height}x{frames}x{steps} = {cost} "
                f"pixel-frame-steps, over {self.id}'s budget of {budget} (video_models[].max_pixel_frame_steps): "
                "ask for fewer frames, steps or pixels",
                f"width x height x num_frames x num_inference_steps <= {budget}",
            )

    def params(self, request: VideoRequest) -> dict:
        """The family's own parameters (the request's fields beyond the common ones; null is left out),
        its defaults filled in. 422 naming a parameter the family does not take, listing those it
        does, or one its `Params` refuses, with the family's bounds."""
        from pydantic import ValidationError

        family, taken = self.family, self.family.param_names()
        given = {name: value for name, value in request.family_params.items() if value is not None}
        for name in given:
            if name not in taken:
                takes = ", ".join(taken) or "none"
                raise RequestError(name, f"{self.id} ({family.name}) takes no {name}; its own parameters: {takes}",
                                   takes)
        try:
            # Strict, as the common fields are: a JSON "5" is no integer.
            return family.Params.model_validate(given, strict=True).model_dump()
        except ValidationError as error:
            first = error.errors()[0]
            name = ".".join(str(part) for part in first["loc"]) or ", ".join(given)
            fields = [part for part in first["loc"] if isinstance(part, str)]
            allowed = allowed_values(family.Params, *fields) if fields else None
            raise RequestError(name, f"{self.id} ({family.name}): {first['msg']}",
                               allowed or "see GET /v1/models (param_schema)") from None

    def public(self) -> dict:
        family, entry = self.family, self.entry
        width, height = family.size_default(entry)
        return {
            "id": entry.id, "family": family.name, "description": entry.description or family.description,
            "source": entry.source, **family.capabilities(), "default_width": width, "default_height": height,
            "default_num_frames": family.frames_default(entry), "default_fps": family.fps_default(entry),
            "default_steps": family.steps_default(entry), "min_steps": family.min_steps, "max_steps": family.max_steps,
            "param_defaults": family.param_defaults(), "param_schema": family.param_schema(),
            "max_pixel_frame_steps": self.max_pixel_frame_steps,
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


def dropped_terms(enhanced, spec: ModelSpec) -> list[str]:
    """What the enhancer left out to fit the encoders; negative-preset terms only where the model uses
    a negative prompt (FLUX ignores it, so nothing of it was lost)."""
    return [term for term in enhanced.dropped if spec.uses_negative_prompt or not term.startswith("negative: ")]
