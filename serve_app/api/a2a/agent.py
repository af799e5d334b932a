"""genserve as an A2A agent (the official `a2a-sdk`, protocol 1.0 over JSON-RPC at /a2a).

An A2A task *is* a durable job: the task id is the job id, its state is the job's, and its
artifacts are the job's files. Nothing lives in one replica's memory, so any Ingress replica answers
`GetTask`/`CancelTask` for any task, and a task survives a restart because its job does. The
request handler therefore implements the SDK's `RequestHandler` over the job store
(`serve_app.jobs`) instead of the SDK's in-memory task registry; the context id and the message id
ride in the job's idempotency key (`a2a:<context_id>:<message_id>`), so a resent message is the
same task, never a second job.

A message is a text prompt plus optional data parts holding request fields (validated by the same
request models and model-dependent checks as POST /v1/jobs) and, for the image skills, a file
part with the image. Bad arguments are A2A `InvalidParams` errors naming the field; nothing reaches
a model. See docs/agents.md.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncGenerator, Callable
from typing import Any

from a2a.server.context import ServerCallContext
from a2a.server.request_handlers.request_handler import RequestHandler
from a2a.server.request_handlers.response_helpers import agent_card_to_dict
from a2a.server.routes import create_jsonrpc_routes
from a2a.server.routes.common import DefaultServerCallContextBuilder
from a2a.types import a2a_pb2 as pb
from a2a.utils.constants import AGENT_CARD_WELL_KNOWN_PATH, PROTOCOL_VERSION_1_0, TransportProtocol
from a2a.utils.errors import (
    ExtendedAgentCardNotConfiguredError,
    InvalidParamsError,
    TaskNotCancelableError,
    TaskNotFoundError,
    UnsupportedOperationError,
)
from fastapi.encoders import jsonable_encoder
from google.protobuf.json_format import MessageToDict, ParseDict
from google.protobuf.struct_pb2 import Value
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from deployments.names import SCORE_RANGES
from serve_app.api.a2a.push_configs import JobPushConfigStore
from serve_app.jobs import http as jobs_http
from serve_app.jobs.model import CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED, Job, unscoped_idempotency_key
from serve_app.protocol.errors import RequestError, explain_errors
from serve_app.protocol.jobs import JobSubmission
from serve_app.protocol.schemas import ScoreRequest
from serve_app.security.guard import request_auth

RPC_PATH = "/a2a"
MAX_WAIT_S = 300.0  # SendMessage (blocking) answers by then; the task goes on and GetTask reads it
KEY_PREFIX = "a2a:"

# The skills (ids are what a data part's `skill` names); the video ones only where video is deployed.
GENERATE_IMAGE, ANIMATE_IMAGE, TEXT_TO_VIDEO, SCORE_IMAGE = "generate-image", "animate-image", "text-to-video", "score-image"
EDIT_IMAGE = "edit-image"
SKILLS: dict[str, dict] = {
    GENERATE_IMAGE: dict(
        name="Generate image",
        description="Text to image: the message's text is the prompt; a data part may set any POST /v1/images "
                    "field (model, width, height, num_inference_steps, seed, quality_threshold, ...). "
                    "Quality-gated: low-scoring candidates are regenerated.",
        tags=["image", "text-to-image"], examples=["a lighthouse at dusk, oil painting"],
        input_modes=["text/plain", "application/json"], output_modes=["image/png", "application/json"]),
    EDIT_IMAGE: dict(
        name="Edit image by instruction",
        description="The message's text is the instruction (\"make it night\", \"put this logo on that mug\"); the "
                    "images to edit or draw from are file parts and/or earlier tasks' images as "
                    "{\"reference_images\": [{\"job_id\": ..., \"index\": 0}]} in a data part, with "
                    "{\"skill\": \"edit-image\"} and any POST /v1/images field. Runs on a model with "
                    "instruction_edits (GET /v1/models): the one named by `model`, else the first deployed.",
        tags=["image", "image-editing", "reference-images"], examples=["make it night"],
        input_modes=["text/plain", "image/png", "image/jpeg", "application/json"],
        output_modes=["image/png", "application/json"]),
    ANIMATE_IMAGE: dict(
        name="Animate image",
        description="Image to video: send the image as a file part and {\"skill\": \"animate-image\"} in a "
                    "data part, with any POST /v1/videos field (`model`: a video model that animates images, "
                    "see GET /v1/models; text guides those whose text_to_video is native).",
        tags=["video", "image-to-video"], examples=[],
        input_modes=["image/png", "image/jpeg", "application/json"], output_modes=["video/mp4", "application/json"]),
    TEXT_TO_VIDEO: dict(
        name="Text to video",
        description="Text to video: {\"skill\": \"text-to-video\"} in a data part, with any POST /v1/videos field. "
                    "Video models whose text_to_video is native (GET /v1/models) take the text; keyframe ones animate "
                    "an image drawn from it.",
        tags=["video", "text-to-video"], examples=["waves breaking on rocks"],
        input_modes=["text/plain", "application/json"], output_modes=["video/mp4", "application/json"]),
    SCORE_IMAGE: dict(
        name="Score image",
        description="Scores image file parts against the text (CLIP alignment, aesthetic, LAION, aspects): "
                    "{\"skill\": \"score-image\"} in a data part, with any POST /v1/scores field. Answers with "
                    "a message, no task.",
        tags=["image", "evaluation"], examples=[],
        input_modes=["text/plain", "image/png", "image/jpeg", "application/json"], output_modes=["application/json"]),
}
VIDEO_SKILLS = (ANIMATE_IMAGE, TEXT_TO_VIDEO)

STATES = {
    QUEUED: pb.TASK_STATE_SUBMITTED,
    RUNNING: pb.TASK_STATE_WORKING,
    SUCCEEDED: pb.TASK_STATE_COMPLETED,
    CANCELLED: pb.TASK_STATE_CANCELED,
    FAILED: pb.TASK_STATE_FAILED,
}


# The Agent Card

# With API keys, the card says so: a bearer key with the `generate` scope (every A2A call is a POST).
BEARER = pb.SecurityScheme(http_auth_security_scheme=pb.HTTPAuthSecurityScheme(
    scheme="Bearer", description="A genserve API key with the `generate` scope (`genserve keys create`)."))


def agent_card(base_url: str, video: bool, keys: bool = False, edits: bool = False) -> pb.AgentCard:
    """The Agent Card; `keys`: the service has API keys, so the card declares the bearer scheme; `edits`:
    a deployed model edits by instruction, so the card offers edit-image."""
    skills = [pb.AgentSkill(id=skill_id, **fields) for skill_id, fields in SKILLS.items()
              if (video or skill_id not in VIDEO_SKILLS) and (edits or skill_id != EDIT_IMAGE)]
    security = {}
    if keys:
        requirement = pb.SecurityRequirement()
        requirement.schemes["bearer"].list.append("generate")
        security = {"security_schemes": {"bearer": BEARER}, "security_requirements": [requirement]}
    return pb.AgentCard(
        name="genserve",
        description="Image and video generation with prompt enhancement and a quality gate (CLIP scores); "
                    "every task is a durable genserve job.",
        version="0.1.0",
        supported_interfaces=[pb.AgentInterface(url=f"{base_url}{RPC_PATH}", protocol_binding=TransportProtocol.JSONRPC,
                                                protocol_version=PROTOCOL_VERSION_1_0)],
        capabilities=pb.AgentCapabilities(streaming=True, push_notifications=True),
        default_input_modes=["text/plain", "application/json"],
        default_output_modes=["image/png", "video/mp4", "application/json"],
        skills=skills,
        **security,
    )


# Parsing a message into a request

def _field_error(detail, skip: int) -> InvalidParamsError:
    """A JobError / ValidationError detail (a list of {loc, msg}) or a message as A2A's InvalidParams;
    each field also as a violation of the SDK's `errors` data (a google.rpc.BadRequest on the wire).
    `skip`: the loc's leading parts that are not the message's fields ("body", "request")."""
    if not isinstance(detail, list):
        return InvalidParamsError(str(detail))
    errors = []
    for item in detail:
        loc = [str(part) for part in item.get("loc", ())][skip:]
        message = str(item.get("msg", "")).removeprefix("request.")
        errors.append({"field": ".".join(loc) or "message", "message": message})
    return InvalidParamsError("; ".join(error["message"] for error in errors), data={"errors": errors})


def _request_error(error: RequestError) -> InvalidParamsError:
    message = f"{error.field}: {error.message} (allowed: {error.allowed})"
    return InvalidParamsError(message, data={"errors": [{"field": error.field, "message": message}]})


def _whole_numbers(value):
    """A data part's JSON with whole numbers as ints: protobuf's Struct keeps every number as a double
    (a seed of 7 arrives as 7.0), and the request models take ints strictly."""
    if isinstance(value, dict):
        return {key: _whole_numbers(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_whole_numbers(item) for item in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def parse_message(message: pb.Message, video: bool) -> tuple[str, dict]:
    """(skill, request fields) from a user message: text parts are the prompt, data parts' fields
    are request fields (`skill` picks the skill), file parts are images (base64)."""
    if message.role != pb.ROLE_USER:
        raise InvalidParamsError("message.role: must be ROLE_USER")
    if message.task_id:
        raise InvalidParamsError(f"message.task_id: tasks here take one message; send a new message without "
                                 f"task_id (task {message.task_id} is a job of its own)")
    texts, fields, images = [], {}, []
    for index, part in enumerate(message.parts):
        kind = part.WhichOneof("content")
        if kind == "text":
            texts.append(part.text)
        elif kind == "data":
            data = _whole_numbers(MessageToDict(part.data))
            if not isinstance(data, dict):
                raise InvalidParamsError(f"message.parts[{index}].data: must be an object of request fields")
            clash = sorted(set(data) & set(fields))
            if clash:
                raise InvalidParamsError(f"message.parts[{index}].data: {clash[0]!r} is set twice")
            fields.update(data)
        elif kind == "raw":
            if part.media_type and not part.media_type.startswith("image/"):
                raise InvalidParamsError(f"message.parts[{index}].media_type: {part.media_type!r} is not an image "
                                         "(allowed: image/png, image/jpeg)")
            images.append(base64.b64encode(part.raw).decode())
        else:
            raise InvalidParamsError(f"message.parts[{index}]: {kind or 'empty'} parts are not accepted; send text, "
                                     "data, or an image as raw bytes")
    skill = fields.pop("skill", None)
    if skill is None:
        skill = ANIMATE_IMAGE if images and video else GENERATE_IMAGE
    allowed = [s for s in SKILLS if video or s not in VIDEO_SKILLS]
    if skill not in allowed:
        raise InvalidParamsError(f"skill: {skill!r} is not a skill of this agent (allowed: {', '.join(allowed)})")
    text = "\n".join(t for t in texts if t.strip())
    if text:
        if "prompt" in fields:
            raise InvalidParamsError("prompt: given both as text and in a data part; send one")
        fields["prompt"] = text
    if skill == SCORE_IMAGE:
        if "images" in fields and images:
            raise InvalidParamsError("images: given both as file parts and in a data part; send one")
        if images:
            fields["images"] = images
    elif skill == EDIT_IMAGE:
        fields["reference_images"] = [*fields.get("reference_images", []), *images]
        if not fields["reference_images"]:
            raise InvalidParamsError("reference_images: edit-image needs the images to edit, as file parts or as "
                                     "earlier tasks' images [{job_id, index}] in a data part")
    elif images:
        if skill != ANIMATE_IMAGE:
            raise InvalidParamsError(f"image: file parts are for animate-image, edit-image and score-image, not {skill}")
        if len(images) > 1 or "image" in fields:
            raise InvalidParamsError("image: animate-image takes one image")
        fields["image"] = images[0]
    if skill == TEXT_TO_VIDEO and "image" in fields:
        raise InvalidParamsError("image: text-to-video starts from the text alone; use animate-image to animate an image")
    if skill == ANIMATE_IMAGE and "image" not in fields:
        raise InvalidParamsError("image: animate-image needs the image as a file part")
    return skill, fields


# Rendering a job as a task

def context_of(job: Job) -> str:
    # The store keeps the key with the owner in front ("<owner>:a2a:<context>:<message>").
    key = unscoped_idempotency_key(job.owner, job.idempotency_key) or ""
    if key.startswith(KEY_PREFIX):
        return key[len(KEY_PREFIX):].split(":", 1)[0]
    return job.id  # a job submitted over HTTP: its own context


def _agent_text(job: Job, text: str) -> pb.Message:
    return pb.Message(message_id=f"{job.id}-v{job.version}", context_id=context_of(job), task_id=job.id,
                      role=pb.ROLE_AGENT, parts=[pb.Part(text=text)])


def _status(job: Job) -> pb.TaskStatus:
    status = pb.TaskStatus(state=STATES[job.state])
    status.timestamp.FromSeconds(int(job.finished_at or job.started_at or job.created_at))
    if job.state == RUNNING and job.progress:
        status.message.CopyFrom(_agent_text(job, progress_text(job.progress)))
    elif job.state in (FAILED, CANCELLED) and job.error:
        status.message.CopyFrom(_agent_text(job, job.error))
    elif job.state == QUEUED and job.attempts:
        reason = next((e.get("reason") for e in reversed(job.history) if e.get("reason")), None)
        if reason:
            status.message.CopyFrom(_agent_text(job, f"retrying: {reason}"))
    return status


def progress_text(progress: dict) -> str:
    stage = progress.get("stage", "working")
    if progress.get("steps"):
        return f"{stage}: step {progress.get('step', 0)}/{progress['steps']}"
    return stage


def confidence(score: float, metric: str) -> float:
    """The gate metric's score scaled to 0-1 over its documented range (SCORE_RANGES), clipped."""
    low, high = SCORE_RANGES[metric]
    return round(min(1.0, max(0.0, (score - low) / (high - low))), 4)


def reasoning(result: dict) -> str:
    metric, threshold = result["quality_metric"], result["quality_threshold"]
    attempts = result.get("attempts", [])
    tried = "; ".join(
        f"attempt {a['attempt']} (seed {a['seed']}): {metric} {a['scores'][metric]:.3g} "
        f"{'passed' if a['passed'] else 'below'}" for a in attempts)
    returned = ", ".join(f"attempt {image['attempt']}" for image in result["images"])
    verdict = "every returned image passed" if result.get("passed") else "best kept although below the gate"
    return (f"{len(attempts)} candidate(s) scored by {metric} against a gate of {threshold:g}: {tried}. "
            f"Returned {returned}; {verdict}.")


def image_outputs(job: Job) -> list[dict]:
    """The research guide's ImageGenerationOutput for each image of a succeeded image job."""
    result = job.result
    metric = result["quality_metric"]
    why = reasoning(result)
    outputs = []
    for image in result["images"]:
        score = image["scores"][metric]
        outputs.append({
            "image_id": f"{job.id}/{image['file']}",
            "prompt": result["prompt"],
            "enhanced_prompt": result["enhanced_prompt"],
            "dimensions": {"width": image["width"], "height": image["height"]},
            "quality_score": score,
            "quality_metric": metric,
            "generation_time_seconds": result["timings"].get("total"),
            "confidence": confidence(score, metric),
            "reasoning": why,
            "seed": image["seed"],
            "model": result["model"],
        })
    return outputs


def _data_part(data: dict) -> pb.Part:
    part = pb.Part(media_type="application/json")
    part.data.CopyFrom(ParseDict(data, Value()))
    return part


async def artifacts(job: Job, read_file: Callable) -> list[pb.Artifact]:
    """A succeeded job's files as artifacts: each a file part plus a data part describing it."""
    if job.state != SUCCEEDED or not job.result:
        return []
    if job.kind == "image":
        described = [(output, output["image_id"].split("/", 1)[1]) for output in image_outputs(job)]
    else:
        described = [({k: v for k, v in job.result.items() if k not in ("file", "url")}, job.result["file"])]
    found = await asyncio.gather(*(read_file(job.id, name) for _, name in described))
    made = []
    for (data, name), file in zip(described, found):
        if file is None:
            raise TaskNotFoundError(f"task {job.id}: its file {name} has expired")
        content, content_type = file
        made.append(pb.Artifact(artifact_id=f"{job.id}-{name}", name=name,
                                parts=[pb.Part(raw=content, media_type=content_type, filename=name), _data_part(data)]))
    return made


# The request handler: every method reads or writes the job store

class _CallerContext(DefaultServerCallContextBuilder):
    """The SDK's call context, plus the HTTP request: its caller (API key) owns the jobs a task makes."""

    def build(self, request: Request) -> ServerCallContext:
        context = super().build(request)
        context.state["request"] = request
        return context


def _caller(context: ServerCallContext | None) -> Request:
    return context.state["request"]


class JobTaskHandler(RequestHandler):
    def __init__(self, services: Callable):
        self._services = services  # () -> the replica's Services (set on app.state when it starts)
        self.push_configs = JobPushConfigStore(self._jobs)

    def _jobs(self) -> jobs_http.JobsApi:
        try:
            return self._services().jobs_api()
        except jobs_http.JobError as error:
            raise UnsupportedOperationError(f"tasks need async jobs, which are not deployed: {error.detail}") from None

    async def _read_file(self, job_id: str, name: str):
        return await self._jobs().runner.read_file.remote(job_id, name)

    async def _find(self, job_id: str, request: Request) -> Job:
        try:
            return (await self._jobs().find(job_id, request))[0]
        except jobs_http.JobError:
            raise TaskNotFoundError(f"no task {job_id!r}: it never existed, or its job expired") from None

    async def task(self, job: Job) -> pb.Task:
        return pb.Task(id=job.id, context_id=context_of(job), status=_status(job),
                       artifacts=await artifacts(job, self._read_file))

    async def _start(self, params: pb.SendMessageRequest, request: Request) -> Job | pb.Message:
        """A job for the message (the same job again for a resent message), or a score answer."""
        current = self._services()
        message = params.message
        skill, fields = parse_message(message, video=current.videos is not None)
        context_id = message.context_id or message.message_id
        if skill == SCORE_IMAGE:
            try:
                scores = await current.scores.score(ScoreRequest.model_validate(fields))
            except ValidationError as error:
                errors = [{**item, "loc": ("body", *item["loc"])} for item in error.errors(include_url=False)]
                raise _field_error(jsonable_encoder(explain_errors(errors, ScoreRequest)), skip=1) from None
            except RequestError as error:
                raise _request_error(error) from None
            return pb.Message(message_id=f"{message.message_id}-scores", context_id=context_id, role=pb.ROLE_AGENT,
                              parts=[_data_part(scores.model_dump(mode="json"))])
        kind = "image" if skill in (GENERATE_IMAGE, EDIT_IMAGE) else "video"
        if skill == EDIT_IMAGE and "model" not in fields:
            # The first deployed model that edits by instruction; with none, the default's 422 names the families.
            fields["model"] = next((spec.id for spec in current.images.specs.values() if spec.instruction_edits),
                                   current.images.default_model)
        key = f"{KEY_PREFIX}{context_id}:{message.message_id}"
        # A push config sent with the message is on the job from its start: told even of a quick end.
        targets = None
        if params.configuration.HasField("task_push_notification_config"):
            targets = [await self.push_configs.checked_target("", params.configuration.task_push_notification_config)]
        try:
            job, _, _ = await self._jobs().create(JobSubmission(kind=kind, request=fields), request, key,
                                                  targets=targets)
        except jobs_http.JobError as error:  # the loc is ("body", "request", field...): the message's fields
            raise _field_error(error.detail, skip=2) from None
        return job

    async def _watch(self, job: Job) -> AsyncGenerator[Job]:
        """The job's versions until it finishes (each one yielded once), from the job store."""
        runner = self._jobs().runner
        while not job.finished:
            newer = await runner.watch.remote(job.id, job.version, jobs_http.KEEPALIVE_S)
            if newer is None:
                raise TaskNotFoundError(f"task {job.id}: its job expired")
            if newer.version != job.version:
                yield newer
            job = newer

    async def on_message_send(self, params: pb.SendMessageRequest, context: ServerCallContext) -> pb.Task | pb.Message:
        started = await self._start(params, _caller(context))
        if isinstance(started, pb.Message):
            return started
        job = started
        if not params.configuration.return_immediately:
            job = await self._jobs().wait(job.id, MAX_WAIT_S) or job
        return await self.task(job)

    async def on_message_send_stream(self, params: pb.SendMessageRequest,
                                     context: ServerCallContext) -> AsyncGenerator[Any]:
        started = await self._start(params, _caller(context))
        if isinstance(started, pb.Message):
            yield started
            return
        async for event in self._events(started):
            yield event

    async def _events(self, job: Job) -> AsyncGenerator[Any]:
        """The task, a status update per job version, then the artifacts and the final status."""
        yield pb.Task(id=job.id, context_id=context_of(job), status=_status(job))
        async for newer in self._watch(job):
            job = newer
            if job.finished:
                break
            yield pb.TaskStatusUpdateEvent(task_id=job.id, context_id=context_of(job), status=_status(job))
        for artifact in await artifacts(job, self._read_file):
            yield pb.TaskArtifactUpdateEvent(task_id=job.id, context_id=context_of(job), artifact=artifact,
                                             last_chunk=True)
        yield pb.TaskStatusUpdateEvent(task_id=job.id, context_id=context_of(job), status=_status(job))

    async def on_subscribe_to_task(self, params: pb.SubscribeToTaskRequest,
                                   context: ServerCallContext) -> AsyncGenerator[Any]:
        job = await self._find(params.id, _caller(context))
        async for event in self._events(job):
            yield event

    async def on_get_task(self, params: pb.GetTaskRequest, context: ServerCallContext) -> pb.Task | None:
        return await self.task(await self._find(params.id, _caller(context)))

    async def on_cancel_task(self, params: pb.CancelTaskRequest, context: ServerCallContext) -> pb.Task | None:
        await self._find(params.id, _caller(context))
        try:
            job, _ = await self._jobs().cancel_job(params.id, _caller(context))
        except jobs_http.JobError as error:
            if error.status == 409:
                raise TaskNotCancelableError(str(error.detail)) from None
            raise TaskNotFoundError(str(error.detail)) from None
        return await self.task(job)

    async def on_list_tasks(self, params: pb.ListTasksRequest, context: ServerCallContext) -> pb.ListTasksResponse:
        raise UnsupportedOperationError("ListTasks is not served; GET /v1/jobs lists the jobs behind tasks")

    # Push configs: targets of the task's job (serve_app.api.a2a.push), delivered when it ends.

    async def on_create_task_push_notification_config(self, params: pb.TaskPushNotificationConfig,
                                                      context: ServerCallContext) -> pb.TaskPushNotificationConfig:
        return await self.push_configs.set_info(params.task_id, params, context)

    async def on_get_task_push_notification_config(self, params: pb.GetTaskPushNotificationConfigRequest,
                                                   context: ServerCallContext) -> pb.TaskPushNotificationConfig:
        for config in await self.push_configs.get_info(params.task_id, context):
            if config.id == params.id:
                return config
        raise TaskNotFoundError(f"task {params.task_id} has no push config {params.id!r}")

    async def on_list_task_push_notification_configs(
            self, params: pb.ListTaskPushNotificationConfigsRequest,
            context: ServerCallContext) -> pb.ListTaskPushNotificationConfigsResponse:
        return pb.ListTaskPushNotificationConfigsResponse(
            configs=await self.push_configs.get_info(params.task_id, context))

    async def on_delete_task_push_notification_config(self, params: pb.DeleteTaskPushNotificationConfigRequest,
                                                      context: ServerCallContext) -> None:
        await self.push_configs.delete_info(params.task_id, context, params.id)

    async def on_get_extended_agent_card(self, params, context):
        raise ExtendedAgentCardNotConfiguredError()


def a2a_routes(services: Callable) -> list[Route]:
    """The Agent Card (built per request: absolute URL, video skills only where video is deployed)
    and the JSON-RPC endpoint, for the Ingress's app."""

    async def card(request: Request) -> JSONResponse:
        base = str(request.base_url).rstrip("/")
        auth = request_auth(request)
        keyed = auth is not None and auth.keys is not None
        current = services()
        edits = any(spec.instruction_edits for spec in current.images.specs.values())
        body = agent_card_to_dict(agent_card(base, video=current.videos is not None, keys=keyed, edits=edits))
        return JSONResponse(body, headers={"Cache-Control": "no-cache"})

    return [Route(AGENT_CARD_WELL_KNOWN_PATH, card, methods=["GET"]),
            *create_jsonrpc_routes(JobTaskHandler(services), RPC_PATH, context_builder=_CallerContext())]
