"""Step progress and cancellation for a diffusers pipeline run in a replica's worker thread.

A pipeline call runs in a thread so the replica's event loop stays free. Two things cross from
one side to the other, both through the pipeline's `callback_on_step_end`:

- progress out: after a denoising step (at most one every `min_interval_s` of the target) the
  callback asks the event loop to send `record_progress` to the `ProgressTarget`'s deployment
  through a Serve handle, with the step, the steps in all and the seconds since the run started
  (measured here, so the receiver's ETA needs no synchronised clocks). The call is not awaited,
  so a slow or missing receiver never slows denoising; a lost report only makes the progress
  shown older.
- cancellation in: when the caller cancels its request (a job cancelled by its user), Serve
  cancels the replica's coroutine. `run_interruptibly` then sets the call's own stop flag, the
  callback raises `Interrupted` at the end of the current step, and only once the thread has
  finished does the coroutine give up the replica's pipeline lock, so the next request never
  finds the pipeline still busy. The flag belongs to one request: no other request is touched.

Requests batched into one pipeline call (`BatchMonitor`) each keep their own `StepMonitor`: every
step is reported to each request's own target, with a preview of its own first image; a
cancelled request stops being reported and the call goes on for the others.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any, Callable

from deployments.runtime.types import ProgressTarget

logger = logging.getLogger("ray.serve")

_handles: dict[tuple[str, str], Any] = {}


class Interrupted(Exception):
    """A pipeline run stopped at a step end because its caller cancelled it."""


class StepMonitor:
    """`callback_on_step_end` for one pipeline call. Create it on the replica's event loop when it
    has a target (reports are sent from there); one without a target (a warm-up call) needs none."""

    def __init__(self, target: ProgressTarget | None, total_steps: int):
        self.target = target
        # `preview(latents)`: an (h, w, 3) uint8 picture of the step's latents, or None; set by the
        # generator for each pipeline call, sent with each report when the target asks for previews.
        self.preview: Callable[[Any], Any] | None = None
        self.total_steps = total_steps
        self.stop = threading.Event()
        self.steps_done = 0
        # Steps of earlier pipeline calls of the same request (a hires second pass counts on from the first).
        self.steps_before = 0
        # Where this request's images start in a pipeline call it shares with others (0 alone).
        self.first_image = 0
        self.reports_sent = 0
        self._loop = asyncio.get_running_loop() if target is not None else None
        self._started = self._last_report = time.perf_counter()

    def started(self) -> None:
        """The pipeline starts now: the time steps are measured from."""
        self._started = self._last_report = time.perf_counter()

    def begin_pass(self, preview_at: Callable[[Any, int], Any] | None) -> None:
        """A pipeline call of this request starts: its steps count on from the calls before it, and
        `preview_at(latents, index)` pictures image `index` of the call (this request's first)."""
        self.steps_before = self.steps_done
        self.preview = None if preview_at is None else (lambda latents: preview_at(latents, self.first_image))

    def __call__(self, pipeline, step: int, timestep, callback_kwargs: dict) -> dict:
        if self.stop.is_set():
            self.steps_done = self.steps_before + step + 1
            raise Interrupted(f"stopped after step {self.steps_done} of {self.total_steps}")
        self.report(step, callback_kwargs)
        return callback_kwargs

    def report(self, step: int, callback_kwargs: dict) -> None:
        """Step `step` (0-based) of the current call has finished: send it to the target if one is due."""
        self.steps_done = self.steps_before + step + 1
        now = time.perf_counter()
        if self.target is not None and now - self._last_report >= self.target.min_interval_s:
            self._last_report = now
            self.reports_sent += 1
            preview = self._preview_of(callback_kwargs)
            self._loop.call_soon_threadsafe(self._send, self.steps_done, now - self._started, preview)

    def _preview_of(self, callback_kwargs: dict) -> str | None:
        if self.preview is None or not self.target.preview or "latents" not in callback_kwargs:
            return None
        try:
            from deployments.runtime.previews import small_png_data_url

            picture = self.preview(callback_kwargs["latents"])
            return None if picture is None else small_png_data_url(picture, max_side=128)
        except Exception:  # a preview is a courtesy; never fail a generation over it
            logger.warning("could not make a denoising preview", exc_info=True)
            return None

    def loading(self) -> None:
        """The model moves onto the GPU before this request's steps start: the progress says so
        (stage 'loading model'). Called on the replica's event loop."""
        if self.target is not None:
            self._send(0, 0.0, stage="loading model")

    def _send(self, step: int, elapsed_s: float, preview: str | None = None, stage: str | None = None) -> None:
        target = self.target
        try:
            handle = _handles.get((target.app, target.deployment))
            if handle is None:
                from ray import serve

                handle = serve.get_deployment_handle(target.deployment, target.app)
                _handles[(target.app, target.deployment)] = handle
            progress = {"stage": stage or target.stage, "round": target.round, "step": step, "steps": self.total_steps,
                        "elapsed_s": elapsed_s}
            if preview is not None:
                progress["preview"] = preview
            handle.record_progress.remote(target.job_id, target.attempt, progress)  # not awaited: see above
        except Exception:  # progress is advisory; never fail a generation over it
            logger.warning("could not report progress of job %s", target.job_id, exc_info=True)


class BatchMonitor:
    """`callback_on_step_end` for one pipeline call shared by several requests (a batch), each with
    its own `StepMonitor`, its images one after another in the call.

    Every step is reported to each request's own target. A request whose caller cancelled it
    stops being reported (its result is dropped), but the call goes on for the others; only when
    every request of the batch is cancelled does the call stop at the step end.
    """

    def __init__(self, monitors: list[StepMonitor], images: list[int]):
        self.monitors = monitors
        offset = 0
        for monitor, count in zip(monitors, images):
            monitor.first_image = offset
            offset += count

    def started(self) -> None:
        for monitor in self.monitors:
            monitor.started()

    def begin_pass(self, preview_at: Callable[[Any, int], Any] | None) -> None:
        for monitor in self.monitors:
            monitor.begin_pass(preview_at)

    def __call__(self, pipeline, step: int, timestep, callback_kwargs: dict) -> dict:
        live = [monitor for monitor in self.monitors if not monitor.stop.is_set()]
        if not live:
            raise Interrupted(f"every request of the batch was cancelled; stopped after step {step + 1}")
        for monitor in live:
            monitor.report(step, callback_kwargs)
        return callback_kwargs


async def run_interruptibly(function: Callable[[], Any], monitor: StepMonitor) -> Any:
    """Run `function` (which passes `monitor` to its pipeline) in a worker thread.

    If this coroutine is cancelled, stop the run at its next step end and wait for the thread
    before raising `CancelledError`, so whatever lock the caller holds outlives the pipeline run.
    """
    task = asyncio.ensure_future(asyncio.to_thread(function))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        monitor.stop.set()
        while not task.done():
            try:
                await asyncio.wait({task})
            except asyncio.CancelledError:  # cancelled again: the thread still has to finish first
                continue
        if not task.cancelled():
            task.exception()  # retrieved: Interrupted is the expected outcome, nothing to log
        raise
