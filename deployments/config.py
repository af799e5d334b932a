"""Typed configuration of the model deployments.

These models are what `configs/*.yaml` feed, through `serve_app.config.AppArgs`. Every field has a
safe default and a description; validators reject impossible values with a message naming the
field, when the config is loaded rather than when a replica starts.

They are plain data: nothing here knows a model family. What an entry's family allows (its
options, step and guidance ranges, size and frame rules, acceleration tiers) is checked by the
family (`ImageFamily.check_entry`, `VideoFamily.check_entry` in `deployments.families`), which
`AppArgs` runs on each entry when the config loads; the family also resolves an entry's defaults
(`family.steps_default(entry)`, ...).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from deployments.names import COMBINABLE, Style, check_lora_name

TINY = "tiny"
# The public improved-aesthetic-predictor head (christophschuhmann/improved-aesthetic-predictor),
# as mirrored on the Hugging Face hub; `LaionHeadConfig.filename` names the file in it.
PUBLIC_LAION_HEAD = "camenduru/improved-aesthetic-predictor"
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


# A source naming a folder or file on the node, rather than a hub repo id: what every loader and
# `genserve download` tell apart by this one rule.
LOCAL_PREFIXES = ("/", "./", "../", "~")


def is_local_path(source: str) -> bool:
    return source.startswith(LOCAL_PREFIXES)


def local_path(source: str) -> Path:
    """A local source's path on this node, `~` expanded and made absolute."""
    return Path(os.path.expanduser(source)).resolve()


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def validate_source(value: str) -> str:
    """A model source is `tiny`, a Hugging Face repo id (`org/name`) or a local folder path."""
    value = value.strip()
    if value == TINY or _HUB_ID.match(value):
        return value
    if is_local_path(value):
        return value
    raise ValueError(
        f"source must be 'tiny', a Hugging Face repo id like 'org/name', or a local folder path "
        f"starting with '/', './', '../' or '~'; got {value!r}"
    )


ModelSource = Annotated[str, AfterValidator(validate_source)]


class DeviceOptions(_Strict):
    """Where a model runs and in which precision."""

    device: str = Field(
        "auto",
        description="'auto' picks CUDA only when torch sees a CUDA device, else CPU; 'cpu'; 'cuda'; or "
                    "'sim:<profile>', a simulated accelerator (docs/simulator.md; profiles: "
                    "deployments/sim_profiles.yaml) that takes the modelled time and memory of the "
                    "published architecture named by `source` and returns placeholder images marked simulated.",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="'auto' is bfloat16 on CUDA and on a simulated device, float32 on CPU."
    )
    torch_threads: int | None = Field(
        None,
        ge=1,
        le=256,
        description=(
            "CPU threads torch may use in this replica. Ray sets OMP_NUM_THREADS=1 for "
            "fractional num_cpus, so set this explicitly on CPU; None keeps torch's default."
        ),
    )
    simulated_cold_start: bool = Field(
        True,
        description="On a simulated device: a replica's start waits the modelled load of its weights, read from "
                    "the node's disk and copied over the card's host-to-device link (docs/simulator.md, 'Cold start'), "
                    "without using the CPU. False starts at once (the test suite's shared app). Ignored on a real device.",
    )
    memory_fraction: float | None = Field(
        None,
        gt=0,
        le=1,
        description=(
            "Share of the CUDA device's memory this replica may allocate "
            "(torch.cuda.set_per_process_memory_fraction); applied only on CUDA. Unset, the "
            "builder sets it to the deployment's num_gpus when that is a fraction of one GPU, "
            "so a replica cannot take memory Ray gave to the others on the same card."
        ),
    )


    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        from deployments.sim_profiles import profile, simulated_profile

        key = simulated_profile(value)
        if key is not None:
            profile(key)  # ValueError naming the known profiles
        elif value not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'sim:<profile>'; got {value!r}")
        return value

    @property
    def simulated(self) -> str | None:
        """The profile of a `sim:<profile>` device; None on a real one."""
        from deployments.sim_profiles import simulated_profile

        return simulated_profile(self.device)

class TextPair(_Strict):
    """A 'good' and a 'bad' description of one aspect of an image; CLIP picks which fits better."""

    positive: str = Field(min_length=1, description="Text for an image that is good at this aspect.")
    negative: str = Field(min_length=1, description="Text for an image that is bad at this aspect.")

    @model_validator(mode="after")
    def _distinct(self) -> "TextPair":
        if self.positive.strip() == self.negative.strip():
            raise ValueError("positive and negative must differ")
        return self


class AspectTexts(_Strict):
    """The text pairs of the five aspect scores. Each aspect's score is the probability CLIP gives
    its positive text over its negative one (0-1, higher is better)."""

    composition: TextPair = Field(
        TextPair(positive="a well-composed, balanced photograph", negative="a badly composed, cluttered photograph"),
        description="Framing and balance.",
    )
    lighting: TextPair = Field(
        TextPair(positive="a photograph with excellent, professional lighting",
                 negative="a photograph with poor, flat lighting"),
        description="Light quality and exposure.",
    )
    colors: TextPair = Field(
        TextPair(positive="a photograph with vibrant, harmonious colors",
                 negative="a photograph with dull, washed-out colors"),
        description="Colour quality.",
    )
    sharpness: TextPair = Field(
        TextPair(positive="a sharp, in-focus, highly detailed photograph",
                 negative="a blurry, out-of-focus photograph"),
        description="Focus and detail, as CLIP sees it (the perceptual sharpness measures pixels instead).",
    )
    style: TextPair = Field(
        TextPair(positive="an artistic, creative image with a unique style",
                 negative="a generic, boring image"),
        description="Artistic interest.",
    )


class LaionHeadConfig(_Strict):
    """The LAION improved-aesthetic-predictor: a small MLP over L2-normalised CLIP image embeddings
    that predicts the average human 1-10 rating (trained on SAC + LAION-logos + AVA)."""

    enabled: bool = Field(True, description="Compute the `laion` score; false skips the head entirely.")
    source: str | None = Field(
        None,
        min_length=1,
        description=(
            "'tiny' (random head sized to the tiny CLIP, for tests and dev), a local weights file "
            "(.safetensors, or a .pth/.pt state dict, loaded with torch.load(weights_only=True)), "
            "a local folder holding `filename`, or a Hugging Face repo id holding `filename`. "
            f"None: 'tiny' when the CLIP source is 'tiny', else the public head ({PUBLIC_LAION_HEAD!r})."
        ),
    )
    filename: str = Field(
        "sac+logos+ava1-l14-linearMSE.pth",
        min_length=1,
        description="The weights file inside a repo id or folder source (ignored for a file source).",
    )

    @field_validator("source")
    @classmethod
    def _known_source(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip()
        if value == TINY or _HUB_ID.match(value) or is_local_path(value):
            return value
        raise ValueError(
            f"source must be 'tiny', a Hugging Face repo id like 'org/name', or a local file or folder path "
            f"starting with '/', './', '../' or '~'; got {value!r}"
        )

    @field_validator("filename")
    @classmethod
    def _weights_file(cls, value: str) -> str:
        if not value.endswith((".safetensors", ".pth", ".pt")):
            raise ValueError(f"filename must end in .safetensors, .pth or .pt; got {value!r}")
        return value


class CombinedWeights(_Strict):
    """Weights of the `combined` score: a weighted mean of the gate scores, each first scaled to 0-1
    over its documented range (aesthetic 0-1, alignment 0-100, laion 1-10, hps 0-1, pickscore 0-100;
    deployments.names.SCORE_RANGES). Unset weights are 0."""

    aesthetic: float = Field(0.0, ge=0, le=100, description="Weight of the aesthetic score (0-1).")
    alignment: float = Field(0.0, ge=0, le=100, description="Weight of alignment / 100.")
    laion: float = Field(0.0, ge=0, le=100, description="Weight of (laion - 1) / 9.")
    hps: float = Field(0.0, ge=0, le=100, description="Weight of the HPSv2.1 score (0-1; needs an hps scorer).")
    pickscore: float = Field(0.0, ge=0, le=100, description="Weight of pickscore / 100 (needs a pickscore scorer).")

    @model_validator(mode="after")
    def _some_weight(self) -> "CombinedWeights":
        if sum(self.model_dump().values()) <= 0:
            raise ValueError(f"at least one weight ({', '.join(COMBINABLE)}) must be above 0")
        return self


# The decorators' max_ongoing_requests of the image generator and the scorer (config may override
# them): a replica must be able to hold a full batch.
IMAGE_GENERATOR_MAX_ONGOING_REQUESTS = 4
SCORER_MAX_ONGOING_REQUESTS = 8


class BatchingConfig(_Strict):
    """Request batching (Ray Serve's @serve.batch). Image models: requests for the same size, steps,
    guidance, LoRA set, control and edit run as one pipeline call; different ones never mix. The
    scorer: concurrent score calls run as one CLIP forward pass, each image against its own prompt."""

    enabled: bool = Field(False, description="Batch requests that arrive within `wait_ms` of each other.")
    max_batch_images: int = Field(8, ge=1, le=64, description="Most images in one pipeline call (or forward pass).")
    wait_ms: float = Field(10.0, ge=0, le=1000, description="How long the first request waits for others to join.")


class ClipOptions(_Strict):
    """The CLIP scorer's texts and LAION head: the `options:` of a `scorers:` entry of family clip
    (and the fields of the old `scorer:` block beside its source, device and batching)."""

    aesthetic_positive: str = Field(
        "a beautiful, high-quality, professional photograph",
        min_length=1,
        description="Text the aesthetic score compares each image with (the 'good' side).",
    )
    aesthetic_negative: str = Field(
        "an ugly, low-quality, amateur photograph",
        min_length=1,
        description="Text the aesthetic score compares each image with (the 'bad' side).",
    )

    aspects: AspectTexts = Field(
        default_factory=AspectTexts,
        description="Text pairs of the aspect scores (composition, lighting, colors, sharpness, style).",
    )
    laion: LaionHeadConfig = Field(
        default_factory=LaionHeadConfig,
        description="The LAION aesthetic predictor head (the `laion` score, 1-10).",
    )

    @model_validator(mode="after")
    def _distinct_aesthetic_texts(self) -> "ClipOptions":
        if self.aesthetic_positive.strip() == self.aesthetic_negative.strip():
            raise ValueError("aesthetic_positive and aesthetic_negative must differ")
        return self

    def laion_source_for(self, clip_source: str) -> str:
        """Where the LAION head comes from, with the default resolved against the CLIP source."""
        if self.laion.source is not None:
            return self.laion.source
        return TINY if clip_source == TINY else PUBLIC_LAION_HEAD


class ScorerConfig(ClipOptions):
    """CLIP scoring of generated images: the old `scorer:` block (deprecated: a `scorers:` entry of
    family clip replaces it; `clip_entry` converts one)."""

    source: ModelSource = Field(
        "openai/clip-vit-large-patch14",
        description="Hugging Face repo id, local folder (transformers layout) or 'tiny'.",
    )
    device: DeviceOptions = Field(default_factory=DeviceOptions)
    batching: BatchingConfig = Field(
        default_factory=BatchingConfig, description="Batch concurrent score calls into one forward pass; default off."
    )

    @property
    def laion_source(self) -> str:
        return self.laion_source_for(self.source)


class ScorerEntry(_Strict):
    """One scorer: an entry of `scorers:`. The family (`deployments.scoring.families`: clip, hps,
    pickscore, or an import path) says what it computes and how it loads; the entry says where its
    weights are and where it runs. Every enabled entry is loaded by the one scorer deployment
    (`ClipScorer`, its replicas and GPU share under `deployments.ClipScorer`), so a request's scores
    come from one call."""

    family: str = Field(description="A built-in scorer family (clip, hps, pickscore) or an import path "
                                    "('package.module:FAMILY').")
    source: ModelSource = Field(description="Hugging Face repo id, local folder or file (as the family reads it), "
                                            "or 'tiny' (random weights, tests and the dev profile).")
    enabled: bool = Field(True, description="false: listed but not loaded (e.g. a scorer whose licence you "
                                            "have not accepted).")
    device: DeviceOptions = Field(default_factory=DeviceOptions)
    options: dict = Field(default_factory=dict, description="The family's own options (clip: aesthetic texts, "
                                                            "aspects, laion; hps and pickscore: processor, alignment).")


class ScoringConfig(_Strict):
    """What the scorer deployment loads: the enabled `scorers:` entries and how calls batch."""

    scorers: tuple[ScorerEntry, ...] = Field(min_length=1)
    batching: BatchingConfig = Field(default_factory=BatchingConfig)


def clip_entry(config: ScorerConfig) -> ScorerEntry:
    """The old `scorer:` block as a `scorers:` entry of family clip (its texts and head as options)."""
    options = config.model_dump(exclude={"source", "device", "batching"}, exclude_unset=True)
    return ScorerEntry(family="clip", source=config.source, device=config.device, options=options)


class LlmConfig(_Strict):
    """The LLM that rewrites short ideas into detailed prompts (enhancer mode `llm`).

    `transformers`: a local instruction-tuned causal LM loaded in the PromptEnhancer replica (it takes
    a GPU share in the GPU profiles). `ollama` / `openai`: an external server (Ollama's `/api/generate`,
    or any OpenAI-compatible `/v1/chat/completions`, e.g. vLLM or llama.cpp's server) called with httpx.
    Whatever the backend, an answer that fails the guardrails, or a backend that fails or runs past
    `timeout_s`, falls back to the template enhancer, and the response says so.
    """

    backend: Literal["transformers", "ollama", "openai"] = Field(
        "transformers", description="Where the LLM runs: in the replica (transformers) or behind a URL."
    )
    source: str = Field(
        "Qwen/Qwen2.5-1.5B-Instruct", min_length=1,
        description="transformers: hub repo id, local folder or 'tiny'. ollama/openai: the server's model name.",
    )
    url: str | None = Field(
        None, description="ollama/openai: base URL, e.g. http://127.0.0.1:11434 (Ollama) or http://host:8000 (vLLM)."
    )
    api_key_env: str | None = Field(
        None, min_length=1, description="openai: environment variable holding the bearer token (never the key itself)."
    )
    api_key_file: str | None = Field(
        None, min_length=1,
        description="openai: a file holding the bearer token (a mounted Secret), read on each PromptEnhancer replica. "
                    "Wins over api_key_env.",
    )
    device: DeviceOptions = Field(default_factory=DeviceOptions, description="transformers backend only.")
    max_new_tokens: int = Field(120, ge=8, le=1024, description="Token budget of one answer.")
    temperature: float = Field(
        0.0, ge=0, le=2, description="0: greedy (the same prompt always gives the same answer); above 0: seeded sampling."
    )
    seed: int = Field(0, ge=0, description="Sampling seed when temperature > 0, so answers can be reproduced.")
    timeout_s: float = Field(15.0, gt=0, le=600, description="Time budget of one answer; past it the template answers.")
    max_prompt_chars: int = Field(
        700, ge=50, le=4000, description="Longest accepted answer (characters); longer falls back to the template."
    )
    min_subject_overlap: float = Field(
        0.5, ge=0, le=1,
        description="Share of the user's subject words the answer must keep; less counts as off-topic.",
    )

    @model_validator(mode="after")
    def _backend_fields(self) -> "LlmConfig":
        if self.backend == "transformers":
            validate_source(self.source)
            if self.url is not None:
                raise ValueError("url applies to the ollama and openai backends; the transformers backend loads `source`")
        elif self.url is None or not self.url.startswith(("http://", "https://")):
            raise ValueError(f"backend {self.backend!r} needs url, an http:// or https:// base URL; got {self.url!r}")
        for field in ("api_key_env", "api_key_file"):
            if getattr(self, field) is not None and self.backend != "openai":
                raise ValueError(f"{field} applies to the openai backend only")
        return self


class EnhancerConfig(_Strict):
    """Prompt enhancement: style templates, or a local/external LLM with the template as fallback."""

    mode: Literal["template", "llm"] = Field(
        "template", description="template: style descriptors and quality modifiers; llm: rewritten by `llm`."
    )
    default_style: Style = Field(
        "photorealistic", description="Style used when a request names none."
    )
    llm: LlmConfig = Field(default_factory=LlmConfig, description="The LLM, used when mode is llm.")
    blocklist: list[str] = Field(
        default_factory=list,
        description="Words or phrases an LLM answer must not contain (the ingress refuses prompts with them too).",
    )


def _lora_weight_name(value: str) -> str:
    if not value.endswith(".safetensors") or value.startswith("/") or ".." in value or "\\" in value:
        raise ValueError(f"weight_name must be a relative path to a .safetensors file without '..'; got {value!r}")
    return value


class LoraHubEntry(_Strict):
    """One LoRA from the Hugging Face Hub, loaded with `load_lora_weights(repo, weight_name=...)`."""

    name: Annotated[str, AfterValidator(check_lora_name)] = Field(
        description="What requests call it (no '/', '\\\\' or '..'; at most 128 characters)."
    )
    repo: str = Field(pattern=_HUB_ID.pattern, description="Hugging Face repo id, 'org/name'.")
    weight_name: Annotated[str, AfterValidator(_lora_weight_name)] = Field(
        description="The .safetensors file in the repo (a relative path; only safetensors are ever loaded).",
    )
    family: str = Field(
        description="The model family it was trained for, as image_models entries name it (not read from the "
                    "file: it is not downloaded until used; the app's config checks that the family exists)."
    )


class LoraConfig(_Strict):
    """LoRA adapters requests may name (`loras: [{name, scale}]`), and how many a replica keeps loaded."""

    dir: str | None = Field(
        None,
        min_length=1,
        description=(
            "Directory of *.safetensors LoRA files, each named by its file stem; rescanned when files are added "
            "or removed. A relative path is resolved where the app is built; generator nodes must see it at the "
            "same path. A missing directory lists nothing. Other file types, sub-folders and symlinks leading "
            "out of it are ignored."
        ),
    )
    hub: list[LoraHubEntry] = Field(default_factory=list, description="Hub LoRAs; a hub entry wins over a file of the same name.")
    max_per_request: int = Field(4, ge=1, le=8, description="Most LoRAs one request may combine.")
    cache_size: int = Field(
        8, ge=1, le=64,
        description="Adapters each generator replica keeps loaded; the least recently used is unloaded past it.",
    )

    @model_validator(mode="after")
    def _check(self) -> "LoraConfig":
        if self.cache_size < self.max_per_request:
            raise ValueError(
                f"cache_size ({self.cache_size}) must be at least max_per_request ({self.max_per_request}): "
                "a request's adapters are all loaded at once"
            )
        names = [entry.name for entry in self.hub]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"hub LoRA names must be unique; repeated: {duplicates}")
        return self


MODEL_ID_PATTERN = r"^[a-z0-9]+(?:[.-][a-z0-9]+)*$"


class ModelLimits(_Strict):
    """Narrower limits than the family allows (e.g. FLUX.1-schnell: 1-4 steps, no guidance). Unset: the family's."""

    min_steps: int | None = Field(None, ge=1, description="Fewest denoising steps a request may ask for.")
    max_steps: int | None = Field(None, ge=1, description="Most denoising steps a request may ask for.")
    min_guidance: float | None = Field(None, ge=0, description="Lowest guidance_scale a request may ask for.")
    max_guidance: float | None = Field(None, ge=0, description="Highest guidance_scale; 0 for distilled models.")


class VaeMemory(_Strict):
    """How the VAE decodes, to bound the memory peak of large batches and sizes (diffusers' own switches)."""

    slicing: bool = Field(
        True, description="Decode a batch one image at a time: the peak no longer grows with the batch; the "
                          "images are the same and decoding takes about as long.",
    )
    tiling: bool = Field(
        False, description="Decode in overlapping tiles when the image is larger than the VAE's tile size "
                           "(its config's sample_size: 1024 px for SDXL's and FLUX's VAEs, so only larger "
                           "requests are tiled). Bounds the peak at 2048x2048; tiles blend at their seams.",
    )


# How the denoiser's weights may be stored on the card (`memory.weights`): the names the memory plan
# (deployments/runtime/sim/memory.py) and the loader (deployments/runtime/loading.py) read.
WEIGHT_FORMATS = ("native", "fp8", "gguf_q8_0", "gguf_q4_0", "nf4")


class ResidencyRoom(_Strict):
    """An on-demand model's share of its card, from the memory plan: what the card keeps for the
    on-demand models together (the residency broker's room), and what this one takes while on it."""

    budget_gib: float = Field(gt=0, description="GiB the card keeps for its on-demand models together.")
    model_gib: float = Field(gt=0, description="GiB this model holds on the card while it is there (weights, a call's activations).")


class MemoryConfig(_Strict):
    """How a model fits a smaller card: where its weights live between calls and how the denoiser's
    are stored. Everything off by default (the whole model resident on its device, in its dtype)."""

    offload: Literal["none", "model", "sequential"] = Field(
        "none",
        description="CPU offload on CUDA (diffusers): 'model' moves each component (text encoders, denoiser, VAE) "
                    "to the GPU only while it runs; 'sequential' moves layer by layer (least memory, slowest). "
                    "Video entries set theirs in `options.offload`.",
    )
    weights: Literal[WEIGHT_FORMATS] = Field(
        "native",
        description="The denoiser's weight storage: 'native' (the device's dtype); 'fp8' (float8_e4m3fn storage, "
                    "upcast layer by layer to the dtype for compute: diffusers enable_layerwise_casting); "
                    "'gguf_q8_0' / 'gguf_q4_0' (a GGUF checkpoint of the denoiser, `gguf_file`, dequantized on "
                    "the fly; FLUX only); 'nf4' (bitsandbytes 4-bit on load; CUDA only).",
    )
    gguf_file: str | None = Field(
        None,
        description="With weights gguf_*: the GGUF file of the denoiser, a local path or 'owner/repo/file.gguf' on "
                    "the hub (genserve download fetches it). Its config comes from the entry's `source` "
                    "(the `transformer/` folder), so a local folder keeps loading offline.",
    )
    residency: Literal["resident", "on_demand"] = Field(
        "resident",
        description="'resident': the model stays on its device. 'on_demand': it lives in host RAM and moves to the "
                    "GPU when a request needs it, the least recently used on-demand model of the same GPU moving "
                    "out first (docs/gpu.md, 'Workstation cards').",
    )

    room: ResidencyRoom | None = Field(
        None, description="Filled in from the memory plan on a declared card (`gpu:`) for an on-demand model; "
                          "set it only to override the plan.")

    @model_validator(mode="after")
    def _gguf_file_with_gguf(self) -> "MemoryConfig":
        gguf = self.weights.startswith("gguf")
        if gguf and not self.gguf_file:
            raise ValueError(f"memory.weights {self.weights!r} needs memory.gguf_file (a .gguf path or owner/repo/file.gguf)")
        if self.gguf_file and not gguf:
            raise ValueError("memory.gguf_file applies only with memory.weights 'gguf_q8_0' or 'gguf_q4_0'")
        if self.gguf_file and not self.gguf_file.endswith(".gguf"):
            raise ValueError(f"memory.gguf_file must name a .gguf file; got {self.gguf_file!r}")
        return self

    def gguf_location(self) -> tuple[str | None, str]:
        """(hub repo, filename) of `gguf_file`; (None, the path) for a local file."""
        path = self.gguf_file or ""
        if is_local_path(path) or path.count("/") < 2:
            return None, path
        owner, repo, filename = path.split("/", 2)
        return f"{owner}/{repo}", filename


class GpuCard(_Strict):
    """The one card a workstation profile runs on: the memory plan checks the profile against it."""

    name: str = Field(min_length=1, max_length=64, description="The card, e.g. rtx-4090 (a deployments/sim_profiles.yaml "
                                                                 "key where one matches, for the simulated card).")
    memory_gib: float = Field(gt=0, le=1024, description="Its memory in GiB (2^30 bytes), as torch reports total_memory.")

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * 2**30)


class StepCacheConfig(_Strict):
    """First-Block-Cache through diffusers' cache hooks: when the first transformer block's output
    changed less than `threshold` (relative L1) since the last computed step, the remaining blocks
    are skipped and their cached residual reused. Lossy: off unless configured."""

    kind: Literal["first_block"] = Field("first_block", description="The cache hook (diffusers' FirstBlockCacheConfig).")
    threshold: float = Field(
        0.2, gt=0, le=1,
        description="Relative change of the first block's output under which the other blocks are skipped; "
                    "higher skips more steps and drifts more (0.2-0.3 is the published range for FLUX).",
    )


class AccelerationConfig(_Strict):
    """How a model's pipeline is sped up: its acceleration tier. Everything is off by default (plain
    eager, the device's dtype). The model's family says which parts its denoiser supports
    (checked when the config loads); the hardware is checked when a replica loads the model, and
    a tier it cannot run fails there, naming the field. VAE slicing and tiling are the entry's
    `vae:` settings."""

    compile: Literal["none", "repeated_blocks", "full"] = Field(
        "none",
        description="torch.compile of the denoiser: 'repeated_blocks' compiles the one repeated block class "
                    "once (diffusers' compile_repeated_blocks; fast to compile, most of the gain), 'full' the "
                    "whole module. Compilation happens in the replica's warm-up, before it reports healthy.",
    )
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = Field(
        "default", description="torch.compile's mode ('reduce-overhead' adds CUDA graphs).",
    )
    fullgraph: bool = Field(False, description="torch.compile(fullgraph=True): fail rather than break the graph.")
    quantization: Literal["none", "fp8_dynamic", "int8_weight_only"] = Field(
        "none",
        description="Quantize the denoiser's linear layers through torchao: 'fp8_dynamic' (float8 weights and "
                    "activations; CUDA compute capability 8.9+: Ada, Hopper), 'int8_weight_only' (any device). "
                    "Needs the torchao package.",
    )
    cache: StepCacheConfig | None = Field(None, description="Step caching (lossy); null: off.")
    fuse_qkv: bool = Field(False, description="Fuse the attention's Q, K and V projections into one matmul.")
    attention_backend: Literal["default", "native", "_native_math", "_native_efficient", "_native_flash",
                               "_native_cudnn"] = Field(
        "default",
        description="diffusers' attention backend: torch SDPA variants only (no kernel downloaded at run time); "
                    "'default' leaves the model's own choice.",
    )
    channels_last: bool = Field(False, description="channels_last memory format for the denoiser and VAE (UNets).")

    @model_validator(mode="after")
    def _compile_mode_with_compile(self) -> "AccelerationConfig":
        if self.compile == "none" and (self.compile_mode != "default" or self.fullgraph):
            raise ValueError("compile_mode and fullgraph apply only with compile 'repeated_blocks' or 'full'")
        return self

    def active(self) -> dict:
        """The fields that differ from plain eager: what GET /v1/models reports as the tier."""
        return self.model_dump(exclude_defaults=True)

    @property
    def lossy(self) -> bool:
        return self.cache is not None


class WarmupShape(_Strict):
    """One call a replica makes before it reports healthy."""

    width: int = Field(ge=64, le=2048, multiple_of=16, description="Image width.")
    height: int = Field(ge=64, le=2048, multiple_of=16, description="Image height.")
    steps: int | None = Field(None, ge=1, description="Denoising steps; default: the model's default.")
    images: int = Field(1, ge=1, le=64, description="Images in the call (a batch size to warm up).")


class WarmupConfig(_Strict):
    """The warm-up calls run in a replica's constructor, so no user pays a first call (or compile)."""

    default_shape: bool = Field(True, description="Warm up the model's default size and steps, one image.")
    shapes: list[WarmupShape] = Field(default_factory=list, description="More shapes to warm up.")


class VideoWarmupConfig(_Strict):
    """The warm-up call a video replica makes in its constructor, so no user pays a first call."""

    default_shape: bool = Field(True, description="One tiny call (the family's smallest size, fewest frames and "
                                                  "steps) before the replica is healthy.")


class ImageModelConfig(_Strict):
    """One servable image model: an entry of `image_models:`. The family says what the model is; the
    entry says where its weights are, how it runs, and its defaults and narrower limits."""

    id: str = Field(
        pattern=MODEL_ID_PATTERN, max_length=64,
        description="What requests name in `model`: lower-case letters and digits, in parts joined by '-' or "
                    "'.' (e.g. flux-schnell, sdxl-turbo, my-finetune.v2); at most 64 characters.",
    )
    family: str = Field(
        description="A built-in family (docs/models.md lists them) or an import path to one ('package.module:FAMILY')."
    )
    source: ModelSource = Field(description="Hugging Face repo id, local folder (diffusers layout) or 'tiny'.")
    description: str | None = Field(None, max_length=300, description="Shown in GET /v1/models; default: the family's.")
    device: DeviceOptions = Field(default_factory=DeviceOptions)
    default_width: int | None = Field(None, ge=256, le=2048, multiple_of=16, description="Default: the family's.")
    default_height: int | None = Field(None, ge=256, le=2048, multiple_of=16, description="Default: the family's.")
    default_steps: int | None = Field(None, ge=1, description="Denoising steps when a request gives none.")
    default_guidance: float | None = Field(None, ge=0, description="guidance_scale when a request gives none.")
    limits: ModelLimits = Field(default_factory=ModelLimits, description="Narrower limits than the family's.")
    vae: VaeMemory = Field(default_factory=VaeMemory, description="VAE slicing and tiling (memory of large requests).")
    options: dict = Field(default_factory=dict, description="The family's own options (e.g. sdxl: controlnets).")
    acceleration: AccelerationConfig = Field(
        default_factory=AccelerationConfig, description="The acceleration tier (docs/acceleration.md); default: none."
    )
    batching: BatchingConfig = Field(default_factory=BatchingConfig, description="Request batching; default: off.")
    warmup: WarmupConfig = Field(default_factory=WarmupConfig, description="Warm-up calls before the replica is healthy.")
    memory: MemoryConfig = Field(default_factory=MemoryConfig,
                                 description="Offload, weight storage and residency (docs/gpu.md); default: resident, native.")


class VideoModelConfig(_Strict):
    """One servable video model: an entry of `video_models:`. The family (`deployments.families.svd`,
    `ltx`, or an import path) says what the model can do and its frame and size rules; the entry says
    where its weights are, how it runs, its defaults, and its memory options (`options:`)."""

    id: str = Field(
        pattern=MODEL_ID_PATTERN, max_length=64,
        description="What requests name in `model` (e.g. svd-xt, ltx-video); as image model ids.",
    )
    family: str = Field(description="A built-in video family (docs/models.md lists them) or an import path ('package.module:FAMILY').")
    source: ModelSource = Field(description="Hugging Face repo id, local folder (diffusers layout) or 'tiny'.")
    description: str | None = Field(None, max_length=300, description="Shown in GET /v1/models; default: the family's.")
    device: DeviceOptions = Field(default_factory=DeviceOptions)
    default_width: int | None = Field(None, ge=1, description="Default: the family's; must fit its size rule.")
    default_height: int | None = Field(None, ge=1, description="Default: the family's; must fit its size rule.")
    default_steps: int | None = Field(None, ge=1, description="Denoising steps when a request gives none.")
    default_num_frames: int | None = Field(None, ge=1, description="Frames when a request gives none; must fit the "
                                                                     "family's frame rule (img2vid: 14).")
    default_fps: int | None = Field(None, ge=1, le=60, description="Frames per second when a request gives none.")
    options: dict = Field(default_factory=dict, description="The family's own options (memory: offload, ...).")
    warmup: VideoWarmupConfig = Field(default_factory=VideoWarmupConfig,
                                      description="The warm-up call before the replica is healthy.")
    memory: MemoryConfig = Field(default_factory=MemoryConfig,
                                 description="Weight storage and residency (docs/gpu.md); offload is `options.offload`.")

    @model_validator(mode="after")
    def _offload_in_options(self) -> "VideoModelConfig":
        if self.memory.offload != "none":
            raise ValueError("memory.offload: a video entry sets its offload in options.offload (its family's option)")
        if self.memory.weights.startswith("gguf") or self.memory.weights == "nf4":
            raise ValueError(f"memory.weights {self.memory.weights!r}: video entries take 'native' or 'fp8'")
        return self

