"""The generate -> score -> regenerate policy, as plain async code over deployment handles.

Works with Ray Serve `DeploymentHandle`s and with `serve_app.services.local.LocalHandle` (in-process objects,
used by unit tests and the benchmark) alike: all it needs is `handle.method.remote(...)` returning
something awaitable.

With `revise_prompt`, each later round first asks the enhancer for a prompt that fixes the aspects
the last round's failing images scored lowest on ("regenerate with feedback"); each candidate
records the prompt it was made with.

An attempt generates the images still missing: the first generates `num_images`; each later one
only as many as have not yet reached the threshold, with fresh seeds. Best-of-N (`candidates`) adds
its extra images to every round, in the same generator call (one batch). Seeds are counted up from
the request's base seed, so one request with the same seed replays every attempt. The result keeps
the best passing images, in the order they were made, then fills up with the best failing ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from deployments.config import CombinedWeights
from deployments.runtime.types import (
    ControlInput,
    EditInput,
    EnhancedPrompt,
    GenerationOutput,
    GenerationParams,
    HiresPass,
    LoraRef,
    ProgressTarget,
    PromptForm,
)
from serve_app.protocol.schemas import MAX_SEED


class StageTimeout(TimeoutError):
    def __init__(self, stage: str, seconds: float, overall: bool = False):
        super().__init__(f"the request ran past its deadline of {seconds:g}s (request_timeout_s) in the {stage} stage"
                         if overall else f"the {stage} stage took longer than {seconds:g}s")
        self.stage = stage


class Overloaded(RuntimeError):
    """A downstream deployment turned the call away: its queue was full (Serve's
    max_queued_requests) or it had no replica. Raised by `call_stage` in place of Serve's own
    errors, so the ingress answers its JSON 503 (Serve's replica wrapper would otherwise answer
    its BackPressureError itself, in plain text) and the job dispatcher requeues the job."""

    def __init__(self, stage: str, status: int = 503, retry_after_s: float | None = None, unavailable: bool = False):
        super().__init__(f"the {stage} stage's deployment is {'unavailable' if unavailable else 'at capacity'}")
        self.stage, self.status, self.retry_after_s, self.unavailable = stage, status, retry_after_s, unavailable

    def __reduce__(self):
        return (type(self), (self.stage, self.status, self.retry_after_s, self.unavailable))


def cause_of(error: BaseException) -> BaseException:
    """The exception a remote call raised: Ray delivers one raised in a replica, or in a call it
    chained, as a RayTaskError whose `cause` is the original; any other error is itself."""
    from ray.exceptions import RayTaskError

    if isinstance(error, RayTaskError) and isinstance(error.cause, BaseException):
        return error.cause
    return error


def turned_away(error: BaseException, stage: str) -> Overloaded | None:
    """The Overloaded for a Serve rejection (direct, or inside a chained call's RayTaskError)."""
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    error = cause_of(error)
    if isinstance(error, BackPressureError):
        return Overloaded(stage, error.status_code, error.retry_after_s)
    if isinstance(error, DeploymentUnavailableError):
        return Overloaded(stage, unavailable=True)
    return None


# One deadline for a whole sync request, across its stages and rounds: (monotonic end, seconds).
# Set by `deadline()` around a request (the ingress's middleware and handle methods); a context
# variable, so concurrent requests on one event loop each see their own.
_deadline: contextvars.ContextVar[tuple[float, float] | None] = contextvars.ContextVar("genserve_deadline",
                                                                                        default=None)


@contextlib.contextmanager
def deadline(seconds: float):
    """Every `call_stage` inside waits at most until `seconds` from now, in all."""
    token = _deadline.set((time.monotonic() + seconds, seconds))
    try:
        yield
    finally:
        _deadline.reset(token)


class Turn(Protocol):
    """A synchronous request's turn on the image generators (the fair queue's, jobs.http.JobsApi):
    `ask` sends for it (once), `granted` waits for it, raising when none came; `waited_s` is the
    wait, from asking to the answer. With `overlap`, the prompt is enhanced while the turn comes;
    without, nothing runs before it (`turn_first`: under load the turn may wait long, and the
    enhancer must not run for requests that are not yet let in)."""

    overlap: bool
    waited_s: float

    def ask(self) -> None: ...

    async def granted(self) -> None: ...


# The running request's turn, set by `in_turn()` around a synchronous request (None: the request
# needs none, as a job's run). The graph asks for it once the request is planned, so the call to
# the JobRunner overlaps the enhancer's, and waits for it before the first generator call.
_turn: contextvars.ContextVar[Turn | None] = contextvars.ContextVar("genserve_turn", default=None)


@contextlib.contextmanager
def in_turn(turn: Turn):
    """`run_image_graph` calls inside use the generators only once `turn` is granted."""
    token = _turn.set(turn)
    try:
        yield
    finally:
        _turn.reset(token)


async def turn_first() -> None:
    """A request that waits for its turn before anything runs for it (no `overlap`) waits here, once
    it is planned (a 422 never takes a turn) and before it counts against its model's admission:
    requests waiting their turn are in the fair queue, not at the model."""
    turn = _turn.get()
    if turn is not None and not turn.overlap:
        turn.ask()
        await turn.granted()


@dataclass(frozen=True)
class ImagePlan:
    """A validated request with every default filled in."""

    prompt: str
    negative_prompt: str | None
    style: str | None
    quality: str
    enhance: bool
    use_negative_prompt: bool
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    base_seed: int
    num_images: int
    metric: str
    threshold: float
    max_attempts: int
    # Best-of-N: images generated per round for the `num_images` wanted (None: num_images).
    candidates: int | None = None
    percentile: float | None = None  # the request's quality_percentile, which `threshold` came from
    target: PromptForm | None = None  # the model family's prompt form, for the enhancer's LLM
    revise_prompt: bool = False
    loras: tuple[LoraRef, ...] = ()
    weights: CombinedWeights | None = None  # of the combined score; None: the scorer's default
    control: ControlInput | None = None
    edit: EditInput | None = None  # image-to-image or inpainting
    hires: HiresPass | None = None  # a second pass at a larger size
    # uint8 (H, W, 3) images every image is conditioned on; the prompt is then an instruction.
    references: tuple = ()
    # SHA-256 of the uploads ("init_image_sha256", "mask_sha256"; "reference_images_sha256", a list), for metadata.
    input_hashes: dict = field(default_factory=dict)

    @property
    def extra_candidates(self) -> int:
        """Images each round makes beyond those still missing, to choose the best from."""
        return 0 if self.candidates is None else self.candidates - self.num_images

    @property
    def mode(self) -> str:
        if self.references:
            return "instruction-edit"
        return "text-to-image" if self.edit is None else self.edit.mode

    @property
    def output_size(self) -> tuple[int, int]:
        """(width, height) of the images returned: the hires pass's when there is one."""
        return (self.width, self.height) if self.hires is None else (self.hires.width, self.hires.height)


@dataclass
class Candidate:
    attempt: int
    seed: int
    prompt: str
    image: np.ndarray
    scores: dict[str, float]
    passed: bool
    # Its encoding, started while it was being scored (`on_generated`); None when none was started.
    encoding: Awaitable | None = None


# Called with each image as it arrives, before its scores: (the round's prompt, the seed, the image).
# What it returns (an awaitable, e.g. an encoding in a worker thread) is kept as the candidate's
# `encoding`, so the ingress's CPU work on an image overlaps the scorer's device time.
OnGenerated = Callable[[EnhancedPrompt, int, np.ndarray], Awaitable | None]


@dataclass
class GraphResult:
    enhanced: EnhancedPrompt
    negative_prompt: str | None
    candidates: list[Candidate]
    chosen: list[Candidate]
    timings: dict[str, float] = field(default_factory=dict)
    # What the generator reported it spent generating (its own clock, GPU time on a GPU): the
    # cost of a gated image, for the quality metrics.
    device_seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return all(candidate.passed for candidate in self.chosen)


async def call_stage(awaitable, stage: str, timeout_s: float) -> Any:
    """Await a downstream response; past `timeout_s`, or past the request's `deadline()` if that
    comes first, cancel it and raise StageTimeout naming the stage.

    When the caller itself is cancelled (a job cancelled by its user), the downstream request is
    cancelled too, so the replica running it stops instead of finishing work nobody wants.
    """
    limit, overall = timeout_s, False
    current = _deadline.get()
    if current is not None and current[0] - time.monotonic() < timeout_s:
        limit, overall = max(0.0, current[0] - time.monotonic()), True
    # asyncio.timeout rather than wait_for: on Python 3.11, wait_for can swallow a cancellation
    # that arrives as its timeout fires, and a cancelled job would then run on to its end.
    try:
        async with asyncio.timeout(limit):
            return await awaitable
    except TimeoutError:
        _cancel(awaitable)
        raise StageTimeout(stage, current[1] if overall else timeout_s, overall) from None
    except asyncio.CancelledError:
        _cancel(awaitable)
        raise
    except Exception as error:
        overloaded = turned_away(error, stage)
        if overloaded is None:
            raise
        raise overloaded from None


def _cancel(awaitable) -> None:
    cancel = getattr(awaitable, "cancel", None)
    if cancel is not None:
        cancel()


def _enhance(plan: ImagePlan, enhancer):
    """The enhancer's pending response, or the prompt as given when enhancement is off."""
    if not plan.enhance:
        return EnhancedPrompt(prompt=plan.prompt, negative_prompt=plan.negative_prompt, style="none", enhancer="none")
    return enhancer.enhance.remote(plan.prompt, plan.style, plan.quality, plan.negative_prompt, target=plan.target)


def weakest_aspects(failing: list[Candidate], metric: str, count: int = 2) -> list[str]:
    """What the next prompt should fix: the `count` aspect scores lowest on average over the
    failing images, when the scorer gives aspect scores; else the gating metric itself."""
    aspects = [c.scores.get("aspects") for c in failing if isinstance(c.scores.get("aspects"), dict)]
    if not aspects:
        return [metric]
    names = sorted(set.intersection(*(set(scores) for scores in aspects)))
    means = {name: sum(scores[name] for scores in aspects) / len(aspects) for name in names}
    return sorted(means, key=lambda name: (means[name], name))[:count] or [metric]


def choose(candidates: list[Candidate], count: int, metric: str) -> list[Candidate]:
    """The best passing candidates (in generation order), then the best failing ones, `count` in all."""
    # `metric` is a flat score (aesthetic, alignment, laion or combined): higher is better in each.
    def best(group: list[Candidate]) -> list[Candidate]:
        return sorted(group, key=lambda c: c.scores[metric], reverse=True)

    order = {id(c): index for index, c in enumerate(candidates)}
    passing = sorted(best([c for c in candidates if c.passed])[:count], key=lambda c: order[id(c)])
    return (passing + best([c for c in candidates if not c.passed]))[:count]


async def run_image_graph(plan: ImagePlan, enhancer, generator, scorer, timeout_s: float = 600.0,
                          progress: ProgressTarget | None = None, on_generated: OnGenerated | None = None,
                          ) -> GraphResult:
    """`progress`: where the generator reports its denoising steps (async jobs); None for none.
    `on_generated`: see `OnGenerated`."""
    timings = {"enhance": 0.0, "generate": 0.0, "score": 0.0}
    # Responses are passed on unresolved: Serve hands the enhancer's prompt to the generator and
    # the generator's images to the scorer straight through the object store, so the three calls
    # of a round are dispatched at once instead of one round trip through this ingress each.
    turn = _turn.get()
    if turn is not None:
        turn.ask()  # a request that overlaps: its turn comes while the prompt is enhanced
    enhance_started = time.perf_counter()
    enhanced: EnhancedPrompt | Any = _enhance(plan, enhancer)
    if turn is not None:
        try:
            await turn.granted()
        except BaseException:
            _cancel(enhanced)  # no turn (or the request ended meanwhile): the prompt is not needed
            raise
        timings["turn"] = turn.waited_s
    control = plan.control
    if control is not None and control.preprocess:
        # The control map is made once (by the generator, which holds the depth estimator) while
        # the prompt is enhanced, and every round reuses it.
        started = time.perf_counter()
        control = await call_stage(generator.preprocess.remote(control), "preprocess", timeout_s)
        timings["preprocess"] = time.perf_counter() - started

    candidates: list[Candidate] = []
    next_seed_offset = 0
    device_seconds = 0.0
    for attempt in range(1, plan.max_attempts + 1):
        missing = plan.num_images - sum(c.passed for c in candidates)
        if missing <= 0:
            break
        batch = missing + plan.extra_candidates
        seeds = [(plan.base_seed + next_seed_offset + i) % (MAX_SEED + 1) for i in range(batch)]
        next_seed_offset += batch
        params = GenerationParams(
            seeds=seeds,
            width=plan.width,
            height=plan.height,
            num_inference_steps=plan.num_inference_steps,
            guidance_scale=plan.guidance_scale,
            progress=None if progress is None else dataclasses.replace(progress, round=attempt),
            loras=plan.loras,
            control=control,
            edit=plan.edit,
            hires=plan.hires,
            references=plan.references,
        )
        round_started = time.perf_counter()
        if attempt > 1 and plan.revise_prompt and plan.enhance:
            # Regenerate with feedback: a prompt that addresses what the last round scored lowest on.
            weak = weakest_aspects([c for c in candidates if c.attempt == attempt - 1 and not c.passed], plan.metric)
            enhanced = await call_stage(
                enhancer.revise.remote(plan.prompt, enhanced, weak, target=plan.target), "enhance", timeout_s
            )
            timings["enhance"] += time.perf_counter() - round_started
            round_started = time.perf_counter()
        generation = generator.generate.remote(params, enhanced)
        scoring = scorer.score.remote(generation, plan.prompt, weights=plan.weights)
        if not isinstance(enhanced, EnhancedPrompt):
            enhanced = await call_stage(enhanced, "enhance", timeout_s)
            timings["enhance"] = time.perf_counter() - enhance_started  # it ran while the turn came
            round_started = time.perf_counter()  # the generator starts once the prompt is there
        output: GenerationOutput = await call_stage(generation, "generate", timeout_s)
        generated_at = time.perf_counter()
        early = [None if on_generated is None else on_generated(enhanced, seed, image)
                 for seed, image in zip(output.seeds, output.images)]
        scores: list[dict[str, float]] = await call_stage(scoring, "score", timeout_s)
        timings["generate"] += generated_at - round_started
        for part, seconds in output.timings.items():  # parts of generate: first_pass, hires
            timings[part] = timings.get(part, 0.0) + seconds
        timings["score"] += time.perf_counter() - generated_at
        device_seconds += output.seconds if output.share_seconds is None else output.share_seconds
        for seed, image, image_scores, encoding in zip(output.seeds, output.images, scores, early):
            passed = bool(image_scores[plan.metric] >= plan.threshold)  # numpy scores give numpy bools
            candidates.append(Candidate(attempt, seed, enhanced.prompt, image, image_scores, passed, encoding))

    return GraphResult(
        enhanced=enhanced,
        negative_prompt=enhanced.negative_prompt if plan.use_negative_prompt else None,
        candidates=candidates,
        chosen=choose(candidates, plan.num_images, plan.metric),
        timings=timings,
        device_seconds=device_seconds,
    )
