"""Prompt enhancement deployment: style templates, or an LLM with the template as its fallback.

- Template mode appends a style's descriptors and quality modifiers to the user's prompt and picks
  the style's negative-prompt preset. The user's subject always comes first, so text encoders that
  truncate (CLIP keeps 77 tokens) keep it.
- LLM mode asks a local causal LM or an external server (`deployments.enhancer.llm`) for a detailed prompt in
  the form the target model reads best (sentences for FLUX, tags for SDXL). The answer is cleaned
  and checked (`deployments.enhancer.prompt_rules`); when it is empty, too long, off-topic or blocked, or the
  backend fails or runs out of time, the template answers and `EnhancedPrompt.fallback_reason` says
  why. A failing LLM never fails the request.
- The prompts fit the target's text encoders (`deployments.enhancer.fit`): additions that CLIP would
  cut at 77 tokens are left out instead, and `EnhancedPrompt.dropped` names them.
- `revise` (regenerate with feedback): a new prompt that addresses the aspects the scorer found
  weakest, by the LLM or by template fixes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid

from ray import serve

from deployments import names
from deployments.config import EnhancerConfig
from deployments.enhancer.fit import Fits, TokenBudget, fit_terms, trim_clauses
from deployments.enhancer.llm import LlmError, build_llm, enhance_messages, revise_messages
from deployments.enhancer.prompt_rules import check_llm_prompt, clean_llm_output
from deployments.runtime.loading import resolve_placement
from deployments.runtime.metrics import ModelMetrics
from deployments.runtime.types import EnhancedPrompt, PromptForm

logger = logging.getLogger("ray.serve")

STYLES: dict[str, list[str]] = {
    "photorealistic": ["professional photography", "natural lighting", "depth of field", "sharp focus"],
    "artistic": ["digital art", "concept art", "detailed illustration", "vibrant colors"],
    "cinematic": ["cinematic lighting", "dramatic composition", "film still", "35mm photograph", "bokeh"],
    "anime": ["anime style", "manga illustration", "cel shading", "detailed anime art"],
    "none": [],
}

QUALITY_MODIFIERS: dict[str, list[str]] = {
    "high": ["highly detailed", "best quality"],
    "standard": ["detailed"],
    "none": [],
}
# The templates cover exactly the names every request and config accepts (deployments.names).
assert tuple(STYLES) == names.STYLES and tuple(QUALITY_MODIFIERS) == names.QUALITIES

_GENERAL_NEGATIVE = "low quality, worst quality, low resolution, blurry, jpeg artifacts, watermark, signature, text"

NEGATIVE_PRESETS: dict[str, str] = {
    "photorealistic": "cartoon, anime, illustration, painting, drawing, oversaturated, distorted, " + _GENERAL_NEGATIVE,
    "artistic": "photograph, photorealistic, poorly drawn, distorted, " + _GENERAL_NEGATIVE,
    "cinematic": "flat lighting, snapshot, overexposed, cartoon, " + _GENERAL_NEGATIVE,
    "anime": "photograph, photorealistic, 3d render, bad anatomy, extra limbs, " + _GENERAL_NEGATIVE,
    "none": _GENERAL_NEGATIVE,
}


def template_enhance(prompt: str, style: str, quality: str, negative_prompt: str | None = None,
                     fits: Fits | None = None) -> EnhancedPrompt:
    """Append the style's descriptors and the quality modifiers the prompt does not already say.

    A negative prompt given by the user is kept as it is; otherwise the style's preset is used.
    `fits`: whether a text fits the target's text encoders (`deployments.enhancer.fit`); additions and
    preset terms that would not fit are left out (`dropped`), the user's words never.
    """
    if style not in STYLES:
        raise ValueError(f"style must be one of {sorted(STYLES)}; got {style!r}")
    if quality not in QUALITY_MODIFIERS:
        raise ValueError(f"quality must be one of {sorted(QUALITY_MODIFIERS)}; got {quality!r}")
    subject = prompt.strip().rstrip(",")
    said = subject.lower()
    additions = [term for term in STYLES[style] + QUALITY_MODIFIERS[quality] if term.lower() not in said]
    enhanced, dropped = fit_terms([subject], additions, fits)
    negative = negative_prompt
    if negative is None:
        negative, dropped_negative = fit_terms([], NEGATIVE_PRESETS[style].split(", "), fits)
        dropped += [f"negative: {term}" for term in dropped_negative]
    return EnhancedPrompt(prompt=enhanced, negative_prompt=negative, style=style, enhancer="template",
                          dropped=tuple(dropped))


# What a template revision appends for each weak aspect (aspect names from the scorer, plus the
# gate metrics themselves when no aspect scores are available).
ASPECT_FIXES: dict[str, list[str]] = {
    "composition": ["balanced composition", "rule of thirds", "clear focal point"],
    "lighting": ["soft natural lighting", "well lit", "balanced exposure"],
    "colors": ["harmonious vibrant colors", "rich color palette"],
    "sharpness": ["sharp focus", "crisp fine details"],
    "style": ["coherent consistent style"],
    "aesthetic": ["masterpiece", "award-winning", "beautiful composition"],
    "laion": ["masterpiece", "award-winning", "beautiful composition"],
    "combined": ["masterpiece", "sharp focus", "balanced composition"],
}


def template_revise(previous: EnhancedPrompt, weak: list[str], idea: str, fits: Fits | None = None) -> EnhancedPrompt:
    """`previous` with fixes for the weak aspects appended (those it does not already say and that
    fit the target's encoders: `fits`, as for `template_enhance`).

    Weak `alignment` (the image does not show the prompt) repeats the user's idea up front, where
    every text encoder reads it first (when that fits)."""
    said = previous.prompt.lower()
    additions = [term for aspect in weak for term in ASPECT_FIXES.get(aspect, []) if term.lower() not in said]
    prompt, dropped = fit_terms([previous.prompt], list(dict.fromkeys(additions)), fits)
    showing = f"clearly showing {idea.strip()}, {prompt}"
    if "alignment" in weak and not said.startswith(f"clearly showing {idea.strip().lower()}"):
        if fits is None or fits(showing):
            prompt = showing
        else:
            dropped.append(f"clearly showing {idea.strip()}")
    return dataclasses.replace(previous, prompt=prompt, enhancer="template", fallback_reason=None,
                               dropped=tuple(dropped))


@serve.deployment(name="PromptEnhancer", max_ongoing_requests=64, ray_actor_options={"num_cpus": 0.1})
class PromptEnhancer:
    """Turns a short idea into a prompt for the target model, with a negative prompt.

    A local LLM runs one answer at a time per replica (behind a lock, in a worker thread); external
    backends are called concurrently.
    """

    def __init__(self, config: EnhancerConfig, metrics: bool = True):
        self._config = config
        self._llm = None
        self._lock = asyncio.Lock()
        self._budget = TokenBudget()
        self._metrics = None
        if config.mode == "llm":
            if metrics:
                from ray.serve import metrics as serve_metrics

                self._metrics = serve_metrics.Counter(
                    "genserve_enhancer_fallbacks_total",
                    description="LLM enhancements answered by the template instead, by reason.",
                    tag_keys=("reason",),
                )
            started = time.perf_counter()
            placement = resolve_placement(config.llm.device) if config.llm.backend == "transformers" else None
            self._llm = build_llm(config.llm, placement)
            self._model_metrics = ModelMetrics(
                "llm", placement.device if placement else "remote", enabled=metrics and placement is not None
            )
            logger.info(
                "LLM enhancer %s (%s) ready in %.1fs", config.llm.source, config.llm.backend,
                time.perf_counter() - started,
            )

    async def device_time(self) -> dict | None:
        """This replica's LLM-call totals, as the generators give them (`genserve bench` adds them to
        the device time: the LLM runs on the GPU too); None without a local LLM (template mode, or a
        remote backend, whose time is not this GPU's)."""
        metrics = getattr(self, "_model_metrics", None)
        if metrics is None or self._llm is None or self._llm.backend != "transformers":
            return None
        return metrics.device_time()

    async def enhance(
        self,
        prompt: str,
        style: str | None = None,
        quality: str = "high",
        negative_prompt: str | None = None,
        target: PromptForm | None = None,
    ) -> EnhancedPrompt:
        """`target`: the prompt form of the model family the prompt is for (its `prompt_form`; None:
        the neutral form); it shapes the LLM's answer."""
        style = style or self._config.default_style
        fits = await self._fits(target)
        template = template_enhance(prompt, style, quality, negative_prompt, fits)
        if self._llm is None:
            return template
        style_hint = style if style == "none" else f"{style} ({', '.join(STYLES[style])})"
        return await self._ask(enhance_messages(prompt, style_hint, target), prompt, template, fits)

    async def revise(self, prompt: str, previous: EnhancedPrompt, weak: list[str],
                     target: PromptForm | None = None) -> EnhancedPrompt:
        """A new prompt for the next round, addressing `weak` (the lowest-scoring aspects)."""
        fits = await self._fits(target)
        fallback = template_revise(previous, weak, prompt, fits)
        if self._llm is None:
            return fallback
        return await self._ask(revise_messages(prompt, previous.prompt, weak, target), prompt, fallback, fits)

    async def _fits(self, target: PromptForm | None) -> Fits | None:
        # The first request for a model loads its tokenizers (files on disk): off the event loop.
        return await asyncio.to_thread(self._budget.fits_for, target)

    async def _ask(self, messages: list[dict], idea: str, fallback: EnhancedPrompt,
                   fits: Fits | None = None) -> EnhancedPrompt:
        llm = self._config.llm
        try:
            if self._llm.backend == "transformers":
                # The time budget counts from arrival: waiting for the replica's one model counts too.
                arrived = time.monotonic()
                try:
                    await asyncio.wait_for(self._lock.acquire(), llm.timeout_s)
                except asyncio.TimeoutError:
                    return self._fall_back(fallback, "timeout", f"the LLM stayed busy for {llm.timeout_s:g}s")
                try:
                    budget = llm.timeout_s - (time.monotonic() - arrived)
                    with self._model_metrics.track():
                        raw = await asyncio.to_thread(self._llm.complete, messages, budget)
                finally:
                    self._lock.release()
            else:
                # The client's own timeout covers each phase; this bounds the whole exchange.
                raw = await asyncio.wait_for(self._llm.complete(messages), llm.timeout_s)
        except asyncio.TimeoutError:
            return self._fall_back(fallback, "timeout", f"no answer within {llm.timeout_s:g}s")
        except LlmError as error:
            if error.reason != "backend_error":
                return self._fall_back(fallback, error.reason, error.detail)
            return self._fall_back_logged(fallback, error.detail)
        except Exception as error:  # a broken model or backend must not fail the image request
            logger.exception("LLM enhancer failed")
            return self._fall_back_logged(fallback, f"{type(error).__name__}: {error}"[:200])
        answer = clean_llm_output(raw)
        reason = check_llm_prompt(answer, idea, llm.max_prompt_chars, llm.min_subject_overlap, self._config.blocklist)
        if reason is not None:
            return self._fall_back(fallback, reason, f"answer began {raw.strip()[:60]!r}")
        trimmed = trim_clauses(answer, fits)
        if trimmed is None:
            return self._fall_back(fallback, "too_long", "its first clause alone is longer than the text encoder keeps")
        answer, cut = trimmed
        negative_dropped = tuple(term for term in fallback.dropped if term.startswith("negative: "))
        return dataclasses.replace(fallback, prompt=answer, enhancer="llm", fallback_reason=None,
                                   dropped=(*cut, *negative_dropped))

    def _fall_back_logged(self, fallback: EnhancedPrompt, detail: str) -> EnhancedPrompt:
        """A backend error: the caller's `enhancer_fallback` gets a request id, the log the backend's
        own text (its error body can name hosts, paths or a token), under that id."""
        request_id = uuid.uuid4().hex[:12]
        logger.warning("LLM backend error (request id %s): %s", request_id, detail)
        return self._fall_back(fallback, "backend_error", f"the LLM backend failed; request id {request_id} in the "
                                                          "Enhancer's log")

    def _fall_back(self, fallback: EnhancedPrompt, reason: str, detail: str) -> EnhancedPrompt:
        if self._metrics is not None:
            self._metrics.inc(tags={"reason": reason})
        logger.info("LLM enhancement fell back to the template: %s (%s)", reason, detail)
        return dataclasses.replace(fallback, fallback_reason=f"{reason}: {detail}" if detail else reason)

    def info(self) -> dict:
        info = {"mode": self._config.mode, "styles": sorted(STYLES), "quality": sorted(QUALITY_MODIFIERS)}
        if self._llm is not None:
            info["llm"] = {"backend": self._config.llm.backend, "source": self._config.llm.source}
        return info
