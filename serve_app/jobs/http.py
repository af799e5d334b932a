"""What the ingress's /v1/jobs routes do: validate at submit, call the JobRunner, render JSON and SSE.

Submitted requests are validated exactly as the sync endpoints validate them: the same schemas
(`ImageRequest`, `VideoRequest`) and the same model-dependent checks (`ImageService.plan`,
`VideoService.check`), so a bad field is a 422 at submit, never a job that fails later. The
request is stored with its seed filled in, so a re-run after an interruption makes the same
images.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re

from fastapi import Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.responses import StreamingResponse
from pydantic import ValidationError

from serve_app.api.errors import explain_errors
from serve_app.jobs.model import CANCELLED, RUNNING, SUCCEEDED, Job, dumps
from serve_app.jobs.results import with_urls
from serve_app.jobs.schemas import (
    ImageJobResult,
    JobFileLink,
    JobList,
    JobLinks,
    JobStatus,
    JobSubmission,
    VideoJobResult,
    job_timings,
)
from serve_app.services.validation import RequestError
from serve_app.api.schemas import ImageRequest, VideoRequest, random_seed
from serve_app.services.images import ImageService
from serve_app.services.videos import VideoService

KEEPALIVE_S = 15.0  # an event stream with nothing new sends a comment this often
_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class JobError(Exception):
    """An HTTP error of the jobs API (404, 409, 422, 501), answered as {"detail": ...}."""

    def __init__(self, status: int, detail):
        super().__init__(detail)
        self.status = status
        self.detail = detail


def _not_found(job_id: str) -> JobError:
    return JobError(404, f"no job {job_id!r}: it never existed, or it expired after its TTL")


def request_hash(submission: JobSubmission) -> str:
    canonical = json.dumps({"kind": submission.kind, "request": submission.request}, sort_keys=True,
                           separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


class JobsApi:
    def __init__(self, runner, images: ImageService, videos: VideoService | None, retry_limit: int):
        self.runner = runner
        self.images = images
        self.videos = videos
        self.retry_limit = retry_limit

    # Submit

    async def submit(self, submission: JobSubmission, request: Request, response: Response,
                     idempotency_key: str | None) -> JobStatus:
        stored = await self._validated(submission)
        digest = request_hash(submission)
        job, created, position = await self.runner.submit.remote(submission.kind, stored, idempotency_key, digest)
        if not created and job.request_hash != digest:
            raise JobError(409, f"Idempotency-Key {idempotency_key!r} was already used for a different request "
                                f"(job {job.id})")
        status = self.render(job, position, request)
        response.headers["Location"] = status.links.self
        if not created:
            response.headers["Idempotent-Replayed"] = "true"
        return status

    async def _validated(self, submission: JobSubmission) -> dict:
        """The request as it will run: validated like the sync endpoint, seed filled in."""
        if submission.kind == "video" and self.videos is None:
            raise JobError(501, "video generation is not deployed: add a video_models entry to the config")
        model = ImageRequest if submission.kind == "image" else VideoRequest
        try:
            parsed = model.model_validate(submission.request)
        except ValidationError as error:
            errors = [{**item, "loc": ("body", "request", *item["loc"])} for item in error.errors(include_url=False)]
            raise JobError(422, jsonable_encoder(explain_errors(errors, model, prefix=("request",)))) from None
        try:
            if isinstance(parsed, ImageRequest):
                plan, _, _ = await asyncio.to_thread(self.images.plan, parsed)  # decodes a control image
                seed = plan.base_seed
            else:
                await asyncio.to_thread(self.videos.check, parsed)
                seed = random_seed() if parsed.seed is None else parsed.seed
        except RequestError as error:
            raise JobError(error.status, error.detail(prefix=("request",))) from None
        return {**parsed.model_dump(mode="json", exclude_unset=True), "seed": seed}

    # Read

    async def status(self, job_id: str, request: Request) -> JobStatus:
        found = await self.runner.status.remote(job_id)
        if found is None:
            raise _not_found(job_id)
        return self.render(*found, request)

    async def list(self, request: Request, state: str | None, limit: int, cursor: str | None) -> JobList:
        if cursor is not None and not cursor.isdigit():
            raise JobError(422, [{"loc": ["query", "cursor"], "msg": "cursor: pass a next_cursor value back as given",
                                  "type": "value_error"}])
        rows = await self.runner.list.remote(state, limit + 1, None if cursor is None else int(cursor))
        page = rows[:limit]
        next_cursor = str(page[-1][0].seq) if len(rows) > limit else None
        return JobList(jobs=[self.render(job, position, request) for job, position in page], next_cursor=next_cursor)

    async def result(self, job_id: str, request: Request):
        found = await self.runner.status.remote(job_id)
        if found is None:
            raise _not_found(job_id)
        job = found[0]
        if job.state != SUCCEEDED:
            why = f": {job.error}" if job.error else ""
            raise JobError(409, f"job {job_id} is {job.state}{why}; a result exists once it has succeeded")
        return self._result(job, request)

    def _result(self, job: Job, request: Request) -> ImageJobResult | VideoJobResult:
        base = self._base(request, job.id)
        result = with_urls(job.kind, job.result, lambda name: f"{base}/files/{name}")
        return (ImageJobResult if job.kind == "image" else VideoJobResult).model_validate(result)

    async def file(self, job_id: str, name: str) -> Response:
        found = await self.runner.read_file.remote(job_id, name) if _FILE_NAME.match(name) else None
        if found is None:
            raise JobError(404, f"job {job_id!r} has no file {name!r} (unknown, not finished, or expired)")
        data, content_type = found
        return Response(content=data, media_type=content_type, headers={
            "Content-Disposition": f'inline; filename="{job_id}-{name}"',
            "Cache-Control": "private, max-age=3600",  # a file never changes; it only expires
        })

    # Cancel

    async def cancel(self, job_id: str, request: Request) -> Response:
        found = await self.runner.cancel.remote(job_id)
        if found is None:
            raise _not_found(job_id)
        job, changed, position = found
        if not changed:
            raise JobError(409, f"job {job_id} has already {'been ' if job.state == CANCELLED else ''}{job.state}; "
                                "only queued or running jobs can be cancelled")
        status = self.render(job, position, request)
        # 200: cancelled now. 202: running; it stops at its next denoising step.
        return Response(content=status.model_dump_json(), media_type="application/json",
                        status_code=202 if job.state == RUNNING else 200)

    # Events

    async def events(self, job_id: str, request: Request) -> StreamingResponse:
        found = await self.runner.status.remote(job_id)
        if found is None:
            raise _not_found(job_id)
        return StreamingResponse(self._event_stream(found[0], request), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _event_stream(self, job: Job, request: Request):
        """`state` for every history entry (replayed from the start), `progress` when it changes,
        a comment every KEEPALIVE_S while nothing happens; the last event is the final state,
        carrying the whole job status and, if it succeeded, the result (as GET .../result).
        Leaving stops only the stream, never the job."""
        sent_states = 0
        last_progress = None
        while True:
            for index in range(sent_states, len(job.history)):
                data = {"job_id": job.id, **job.history[index]}
                if job.finished and index == len(job.history) - 1:
                    data["job"] = self.render(job, None, request).model_dump(mode="json")
                    if job.state == SUCCEEDED:
                        data["result"] = self._result(job, request).model_dump(mode="json")
                yield _sse("state", data, job.version)
            sent_states = len(job.history)
            if job.finished:
                return
            if job.state == RUNNING and job.progress and job.progress != last_progress:
                last_progress = job.progress
                yield _sse("progress", {"job_id": job.id, "attempt": job.attempts, **_public_progress(job.progress)},
                           job.version)
            version = job.version
            job = await self.runner.watch.remote(job.id, version, KEEPALIVE_S)
            if job is None:
                yield _sse("error", {"detail": "the job expired"}, version)
                return
            if job.version == version:
                yield ": keep-alive\n\n"

    # Rendering

    @staticmethod
    def _base(request: Request, job_id: str) -> str:
        return f"{request.scope.get('root_path', '')}/v1/jobs/{job_id}"

    def render(self, job: Job, position: int | None, request: Request) -> JobStatus:
        base = self._base(request, job.id)
        return JobStatus(
            id=job.id, kind=job.kind, state=job.state, queue_position=position,
            progress=_public_progress(job.progress) if job.progress else None,
            attempts=job.attempts, max_attempts=self.retry_limit + 1, cancel_requested=job.cancel_requested,
            created_at=job.created_at, started_at=job.started_at, finished_at=job.finished_at,
            expires_at=job.expires_at, timings=job_timings(job), error=job.error, history=job.history,
            files=[JobFileLink(name=f.name, url=f"{base}/files/{f.name}", content_type=f.content_type, size=f.size)
                   for f in job.files],
            links=JobLinks(self=base, events=f"{base}/events", cancel=f"{base}/cancel",
                           result=f"{base}/result" if job.state == SUCCEEDED else None),
        )


def _public_progress(progress: dict) -> dict:
    return {key: progress[key] for key in ("stage", "round", "step", "steps", "eta_s", "updated_at") if key in progress}


def _sse(event: str, data: dict, event_id: int) -> str:
    return f"id: {event_id}\nevent: {event}\ndata: {dumps(data)}\n\n"

