"""What the ingress's /v1/jobs routes do: validate at submit, call the JobRunner, render JSON and SSE.

Submitted requests are validated exactly as the sync endpoints validate them: the same schemas
(`ImageRequest`, `VideoRequest`) and the same model-dependent checks (`ImageService.plan`,
`VideoService.check`), so a bad field is a 422 at submit, never a job that fails later. The
request is stored with its seed filled in, so a re-run after an interruption makes the same
images.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import math
import re
import time
from dataclasses import dataclass

from fastapi import Request, Response
from fastapi.encoders import jsonable_encoder
from pydantic import ValidationError
from sse_starlette import EventSourceResponse

from serve_app.config import FairnessConfig, JobsConfig
from serve_app.jobs.dispatch import SYNC_TURN, JobRejected
from serve_app.jobs.model import CANCELLED, RUNNING, SUCCEEDED, Job, dumps
from serve_app.jobs.results import with_urls
from serve_app.jobs.webhooks import WebhookGate
from serve_app.protocol.errors import JobError, RequestError, explain_errors
from serve_app.protocol.jobs import (
    ImageJobResult,
    JobFileLink,
    JobLinks,
    JobList,
    JobStatus,
    JobSubmission,
    VideoJobResult,
    WebhookDelivery,
)
from serve_app.protocol.schemas import ImageRequest, VideoRequest, random_seed
from serve_app.security.guard import principal, request_auth
from serve_app.security.limiter import LimitExceeded
from serve_app.services.graph import in_turn as graph_turn
from serve_app.services.images import ImageService
from serve_app.services.videos import VideoService

logger = logging.getLogger(__name__)

# A job file (PNG, MP4, GIF, WebP) is only ever the type it is served as, and nothing in it may
# run or be framed, even if a browser opened it as a page (signed URLs are shared as links).
FILE_HEADERS = {"X-Content-Type-Options": "nosniff",
                "Content-Security-Policy": "default-src 'none'; img-src 'self'; media-src 'self'; sandbox; "
                                           "frame-ancestors 'none'"}
KEEPALIVE_S = 15.0  # an event stream with nothing new sends a comment this often
STREAM_RETRY_AFTER_S = 5


@dataclass(frozen=True)
class StreamLimits:
    """Caps on the job event streams one ingress replica keeps open (see JobsConfig)."""

    total: int = 256
    per_client: int = 16
    max_lifetime_s: float = 3600.0

    @classmethod
    def of(cls, config: JobsConfig) -> StreamLimits:
        return cls(config.max_event_streams, config.max_event_streams_per_client, config.event_stream_max_s)


class _OpenStreams:
    """Open event streams, in all and per client address; a slot is held until the stream ends."""

    def __init__(self, limits: StreamLimits):
        self.limits = limits
        self.total = 0
        self.by_client: dict[str, int] = {}

    def acquire(self, client: str) -> _Slot:
        if self.total >= self.limits.total:
            raise JobError(503, f"too many open event streams ({self.total}); retry later, or poll the job",
                           {"Retry-After": str(STREAM_RETRY_AFTER_S)})
        if self.by_client.get(client, 0) >= self.limits.per_client:
            raise JobError(429, f"this client has {self.limits.per_client} event streams open, the most it may; "
                                "close one, or poll the job", {"Retry-After": str(STREAM_RETRY_AFTER_S)})
        self.total += 1
        self.by_client[client] = self.by_client.get(client, 0) + 1
        return _Slot(self, client)

    def release(self, client: str) -> None:
        self.total -= 1
        self.by_client[client] -= 1
        if not self.by_client[client]:
            del self.by_client[client]


class _Slot:
    """One open stream's hold on its slot; released once, by whichever end comes first."""

    def __init__(self, streams: _OpenStreams, client: str):
        self._streams, self._client = streams, client
        self.held = True

    def release(self) -> None:
        if self.held:
            self.held = False
            self._streams.release(self._client)


class _HeldEventSourceResponse(EventSourceResponse):
    """An event stream that frees its slot however the response ends. The body generator's `finally`
    is not enough: Starlette cancels the response when the client's disconnect arrives (or Serve
    cancels the request when its client leaves), and if that happens before the generator's first
    step, the generator never starts, so its `finally` never runs and the slot leaked."""

    def __init__(self, content, slot: _Slot, **kwargs):
        super().__init__(content, **kwargs)
        self.slot = slot

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.slot.release()


_CURSOR = re.compile(r"^[0-9]{1,18}$")
_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def _not_found(job_id: str) -> JobError:
    return JobError(404, f"no job {job_id!r}: it never existed, or it expired after its TTL")


def request_hash(submission: JobSubmission) -> str:
    canonical = json.dumps({"kind": submission.kind, "request": submission.request}, sort_keys=True,
                           separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


class JobsApi:
    def __init__(self, runner, images: ImageService, videos: VideoService | None, retry_limit: int,
                 streams: StreamLimits | None = None, fairness: FairnessConfig | None = None,
                 webhooks: WebhookGate | None = None):
        self.runner = runner
        self.fairness = fairness  # None or sync off: synchronous requests go straight to the models
        self.webhooks = webhooks or WebhookGate()
        self.streams = _OpenStreams(streams or StreamLimits())
        self.images = images
        self.videos = videos
        self.retry_limit = retry_limit
        self._ending: set[asyncio.Future] = set()  # turns being ended after their responses went out
        self._in_turn = 0  # sync requests of this replica between asking for their turn and answering

    # Submit

    async def submit(self, submission: JobSubmission, request: Request, response: Response,
                     idempotency_key: str | None) -> JobStatus:
        job, created, position = await self.create(submission, request, idempotency_key)
        status = self.render(job, position, request)
        response.headers["Location"] = status.links.self
        if not created:
            response.headers["Idempotent-Replayed"] = "true"
        return status

    async def create(self, submission: JobSubmission, request: Request, idempotency_key: str | None = None,
                     targets: list[dict] | None = None) -> tuple[Job, bool, int | None]:
        """Validate and durably record a job for the caller of `request` (its owner, quotas and
        budget): (job, created, queue position). The protocol adapters' way in (MCP tools, A2A
        tasks, OpenAI `url` results), as POST /v1/jobs's. `targets`: an adapter's own receivers
        of the job's end (A2A push configs), checked already; the submission's webhook is added."""
        stored = await self._validated(submission, request)
        targets = [*(await self._targets(submission, request) or []), *(targets or [])] or None
        digest = request_hash(submission)
        who = principal(request)
        if idempotency_key is not None:
            # A replay first: it is no new work, so the budget is not charged (a client retrying
            # at the end of its budget gets its job, not a 429).
            replayed = await self.runner.replay.remote(idempotency_key, who.key_id)
            if replayed is not None:
                return self._replayed(replayed[0], replayed[1], digest, idempotency_key)
        auth = request_auth(request)
        images = stored.get("num_images", 1) if submission.kind == "image" else self._frames(stored)
        if auth is not None:
            await auth.charge_images(who, images)  # 429 naming the daily budget when it is spent
        try:
            job, created, position = await self.runner.submit.remote(
                submission.kind, stored, idempotency_key, digest, who.key_id, who.limits.active_jobs, who.group,
                submission.priority, who.limits.queued_jobs, targets)
        except BaseException as error:
            # Not recorded (refused, or the runner or its store failed): the client is not charged.
            # Should the job have been recorded after all (its answer lost), a retry with its
            # Idempotency-Key gets it as a replay, free: the doubt goes the client's way.
            if auth is not None:
                await auth.refund_images(who, images)
            if isinstance(error, JobRejected):  # a RayTaskError that is also a JobRejected, from the runner
                headers = None if error.retry_after_s is None else {"Retry-After": str(math.ceil(error.retry_after_s))}
                raise JobError(error.status, error.detail, headers) from None
            raise
        if auth is not None and not created:
            await auth.refund_images(who, images)  # a replay (a concurrent submit won), or refused: no new work
        if job is None:  # `created` names the limit: active_jobs or queued_jobs
            counted = "queued or running" if created == "active_jobs" else "queued"
            raise LimitExceeded(created, position, time.time() + 1,
                                f"job quota ({created}): {position} jobs {counted} for this key; submit more "
                                "when one starts or finishes (or cancel one)")
        if not created:
            return self._replayed(job, position, digest, idempotency_key)
        return job, created, position

    async def _targets(self, submission: JobSubmission, request: Request) -> list[dict] | None:
        if submission.webhook is None:
            return None
        try:
            return await self.webhooks.targets(submission.webhook, self.key_secret(request))
        except RequestError as error:
            raise JobError(422, error.detail()) from None

    @staticmethod
    def key_secret(request: Request) -> str | None:
        """The webhook signing secret of the caller's key (None without keys, or for a key without one)."""
        auth = request_auth(request)
        if auth is None or auth.keys is None:
            return None
        entry = auth.keys.usable_entry(principal(request).key_id)
        return None if entry is None else entry.webhook_secret

    @staticmethod
    def _replayed(job: Job, position: int | None, digest: str, idempotency_key: str | None) -> tuple[Job, bool, int | None]:
        if job.request_hash != digest:
            raise JobError(409, f"Idempotency-Key {idempotency_key!r} was already used for a different request "
                                f"(job {job.id})")
        return job, False, position

    def _frames(self, stored: dict) -> int:
        return self.videos.frames(stored)  # validated already: its model's default when unset

    async def _validated(self, submission: JobSubmission, request: Request) -> dict:
        """The request as it will run: validated like the sync endpoint, earlier jobs' images that it
        names as references looked up for the caller of `request`, seed filled in."""
        if submission.kind == "video" and self.videos is None:
            raise JobError(501, "video generation is not deployed: add a video_models entry to the config")
        model = ImageRequest if submission.kind == "image" else VideoRequest
        try:
            parsed = model.model_validate(submission.request)
        except ValidationError as error:
            errors = [{**item, "loc": ("body", "request", *item["loc"])} for item in error.errors(include_url=False)]
            raise JobError(422, jsonable_encoder(explain_errors(errors, model, prefix=("request",)))) from None
        if isinstance(parsed, ImageRequest) and parsed.fallback:
            # A job waits its turn durably; the remote fallback is for sync requests at a peak.
            raise JobError(422, RequestError("fallback", "jobs wait in their queue and are never sent to the remote "
                                             "fallback; use POST /v1/images for that", "false").detail(("request",)))
        try:
            if isinstance(parsed, ImageRequest):
                parsed = await self.with_references(parsed, request)
                calibration = await self.images.calibration_for(parsed)  # for a quality_percentile
                plan, _, _ = await asyncio.to_thread(self.images.plan, parsed, calibration)  # decodes a control image
                seed = plan.base_seed
            else:
                await asyncio.to_thread(self.videos.check, parsed)
                seed = random_seed() if parsed.seed is None else parsed.seed
        except RequestError as error:
            raise JobError(error.status, error.detail(prefix=("request",))) from None
        return {**parsed.model_dump(mode="json", exclude_unset=True), "seed": seed}

    # Read

    async def find(self, job_id: str, request: Request) -> tuple[Job, int | None]:
        """The job and its queue position, if the caller may see it; else 404, exactly as for an
        unknown id (another key's job id is not confirmed to exist)."""
        found = await self.runner.status.remote(job_id)
        if found is None or not principal(request).sees(found[0].owner) or found[0].request_hash == SYNC_TURN:
            raise _not_found(job_id)
        return found

    async def status(self, job_id: str, request: Request) -> JobStatus:
        found = await self.runner.status_with_estimate.remote(job_id)
        if found is None or not principal(request).sees(found[0].owner) or found[0].request_hash == SYNC_TURN:
            raise _not_found(job_id)
        job, position, estimate = found
        return self.render(job, position, request, estimate)

    # Synchronous requests in the fair order

    async def in_turn(self, request: Request, generate):
        """`await generate()` (a synchronous image request) in its turn of the fair order, its GPU
        time charged to the caller's group; straight away when fairness.sync is off. The image
        graph asks for the turn once the request is planned (services.graph.in_turn)."""
        if self.fairness is None or not self.fairness.sync:
            return await generate()
        # Alone here, its turn most likely comes at once: ask for it while the prompt is enhanced.
        # With others in flight it may wait behind them, so nothing runs for it before it comes.
        turn = _SyncTurn(self, principal(request), "image", self.fairness.sync_max_wait_s, overlap=self._in_turn == 0)
        self._in_turn += 1
        try:
            with graph_turn(turn):
                response = await generate()
            turn.device_s = response.timings.get("device", 0.0)
            return response
        finally:
            self._in_turn -= 1
            turn.end()

    def _ended(self, token: str, group: str, device_s: float) -> None:
        """Record a turn's end beside the response, not before it (the JobRunner commits the group's
        GPU time to the store). Were the call lost, the slot would come back after the dispatcher's
        hold limit, as for an ingress that died."""
        ending = asyncio.ensure_future(self._end_turn(token, group, device_s))
        self._ending.add(ending)
        ending.add_done_callback(self._ending.discard)

    async def _end_turn(self, token: str, group: str, device_s: float) -> None:
        try:
            await self.runner.end_turn.remote(token, group, device_s)
        except Exception as error:  # nobody awaits this: say so in the log
            logger.warning("could not end sync turn %s of group %s (%s: %s)", token, group, type(error).__name__, error)

    async def list(self, request: Request, state: str | None, limit: int, cursor: str | None) -> JobList:
        # ASCII digits only, and no more than a seq can be: "²".isdigit() is True, and 20 digits
        # overflow SQLite's integers.
        if cursor is not None and not _CURSOR.match(cursor):
            raise JobError(422, [{"loc": ["query", "cursor"], "msg": "cursor: pass a next_cursor value back as given",
                                  "type": "value_error"}])
        who = principal(request)
        owner = None if who.admin else who.key_id
        rows = await self.runner.list.remote(state, limit + 1, None if cursor is None else int(cursor), owner)
        # Sync requests' turns are tickets in the queue, not jobs of the caller's: left out (a page may be short).
        page = rows[:limit]
        next_cursor = str(page[-1][0].seq) if len(rows) > limit else None
        page = [(job, position) for job, position in page if job.request_hash != SYNC_TURN]
        return JobList(jobs=[self.render(job, position, request) for job, position in page], next_cursor=next_cursor)

    async def result(self, job_id: str, request: Request):
        job = (await self.find(job_id, request))[0]
        if job.state != SUCCEEDED:
            why = f": {job.error}" if job.error else ""
            raise JobError(409, f"job {job_id} is {job.state}{why}; a result exists once it has succeeded")
        return self.result_of(job, request)

    def result_of(self, job: Job, request: Request) -> ImageJobResult | VideoJobResult:
        """A succeeded job's result with links to its files (GET .../result)."""
        result = with_urls(job.kind, job.result, lambda name: self._file_url(request, job.id, name))
        return (ImageJobResult if job.kind == "image" else VideoJobResult).model_validate(result)

    async def job_image(self, job_id: str, index: int, request: Request, field: str, index_field: str | None = None) -> bytes:
        """The PNG of image `index` of a succeeded image job the caller of `request` may see; 422 naming
        `field` otherwise, or `index_field` for an index past the job's images (another key's job is
        'no job', as in GET /v1/jobs/{id})."""
        try:
            job, _ = await self.find(job_id, request)
        except JobError:
            raise RequestError(field, f"no job {job_id!r}", "the id of a succeeded image job of yours") from None
        if job.kind != "image" or job.state != SUCCEEDED:
            raise RequestError(field, f"job {job_id!r} is a {job.state} {job.kind} job; a succeeded image job is needed",
                               "the id of a succeeded image job")
        images = self.result_of(job, request).images
        if index >= len(images):
            raise RequestError(index_field or field, f"job {job_id!r} has {len(images)} image(s); got index {index}",
                               f"0-{len(images) - 1}")
        found = await self.runner.read_file.remote(job.id, images[index].file)
        if found is None:
            raise RequestError(field, f"the files of job {job_id!r} have expired", "a job whose files are kept")
        return found[0]

    async def with_references(self, image_request: ImageRequest, request: Request) -> ImageRequest:
        """`image_request` with each earlier job's image in `reference_images` replaced by that image's PNG
        (base64), looked up for the caller of `request`: the services see pixels only."""
        references = image_request.reference_images
        if all(isinstance(reference, str) for reference in references):
            return image_request
        resolved = [reference if isinstance(reference, str) else base64.b64encode(
            await self.job_image(reference.job_id, reference.index, request, f"reference_images.{index}")).decode()
            for index, reference in enumerate(references)]
        return ImageRequest.model_validate({**image_request.model_dump(mode="json", exclude_unset=True),
                                            "reference_images": resolved})

    async def file(self, job_id: str, name: str, request: Request) -> Response:
        if not _FILE_NAME.match(name):
            found = None
        else:
            await self.find(job_id, request)
            found = await self.runner.read_file.remote(job_id, name)
        if found is None:
            raise JobError(404, f"job {job_id!r} has no file {name!r} (unknown, not finished, or expired)")
        data, content_type = found
        return Response(content=data, media_type=content_type, headers={
            "Content-Disposition": f'inline; filename="{job_id}-{name}"',
            "Cache-Control": "private, max-age=3600",  # a file never changes; it only expires
            **FILE_HEADERS,
        })

    async def wait(self, job_id: str, timeout_s: float, on_change=None) -> Job | None:
        """The job once it has finished, or as it is after `timeout_s`; None if it is unknown.

        For the protocol adapters (OpenAI `url` results, MCP tools, A2A tasks), which answer once a
        job is done but never hold it: the job runs in the JobRunner whatever happens here.
        `on_change(job)` is awaited on each new version (state or progress) while it waits."""
        job = None
        async for current in self.follow(job_id, timeout_s):
            if on_change is not None and job is not None and current is not None and not current.finished:
                await on_change(current)
            job = current
        return job

    async def follow(self, job_id: str, timeout_s: float):
        """The job as it is, then each new version of it (state or progress) until it finishes or
        `timeout_s` passes; None last if it is unknown or expires meanwhile. Following holds nothing:
        the job runs in the JobRunner whatever its followers do."""
        found = await self.runner.status.remote(job_id)
        job = None if found is None else found[0]
        yield job
        deadline = asyncio.get_running_loop().time() + timeout_s
        while job is not None and not job.finished:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return
            newer = await self.runner.watch.remote(job.id, job.version, min(left, KEEPALIVE_S))
            if newer is None or newer.version != job.version:
                yield newer
            job = newer

    # Cancel

    async def cancel(self, job_id: str, request: Request) -> Response:
        job, position = await self.cancel_job(job_id, request)
        status = self.render(job, position, request)
        # 200: cancelled now. 202: running; it stops at its next denoising step.
        return Response(content=status.model_dump_json(), media_type="application/json",
                        status_code=202 if job.state == RUNNING else 200)

    async def cancel_job(self, job_id: str, request: Request) -> tuple[Job, int | None]:
        """Cancel a queued or running job the caller may see: (job, position); JobError 404 if
        unknown (or another key's), 409 if finished."""
        await self.find(job_id, request)
        found = await self.runner.cancel.remote(job_id)
        if found is None:
            raise _not_found(job_id)
        job, changed, position = found
        if not changed:
            raise JobError(409, f"job {job_id} has already {'been ' if job.state == CANCELLED else ''}{job.state}; "
                                "only queued or running jobs can be cancelled")
        return job, position

    # Delete

    async def delete(self, job_id: str, request: Request) -> None:
        job = (await self.find(job_id, request))[0]
        deleted = await self.runner.delete.remote(job_id)
        if deleted is None:
            raise _not_found(job_id)
        if not deleted:
            raise JobError(409, f"job {job_id} is {job.state}; only finished jobs can be deleted (cancel it first)")

    # Events

    async def events(self, job_id: str, request: Request, last_event_id: str | None = None) -> EventSourceResponse:
        job = (await self.find(job_id, request))[0]
        resume = int(last_event_id) if last_event_id is not None and last_event_id.isascii() and \
            last_event_id.isdigit() and len(last_event_id) <= 18 else None
        slot = self.open_stream(request)
        return self.stream_response(self._event_stream(job, request, resume), slot)

    def open_stream(self, request: Request) -> _Slot:
        """A slot for one more event stream of this client (429/503 past the caps); the response of
        `stream_response` releases it, and so must whoever does not get as far as making one."""
        return self.streams.acquire(request.client.host if request.client is not None else "unknown")

    def stream_response(self, events, slot: _Slot) -> EventSourceResponse:
        """Server-Sent Events (sse-starlette) of `events`, each a dict of ServerSentEvent's fields (`data`,
        `event`, `id`, `retry`, `comment`), framed with the response's line separator: a `: ping` comment every
        KEEPALIVE_S, the stream ended when its client leaves, and `slot` freed however it ends. The job
        event streams and the OpenAI image streams both answer with it."""
        return _HeldEventSourceResponse(self._held(events, slot), slot, ping=KEEPALIVE_S, sep="\n",
                                        headers={"Cache-Control": "no-cache"})

    @staticmethod
    async def _held(stream, slot: _Slot):
        try:
            async for chunk in stream:
                yield chunk
        finally:
            slot.release()  # as soon as the stream ends (the response frees it too, if it never starts)

    async def _event_stream(self, job: Job, request: Request, resume: int | None = None):
        """`state` for every history entry (replayed from the start), `progress` when it changes
        (the response pings while nothing happens); the last event is the final state,
        carrying the whole job status and, if it succeeded, the result (as GET .../result).
        Leaving stops only the stream, never the job.

        `resume` (the client's Last-Event-ID, a job version): no replay; the current state if it
        changed since, then changes as they happen, and always the final state. A stream open for
        the configured lifetime ends (`retry:` tells the client how soon to reconnect)."""
        # The history entries the client has (as sent): a requeue that spent no attempt rewrites
        # the last entries (they coalesce, see model.with_requeue), so what is new is whatever
        # follows the part both agree on, not whatever follows the count sent.
        sent: list[dict] = []
        if resume is not None:
            sent = job.history[:-1] if job.version > resume else list(job.history)
            if job.finished:
                sent = job.history[:-1]  # the final state, whatever the client saw
        last_progress = None
        ends_at = time.monotonic() + self.streams.limits.max_lifetime_s
        while True:
            for index in range(_agreed(sent, job.history), len(job.history)):
                data = {"job_id": job.id, **job.history[index]}
                if job.finished and index == len(job.history) - 1:
                    data["job"] = self.render(job, None, request).model_dump(mode="json")
                    if job.state == SUCCEEDED:
                        data["result"] = self.result_of(job, request).model_dump(mode="json")
                yield _sse("state", data, job.version)
            sent = list(job.history)
            if job.finished:
                return
            if job.state == RUNNING and job.progress and job.progress != last_progress:
                last_progress = job.progress
                yield _sse("progress", {"job_id": job.id, "attempt": job.attempts, **_public_progress(job.progress)},
                           job.version)
            version = job.version
            if time.monotonic() >= ends_at:
                yield {"retry": STREAM_RETRY_AFTER_S * 1000,
                       "comment": "the stream reached its maximum lifetime; reconnect with Last-Event-ID"}
                return
            wait = min(KEEPALIVE_S, max(0.0, ends_at - time.monotonic()))
            job = await self.runner.watch.remote(job.id, version, wait)
            if job is None:
                yield _sse("error", {"detail": "the job expired"}, version)
                return

    # Rendering

    @staticmethod
    def _base(request: Request | None, job_id: str) -> str:
        root = request.scope.get("root_path", "") if request is not None else ""
        return f"{root}/v1/jobs/{job_id}"

    @staticmethod
    def _file_url(request: Request, job_id: str, name: str) -> str:
        """The file's URL; signed and expiring when the app has keys, so a browser can load it."""
        path = f"/v1/jobs/{job_id}/files/{name}"
        auth = request_auth(request)
        signed = auth.sign_path(path, principal(request).key_id) if auth is not None else path
        return request.scope.get("root_path", "") + signed

    def render(self, job: Job, position: int | None, request: Request, estimate_s: float | None = None) -> JobStatus:
        base = self._base(request, job.id)
        return JobStatus(
            id=job.id, kind=job.kind, state=job.state, queue_position=position, estimated_start_s=estimate_s,
            priority=job.priority,
            progress=_public_progress(job.progress) if job.progress else None,
            attempts=job.attempts, max_attempts=self.retry_limit + 1, cancel_requested=job.cancel_requested,
            created_at=job.created_at, started_at=job.started_at, finished_at=job.finished_at,
            expires_at=job.expires_at, timings=job_timings(job), error=job.error, history=job.history,
            files=[JobFileLink(name=f.name, url=self._file_url(request, job.id, f.name), content_type=f.content_type,
                               size=f.size)
                   for f in job.files],
            webhooks=[WebhookDelivery(kind=d["target"].get("kind", "webhook"), url=d["target"]["url"],
                                      next_attempt_at=d["next_at"], **{k: d[k] for k in _DELIVERY_FIELDS})
                      for d in job.deliveries],
            links=JobLinks(self=base, events=f"{base}/events", cancel=f"{base}/cancel",
                           result=f"{base}/result" if job.state == SUCCEEDED else None),
        )


class _SyncTurn:
    """A synchronous request's turn in the same fair order as jobs (jobs/fairness.py): at once when
    nothing is queued and a slot is free, else when the caller's group comes next; 503 with
    Retry-After when none came within `wait_s`. `end` frees its slot and charges `device_s` to the
    group, whenever the turn comes: a request that ended before it still gives its slot back.
    (services.graph.Turn)"""

    def __init__(self, api: JobsApi, who, kind: str, wait_s: float, overlap: bool):
        self._api, self._who, self._kind, self._wait_s, self.overlap = api, who, kind, wait_s, overlap
        self._asked: asyncio.Future | None = None
        self._asked_at = 0.0
        self.device_s = self.waited_s = 0.0

    def ask(self) -> None:
        if self._asked is None:
            who = self._who
            self._asked_at = time.perf_counter()
            self._asked = asyncio.ensure_future(self._api.runner.sync_turn.remote(
                self._kind, who.key_id, who.group, self._wait_s))

    async def granted(self) -> None:
        self.ask()
        # Shielded: a request cancelled while it waits must not cancel the call, whose turn `end` frees.
        token = await asyncio.shield(self._asked)
        if not self.waited_s:
            self.waited_s = time.perf_counter() - self._asked_at
        if token is None:
            wait_s = self._wait_s
            raise JobError(503, f"no turn for this request within {wait_s:g}s: the {self._kind} models are busy with "
                                "jobs and requests of keys that are behind their share (jobs.fairness.sync_max_wait_s), "
                                "or this key is paused (weight 0 in the keys file); retry later, or submit it as a job",
                           {"Retry-After": str(math.ceil(wait_s))})

    def end(self) -> None:
        if self._asked is None:
            return  # never asked for: the request ended before its graph ran
        if self._asked.done():
            self._release(self._asked)
        else:
            self._asked.add_done_callback(self._release)

    def _release(self, asked: asyncio.Future) -> None:
        if asked.cancelled() or asked.exception() is not None or asked.result() is None:
            return  # no turn was given: nothing to free
        self._api._ended(asked.result(), self._who.group or self._who.key_id, self.device_s)


_DELIVERY_FIELDS = ("id", "event", "state", "attempts", "last_status", "last_error", "delivered_at")


def _agreed(sent: list[dict], history: list[dict]) -> int:
    """How many leading entries of `history` are as they were sent."""
    count = 0
    for old, new in zip(sent, history):
        if old != new:
            break
        count += 1
    return count


def _public_progress(progress: dict) -> dict:
    return {key: progress[key] for key in ("stage", "round", "step", "steps", "eta_s", "updated_at", "preview")
            if key in progress}


def _sse(event: str, data: dict, event_id: int) -> dict:
    """One event as `stream_response` takes it (sse-starlette's ServerSentEvent fields)."""
    return {"event": event, "data": dumps(data), "id": str(event_id)}


def job_timings(job: Job) -> dict[str, float]:
    timings = {}
    first_start = next((entry["at"] for entry in job.history if entry["state"] == "running"), None)
    if first_start is not None:
        timings["queued"] = first_start - job.created_at
    if job.started_at is not None and job.finished_at is not None and job.started_at <= job.finished_at:
        timings["running"] = job.finished_at - job.started_at
    if job.finished_at is not None:
        timings["total"] = job.finished_at - job.created_at
    return {key: round(value, 4) for key, value in timings.items()}
