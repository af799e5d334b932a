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
  finds the pipeline still busy. The flag belongs to one call: no other request is touched.
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
        # Steps of earlier pipeline calls of the same batch (a hires second pass counts on from the first).
        self.steps_before = 0
        self.reports_sent = 0
        self._loop = asyncio.get_running_loop() if target is not None else None
        self._started = self._last_report = time.perf_counter()

    def started(self) -> None:
        """The pipeline starts now: the time steps are measured from."""
        self._started = self._last_report = time.perf_counter()

    def __call__(self, pipeline, step: int, timestep, callback_kwargs: dict) -> dict:
        self.steps_done = self.steps_before + step + 1
        if self.stop.is_set():
            raise Interrupted(f"stopped after step {self.steps_done} of {self.total_steps}")
        now = time.perf_counter()
        if self.target is not None and now - self._last_report >= self.target.min_interval_s:
            self._last_report = now
            self.reports_sent += 1
            preview = self._preview_of(callback_kwargs)
            self._loop.call_soon_threadsafe(self._send, self.steps_done, now - self._started, preview)
        return callback_kwargs

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

    def _send(self, step: int, elapsed_s: float, preview: str | None = None) -> None:
        target = self.target
        try:
            handle = _handles.get((target.app, target.deployment))
            if handle is None:
                from ray import serve

                handle = serve.get_deployment_handle(target.deployment, target.app)
                _handles[(target.app, target.deployment)] = handle
            progress = {"stage": target.stage, "round": target.round, "step": step, "steps": self.total_steps,
                        "elapsed_s": elapsed_s}
            if preview is not None:
                progress["preview"] = preview
            handle.record_progress.remote(target.job_id, target.attempt, progress)  # not awaited: see above
        except Exception:  # progress is advisory; never fail a generation over it
            logger.warning("could not report progress of job %s", target.job_id, exc_info=True)


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
