"""Plain messages passed between the ingress and the model deployments.

They travel through Ray's object store (numpy arrays are zero-copy there), so they hold arrays and
plain values only, never tensors or PIL images.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class PromptForm:
    """How the enhancer's LLM should write a prompt for one model family: `instructions` (one
    sentence on form and length) and few-shot `examples` of (idea | style, answer)."""

    instructions: str
    examples: tuple[tuple[str, str], ...] = ()


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


@dataclass(frozen=True)
class LoraRef:
    """One LoRA adapter to apply, resolved by the ingress's `deployments.runtime.lora.LoraRegistry`.

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


@dataclass(frozen=True)
class GenerationParams:
    """What a generator needs for one batch besides the prompt: one image per seed.

    `loras`: the adapters to apply to this batch, and only these (empty: none). `control` applies to
    generators with ControlNets only (the model spec checks it first)."""

    seeds: list[int]
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float = 0.0
    progress: ProgressTarget | None = None
    loras: tuple[LoraRef, ...] = ()
    control: ControlInput | None = None


@dataclass
class GenerationOutput:
    """Images as uint8 (N, H, W, 3), in the order of `seeds`."""

    images: np.ndarray
    seeds: list[int]
    model: str
    seconds: float
    device: str
    dtype: str


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
