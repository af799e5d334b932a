"""OpenAI's streamed images (`stream: true`): a durable job's denoising previews as partial images, then
its images, as the `openai` SDK reads them (`data: <json>` with `type` inside; the SSE `event` says the same).

The request runs as a job (as `response_format: url` does), because a job is what the generators report
their steps and previews to; the stream follows the job in the store and holds nothing of it, so a
closed stream leaves the job running and its result at GET /v1/jobs/{id}. Framing, pings and
disconnects are the job event streams' own (`JobsApi.stream_response`, sse-starlette).
"""

from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass

from fastapi import Request

from serve_app.api.openai.protocol import completed_event, error_event, partial_image_event
from serve_app.jobs.http import JobsApi
from serve_app.jobs.model import RUNNING, SUCCEEDED, Job

_DATA_URL = "data:image/png;base64,"


@dataclass(frozen=True)
class StreamOptions:
    kind: str  # the events' type prefix: image_generation or image_edit
    partial_images: int  # previews wanted, 0-3
    quality: str  # the request's quality, echoed in each event as OpenAI does
    output_format: str  # of the images (partial images are PNGs whatever it is)
    timeout_s: float  # the longest the stream waits for the job


def _event(data: dict) -> dict:
    return {"event": data["type"], "data": json.dumps(data, separators=(",", ":"))}


def partial_due(progress: dict, sent: int, wanted: int) -> bool:
    """Whether a preview at this step is the next partial image: the `wanted` ones spread evenly over
    the steps (the k-th from step k/(wanted+1) of them), so they show the image forming."""
    steps = progress.get("steps") or 0
    return sent < wanted and steps > 0 and progress.get("step", 0) * (wanted + 1) >= (sent + 1) * steps


def _size_of(b64_png: str) -> str:
    from PIL import Image

    with Image.open(io.BytesIO(base64.b64decode(b64_png))) as picture:  # reads the header only
        return f"{picture.width}x{picture.height}"


async def image_events(jobs: JobsApi, job_id: str, request: Request, options: StreamOptions):
    """The stream of one job: partial images while it runs, then one completed event per image; an
    `error` event if it fails, is cancelled, expires or outlasts `timeout_s`."""
    job, sent, shown = None, 0, None
    async for job in jobs.follow(job_id, options.timeout_s):
        preview = (job.progress or {}).get("preview", "") if job is not None and job.state == RUNNING else ""
        if preview.startswith(_DATA_URL) and preview != shown and partial_due(job.progress, sent, options.partial_images):
            b64_png = preview[len(_DATA_URL):]
            yield _event(partial_image_event(options.kind, sent, b64_png, _size_of(b64_png), options.quality))
            sent, shown = sent + 1, preview
    if job is None or not job.finished:
        reason = "expired" if job is None else f"did not finish in {options.timeout_s:g} s"
        yield _event(error_event(f"job {job_id} {reason}; GET /v1/jobs/{job_id} follows it", "timeout"))
    elif job.state != SUCCEEDED:
        yield _event(error_event(f"job {job.id} {job.state}: {job.error or 'no reason recorded'}", job.state))
    else:
        async for event in _completed(jobs, job, request, options):
            yield event


async def _completed(jobs: JobsApi, job: Job, request: Request, options: StreamOptions):
    result = jobs.result_of(job, request)
    for image in result.images:
        found = await jobs.runner.read_file.remote(job.id, image.file)
        if found is None:
            yield _event(error_event(f"the files of job {job.id} have expired", "expired"))
            return
        b64_image = base64.b64encode(found[0]).decode("ascii")
        yield _event(completed_event(options.kind, b64_image, result, options.output_format, options.quality))
