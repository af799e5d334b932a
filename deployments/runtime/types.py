"""Plain messages passed between the ingress and the model deployments.

They travel through Ray's object store (numpy arrays are zero-copy there), so they hold arrays and
plain values only, never tensors or PIL images.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class PromptTokenizer:
    """A text encoder's tokenizer that a prompt must fit: the model's `source` (hub id, folder or
    'tiny'), the tokenizer's `subfolder` in it, the tokens the encoder keeps (CLIP: 77, start and end
    tokens included) and its `kind` (what 'tiny' builds: clip)."""

    subfolder: str
    max_tokens: int
    kind: str = "clip"
    source: str = ""


@dataclass(frozen=True)
class PromptForm:
    """How the enhancer should write a prompt for one model: `instructions` (one sentence on form and
    length) and few-shot `examples` of (idea | style, answer) for its LLM, and the `tokenizers` the
    prompt must fit (the enhancer drops its own additions that would be cut; `ImageFamily.prompt_form_of`
    fills in the model's source)."""

    instructions: str
    examples: tuple[tuple[str, str], ...] = ()
    tokenizers: tuple[PromptTokenizer, ...] = ()


@dataclass(frozen=True)
class ProgressTarget:
    """Where a generator reports its denoising steps: `record_progress(job_id, attempt, progress)`
    on deployment `deployment` of application `app` (the JobRunner, for async jobs).

    `stage` names what the steps belong to ("generate", "keyframe", "video"), and `round` the
    generation round of the image graph (1 for the first try, more when it regenerates). A step
    is reported when at least `min_interval_s` passed since the last report (0: every step):
    each report is a Serve call, which on a small CPU box costs as much as a tiny model's step.
    """

    app: str
    deployment: str
    job_id: str
    attempt: int
    stage: str
    round: int = 1
    min_interval_s: float = 0.5
    # Send a small approximate picture of the image being denoised with each report (families with
    # preview factors only).
    preview: bool = False


@dataclass(frozen=True)
class LoraRef:
    """One LoRA adapter to apply, resolved by the ingress's `deployments.lora_registry.LoraRegistry`.

    `location` is a directory on the generator's node (`local`) or a Hugging Face repo id, and
    `weight_name` the `.safetensors` file in it; `revision` changes when a directory's file is
    replaced, so a cached old version is not reused. `scale` multiplies the adapter's effect.
    """

    name: str
    location: str
    weight_name: str
    scale: float = 1.0
    local: bool = True
    revision: str = ""


@dataclass(frozen=True)
class ControlInput:
    """A ControlNet condition: `image` is uint8 (H, W, 3) already at the generation size.

    With `preprocess` set, `image` is the user's reference picture and the generator computes the
    map (`canny`: OpenCV edges with the two hysteresis thresholds; `depth`: a depth estimator);
    without it, `image` is the map itself. `SdxlGenerator.preprocess` returns the same input with
    the map in `image` and `preprocess` off, so regeneration rounds reuse one map.
    """

    type: str
    image: np.ndarray
    conditioning_scale: float
    preprocess: bool = True
    low_threshold: int = 100
    high_threshold: int = 200


def denoising_steps(steps: int, strength: float) -> int:
    """The steps an image-to-image pass runs: diffusers starts `strength` of the way into the
    schedule and counts `int(steps * strength)` (its `get_timesteps`); 0 means nothing would run."""
    return min(int(steps * strength), steps)


@dataclass(frozen=True)
class EditInput:
    """Image-to-image or inpainting: start from `image` instead of pure noise.

    `image`: uint8 (H, W, 3) at the generation size, or (N, H, W, 3), one per seed (the hires
    pass). `strength` (0-1]: how far into the noise schedule the image is pushed before
    denoising. `mask`: inpainting when set, uint8 (H, W), 255 where to repaint and 0 where to keep
    (already thresholded); the pipeline sees it softened by a Gaussian blur of radius `mask_blur`
    pixels, and with `preserve_unmasked` the generator pastes `image`'s pixels back wherever
    `mask` is 0, so they stay exact.
    """

    image: np.ndarray
    strength: float
    mask: np.ndarray | None = None
    mask_blur: int = 4
    preserve_unmasked: bool = True

    @property
    def mode(self) -> str:
        return "inpainting" if self.mask is not None else "image-to-image"


@dataclass(frozen=True)
class HiresPass:
    """A second, image-to-image pass over the first pass's images, upscaled (Lanczos) to
    `width` x `height`: `steps` scheduled, `strength` of them run (see `denoising_steps`)."""

    width: int
    height: int
    steps: int
    strength: float


@dataclass(frozen=True)
class GenerationParams:
    """What a generator needs for one batch besides the prompt: one image per seed.

    `loras`: the adapters to apply to this batch, and only these (empty: none). `control` applies to
    generators with ControlNets only (the model spec checks it first). `edit`: start from an image
    (image-to-image, inpainting); `hires`: refine the result at a larger size in a second pass.
    `references`: uint8 (H, W, 3) images the model conditions every image of the batch on (what to
    keep of a subject, a style, or the picture an instruction edits), for families that declare
    `ImageFamily.reference_images`; the model spec checks the count first."""

    seeds: list[int]
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float = 0.0
    progress: ProgressTarget | None = None
    loras: tuple[LoraRef, ...] = ()
    control: ControlInput | None = None
    edit: EditInput | None = None
    hires: HiresPass | None = None
    references: tuple[np.ndarray, ...] = ()

    def total_steps(self) -> int:
        """The denoising steps this batch runs, both passes together (what progress counts to)."""
        steps = self.num_inference_steps
        if self.edit is not None:
            steps = denoising_steps(steps, self.edit.strength)
        if self.hires is not None:
            steps += denoising_steps(self.hires.steps, self.hires.strength)
        return steps


@dataclass
class GenerationOutput:
    """Images as uint8 (N, H, W, 3), in the order of `seeds`."""

    images: np.ndarray
    seeds: list[int]
    model: str
    seconds: float
    device: str
    dtype: str
    # Seconds per pass when there is more than one ("hires": the upscale and second pass).
    timings: dict = field(default_factory=dict)
    # This request's share of the pipeline call's seconds (by images) when requests were batched
    # together; `seconds` is the whole call's. None: the call was this request's alone.
    share_seconds: float | None = None


@dataclass(frozen=True)
class EnhancedPrompt:
    """The prompt a generator uses. Generators that run without guidance ignore `negative_prompt`.

    `enhancer`: "llm", "template" or "none"; `fallback_reason`: why the template answered when the
    LLM was asked (e.g. "off_topic", "timeout", "backend_error: ..."), None otherwise.
    """

    prompt: str
    negative_prompt: str | None
    style: str
    enhancer: str
    fallback_reason: str | None = None
    # The enhancer's own additions (style, quality, fixes, LLM clauses, negative preset terms) left out
    # so that the prompts fit the target's text encoders; the user's words are never dropped.
    dropped: tuple[str, ...] = ()


@dataclass(frozen=True)
class VideoParams:
    """One video run. For image-to-video, the image is passed beside it: uint8 (H, W, 3) at the
    video's size. `prompt` is the text a native text-to-video family is conditioned on (None for
    image-only families); `options` holds the family's own request parameters (its `Params`)."""

    seed: int
    width: int
    height: int
    num_frames: int
    fps: int
    num_inference_steps: int
    output_format: str
    prompt: str | None = None
    options: dict = field(default_factory=dict)
    # Frame interpolation after generation: N frames become (N - 1) * k + 1 at k * fps (1: none).
    interpolate: int = 1
    metadata: dict = field(default_factory=dict)
    progress: ProgressTarget | None = None
    score_frames: int = 0  # generated frames to return for scoring (evenly spaced); 0: none


@dataclass
class VideoOutput:
    """An encoded video and what was made (`source_frames`: generated, before interpolation)."""

    data: bytes
    content_type: str
    num_frames: int
    fps: int
    width: int
    height: int
    seed: int
    generate_seconds: float
    encode_seconds: float
    device: str
    source_frames: int = 0
    source_fps: int = 0
    interpolate_seconds: float = 0.0
    # The generated frames the scorer sees (`VideoParams.score_frames` of them, evenly spaced, before
    # interpolation): their indices, and the frames, uint8 (N, H, W, 3); None when none were asked for.
    sampled_frames: tuple[int, ...] = ()
    frames: np.ndarray | None = None


class ModelOutOfMemory(RuntimeError):
    """A model call ran out of accelerator memory. The replica has freed its cache and serves the
    next request; the ingress answers 503 (`reason: out_of_memory`), a job retries it once."""

    reason = "out_of_memory"

    def __init__(self, model: str, detail: str):
        super().__init__(f"{model} ran out of accelerator memory: {detail}")
        self.model = model
        self.detail = detail

    def __reduce__(self):  # Ray pickles it back to the caller
        return (type(self), (self.model, self.detail))
