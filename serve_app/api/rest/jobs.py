"""/v1/jobs: durable async jobs: submit (202), list, status, events (SSE), cancel, result, files."""

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import Response, StreamingResponse
from sse_starlette import EventSourceResponse

from serve_app.api.deps import services
from serve_app.api.responses import BODY, OVERLOAD, errors
from serve_app.protocol.jobs import ImageJobResult, JobList, JobState, JobStatus, JobSubmission, VideoJobResult
from serve_app.services.facade import Services

router = APIRouter(tags=["jobs"])


@router.post("/v1/jobs", status_code=202, response_model=JobStatus,
             responses={202: {"description": "Recorded durably; poll the Location or stream its events."},
                        **errors(*BODY, 409, 429, 501, *OVERLOAD)})
async def post_jobs(submission: JobSubmission, request: Request, response: Response,
                    idempotency_key: str | None = Header(None, min_length=1, max_length=255),
                    service: Services = Depends(services)) -> JobStatus:
    """Submit an image or video job. Answers only once the job is durably recorded."""
    return await service.jobs_api().submit(submission, request, response, idempotency_key)


@router.get("/v1/jobs", response_model=JobList, responses=errors(422, 501, *OVERLOAD))
async def get_jobs(request: Request, state: JobState | None = None, limit: int = Query(20, ge=1, le=200),
                   cursor: str | None = Query(None, pattern=r"^[0-9]{1,18}$",
                                              description="A `next_cursor` from the previous page, as given."),
                   service: Services = Depends(services)) -> JobList:
    """Jobs, newest first, optionally in one state; pass `next_cursor` back for older ones."""
    return await service.jobs_api().list(request, state, limit, cursor)


@router.get("/v1/jobs/{job_id}", response_model=JobStatus, responses=errors(404, 501, *OVERLOAD))
async def get_job(job_id: str, request: Request, service: Services = Depends(services)) -> JobStatus:
    return await service.jobs_api().status(job_id, request)


@router.get("/v1/jobs/{job_id}/events", response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}}}, **errors(404, 429, 501, *OVERLOAD)})
async def get_job_events(job_id: str, request: Request,
                         last_event_id: str | None = Header(None, max_length=64,
                                                            description="Resume: the `id` of the last event received."),
                         service: Services = Depends(services)) -> EventSourceResponse:
    """Server-Sent Events: `state` on every state change, `progress` per denoising step, ending
    with the final `state`. Closing the stream does not cancel the job. With `Last-Event-ID`, no
    replay: the current state if it changed, then live, always ending with the final state."""
    return await service.jobs_api().events(job_id, request, last_event_id)


@router.post("/v1/jobs/{job_id}/cancel", response_model=JobStatus,
             responses={202: {"model": JobStatus, "description": "Running: it stops at its next denoising step."},
                        **errors(404, 409, 501, *OVERLOAD)})
async def cancel_job(job_id: str, request: Request, service: Services = Depends(services)) -> JobStatus:
    """A queued job is cancelled at once; a running one stops within a step or two. 409 if finished."""
    return await service.jobs_api().cancel(job_id, request)


@router.get("/v1/jobs/{job_id}/result", response_model=ImageJobResult | VideoJobResult,
            responses=errors(404, 409, 501, *OVERLOAD))
async def get_job_result(job_id: str, request: Request, service: Services = Depends(services)):
    """The sync endpoint's JSON, with links to the files instead of base64. 409 until succeeded."""
    return await service.jobs_api().result(job_id, request)


@router.get("/v1/jobs/{job_id}/files/{name}", name="get_job_file",
            responses={200: {"content": {"image/png": {}, "video/mp4": {}, "image/gif": {}, "image/webp": {}}},
                       **errors(404, 501, *OVERLOAD)})
async def get_job_file(job_id: str, name: str, request: Request, service: Services = Depends(services)) -> Response:
    """With API keys, the URLs in a job's status and result are signed and expire
    (auth.signed_url_ttl_s), so a browser can load them without a key."""
    return await service.jobs_api().file(job_id, name, request)


@router.delete("/v1/jobs/{job_id}", status_code=204, response_class=Response,
               responses={**errors(404, 501), 409: {"description": "The job is queued or running: cancel it first."}})
async def delete_job(job_id: str, request: Request, service: Services = Depends(services)) -> Response:
    """Delete a finished job of this key and its files now, instead of at its TTL."""
    await service.jobs_api().delete(job_id, request)
    return Response(status_code=204)
