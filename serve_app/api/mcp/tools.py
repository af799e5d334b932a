"""genserve as MCP tools (the official `mcp` SDK's MCPServer), served at /mcp over streamable HTTP.

Stateless over HTTP (`stateless_http=True`): the Ingress may run several replicas and consecutive
calls of one client can land on different ones; everything a tool knows lives in the job store.
Each tool's input schema is the request model's own (`ImageRequest`, `VideoRequest`,
`EnhanceRequest`, `ScoreRequest`), so the limits are the ones POST /v1/images applies. Generation
runs as a durable job: the tool sends progress notifications while it waits up to `wait_s`, then
returns the result (PNG image content, or with `inline: false` resource links to the images' signed
URLs; a video always as a resource link to its file) or, past the bound,
the job id for `get_job`. `edit_image` is `generate_image` with an image to edit: on a model that edits
by instruction, reference images (the prompt says the change); on others, an image to start from. Either
may be the request's own or an image of a finished job (`source_job_id`, or `{job_id, index}` among
`reference_images`), so an agent need not send pixels back. Bad arguments are tool errors (`isError` results) naming the field;
nothing reaches a model and the session carries on.
"""

from __future__ import annotations

import base64
import contextlib
import json
from typing import Annotated, Callable

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.transport_security import TransportSecuritySettings
from mcp_types import CallToolResult, ImageContent, ResourceLink, TextContent
from pydantic import Field

from serve_app.jobs.model import SUCCEEDED, Job
from serve_app.protocol.errors import JobError, RequestError
from serve_app.protocol.jobs import JobSubmission, WebhookSpec
from serve_app.protocol.schemas import EnhanceRequest, ImageRequest, JobImageRef, ScoreRequest, VideoRequest

MAX_WAIT_S = 300.0
WaitSeconds = Annotated[float, Field(
    30.0, ge=0, le=MAX_WAIT_S,
    description=f"How long to wait for the job, 0-{MAX_WAIT_S:g} s (progress is reported meanwhile); "
                "past it the call returns the job id to poll with get_job.",
)]
JobId = Annotated[str, Field(min_length=1, max_length=64, description="A job id from generate_image or generate_video.")]
SourceJobId = Annotated[str | None, Field(
    None, min_length=1, max_length=64,
    description="Edit an image of this finished image job (from generate_image or edit_image) instead of sending "
                "it: a reference image on a model with instruction_edits, else the init_image (give one or the other).",
)]
Inline = Annotated[bool, Field(
    True, description="true: the images as base64 image content; false: a resource_link per image to its URL "
                      "(signed when the server has keys; GET it, no key needed), so megabytes of PNG stay out of "
                      "the caller's context.",
)]
SourceImage = Annotated[int, Field(0, ge=0, le=3, description="Which image of source_job_id's result, 0-3.")]
Webhook = Annotated[WebhookSpec | None, Field(
    None, description="{url, events}: POST the job's end to this URL, signed (as POST /v1/jobs's webhook), so an "
                      "agent need not poll get_job past wait_s.")]


def _tool_error(error: Exception) -> ToolError:
    """genserve's errors as tool errors naming the field (the caller, often a model, can correct them)."""
    if isinstance(error, RequestError):
        return ToolError(f"{error.field}: {error.message} (allowed: {error.allowed})")
    if isinstance(error, JobError):
        detail = error.detail
        if isinstance(detail, list):
            return ToolError("; ".join(item["msg"].removeprefix("request.") for item in detail))
        return ToolError(str(detail))
    return ToolError(str(error))


@contextlib.contextmanager
def _tool_errors(*kinds: type[Exception]):
    """The `kinds` of genserve error raised inside, as tool errors (`_tool_error`)."""
    try:
        yield
    except kinds as error:
        raise _tool_error(error) from None


def _text(data) -> TextContent:
    return TextContent(type="text", text=json.dumps(data, separators=(",", ":")))


def _link(job: Job, base: str, name: str, url: str) -> ResourceLink:
    """A job file as an MCP resource link: its absolute URL (signed when the server has keys), type and size."""
    meta = job.file(name)
    return ResourceLink(type="resource_link", uri=base + url, name=name,
                        mime_type=meta.content_type if meta else None, size=meta.size if meta else None)


def _http_request(ctx: Context):
    """The HTTP request a tool call came in on: its caller (API key) owns the jobs it makes and sees."""
    return ctx.request_context.request


def _structured(data: dict) -> CallToolResult:
    """JSON as text (for clients that read only content) and as structured content."""
    return CallToolResult(content=[_text(data)], structured_content=data)


def build_mcp(services: Callable[[], object], base_url: Callable[[Context], str]) -> MCPServer:
    """The MCP server over one replica's `Services` (read when a tool runs, so it is built first)."""
    server = MCPServer(
        name="genserve",
        instructions="Generate images and videos with genserve: generate_image and generate_video run durable "
                     "jobs and wait for them up to wait_s; poll a returned job id with get_job.",
    )

    async def run_job(kind: str, request, wait_s: float, ctx: Context, inline: bool = True,
                      webhook: WebhookSpec | None = None) -> CallToolResult:
        """Submit the job and wait up to `wait_s`: its result if it finished by then, else its id to
        poll; `webhook` is told when it ends (as POST /v1/jobs's)."""
        jobs = services().jobs_api()
        submission = JobSubmission(kind=kind, request=request.model_dump(mode="json", exclude_unset=True),
                                   webhook=webhook)
        job, _, _ = await jobs.create(submission, _http_request(ctx))

        async def progress(current: Job) -> None:
            if current.progress:
                step, steps = current.progress.get("step", 0), current.progress.get("steps") or None
                if current.state == "succeeded" and steps:
                    step = steps  # step reports are not awaited: the last can land after the result
                await ctx.report_progress(step, steps, f"{current.progress.get('stage', kind)}: step {step}/{steps}")
            else:
                await ctx.report_progress(0, None, current.state)

        await ctx.report_progress(0, None, job.state)
        finished = await jobs.wait(job.id, wait_s, on_change=progress)
        if finished is not None and finished.finished:
            return await finished_result(finished, ctx, inline)
        return pending(finished or job)

    def pending(job: Job) -> CallToolResult:
        return _structured(({
            "job_id": job.id, "state": job.state, "finished": False,
            "next": f"call get_job with job_id {job.id!r} (or cancel_job)",
        }))

    async def finished_result(job: Job, ctx: Context, inline: bool = True) -> CallToolResult:
        jobs = services().jobs_api()
        request = _http_request(ctx)
        status = jobs.render(job, None, request).model_dump(mode="json")
        if job.state != SUCCEEDED:
            return CallToolResult(content=[_text(status)], structured_content=status, is_error=job.state == "failed")
        result = jobs.result_of(job, request).model_dump(mode="json")
        content = [_text({"job_id": job.id, "state": job.state, "result": result})]
        if job.kind == "image" and inline:
            for image in result["images"]:
                found = await jobs.runner.read_file.remote(job.id, image["file"])
                if found is not None:
                    content.append(ImageContent(type="image", data=base64.b64encode(found[0]).decode(),
                                                mime_type=found[1]))
        else:
            files = result["images"] if job.kind == "image" else [result]
            content += [_link(job, base_url(ctx), item["file"], item["url"]) for item in files]
        return CallToolResult(content=content, structured_content={"job_id": job.id, "result": result})

    @server.tool()
    async def generate_image(request: ImageRequest, ctx: Context, wait_s: WaitSeconds = 30.0,
                             inline: Inline = True, webhook: Webhook = None) -> CallToolResult:
        """Generate images from a prompt (enhance, generate, score, regenerate below the quality threshold).
        `request` is POST /v1/images's body. Returns the PNGs (links to them with inline false), or a job id if
        it takes longer than wait_s."""
        with _tool_errors(RequestError, JobError):
            return await run_job("image", request, wait_s, ctx, inline, webhook)

    async def edit_request(request: ImageRequest, source_job_id: str | None, source_image: int,
                           ctx: Context) -> ImageRequest:
        """`request` with the image to edit. On a model that edits by instruction (and no mask): the
        request's reference_images, then source_job_id's image, as references; the jobs look the
        earlier jobs' images up. On others: its own init_image, or the PNG of a finished image job the
        caller may see (another key's job is 'no job', as in get_job)."""
        spec = services().images.spec_of(request.model)
        if spec.instruction_edits and request.mask is None and request.init_image is None:
            references = list(request.reference_images)
            if source_job_id is not None:
                references.append(JobImageRef(job_id=source_job_id, index=source_image))
            if not references:
                raise ToolError("request.reference_images: give the images to edit as request.reference_images "
                                "(base64, or {job_id, index}) or as source_job_id")
            data = {**request.model_dump(mode="json", exclude_unset=True),
                    "reference_images": [ref if isinstance(ref, str) else ref.model_dump() for ref in references]}
            return ImageRequest.model_validate(data)
        if (request.init_image is None) == (source_job_id is None):
            raise ToolError("request.init_image: give the image to edit as request.init_image (base64) or as "
                            "source_job_id, " + ("not both" if source_job_id else "one of them is required"))
        if source_job_id is None:
            return request
        found = await services().jobs_api().job_image(source_job_id, source_image, _http_request(ctx), "source_job_id",
                                                         "source_image")
        data = {**request.model_dump(mode="json", exclude_unset=True), "init_image": base64.b64encode(found).decode()}
        return ImageRequest.model_validate(data)

    @server.tool()
    async def edit_image(request: ImageRequest, ctx: Context, source_job_id: SourceJobId = None,
                         source_image: SourceImage = 0, wait_s: WaitSeconds = 30.0,
                         inline: Inline = True, webhook: Webhook = None) -> CallToolResult:
        """Edit an image. On a model with instruction_edits (list_models), by instruction: request.prompt says
        the change ("make it night") to the reference images, request.reference_images (base64 or earlier
        jobs' {job_id, index}) and/or source_job_id's image. On others: image-to-image from request.init_image
        (or source_job_id's image), or inpainting where request.mask is white; `strength` (0-1) says how much
        changes. `request` is POST /v1/images's body. Returns the PNGs (links to them with inline false), or a job
        id if it takes longer than wait_s."""
        with _tool_errors(RequestError, JobError):
            edited = await edit_request(request, source_job_id, source_image, ctx)
            return await run_job("image", edited, wait_s, ctx, inline, webhook)

    @server.tool()
    async def generate_video(request: VideoRequest, ctx: Context, wait_s: WaitSeconds = 30.0,
                             webhook: Webhook = None) -> CallToolResult:
        """Image-to-video or text-to-video with a video model (`model`, see list_models: SVD animates an
        image or a keyframe drawn from the prompt; LTX-Video and AnimateDiff take the prompt natively).
        `request` is POST /v1/videos's body. Returns a link to the video file, or a job id past wait_s."""
        with _tool_errors(RequestError, JobError):
            return await run_job("video", request, wait_s, ctx, webhook=webhook)

    @server.tool()
    async def get_job(job_id: JobId, ctx: Context, wait_s: WaitSeconds = 0.0, inline: Inline = True) -> CallToolResult:
        """A job's state and progress; its result (images, or links to them with inline false; a link to the
        video) once it has succeeded."""
        with _tool_errors(JobError):
            jobs = services().jobs_api()
            job, position = await jobs.find(job_id, _http_request(ctx))
            if not job.finished and wait_s > 0:
                job = await jobs.wait(job_id, wait_s) or job
            if job.finished:
                return await finished_result(job, ctx, inline)
            return _structured(jobs.render(job, position, _http_request(ctx)).model_dump(mode="json"))

    @server.tool()
    async def cancel_job(job_id: JobId, ctx: Context) -> CallToolResult:
        """Cancel a queued or running job (a running one stops within a denoising step or two)."""
        with _tool_errors(JobError):
            jobs = services().jobs_api()
            job, position = await jobs.cancel_job(job_id, _http_request(ctx))
            return _structured(jobs.render(job, position, _http_request(ctx)).model_dump(mode="json"))

    @server.tool()
    async def enhance_prompt(request: EnhanceRequest) -> CallToolResult:
        """The prompt a model would see for an idea (style, quality modifiers), with advice; nothing is generated."""
        with _tool_errors(RequestError):
            return _structured((await services().images.enhance_prompt(request)).model_dump(mode="json"))

    @server.tool()
    async def score_images(request: ScoreRequest) -> CallToolResult:
        """Score base64 images against a prompt (CLIP alignment, aesthetic, LAION, aspects, pixel statistics)."""
        with _tool_errors(RequestError):
            return _structured((await services().scores.score(request)).model_dump(mode="json"))

    @server.tool()
    async def list_models() -> CallToolResult:
        """The deployed image models with their limits and defaults, the default model, and the video
        models with their capabilities, frame and size rules, own parameters and defaults."""
        current = services()
        images, videos = current.images, current.videos
        return _structured({"models": images.models(), "default_model": images.default_model,
                            "video_models": [] if videos is None else [spec.public() for spec in videos.specs.values()],
                            "default_video_model": None if videos is None else videos.default_model})

    return server


def streamable_http_app(server: MCPServer):
    """The SDK's streamable HTTP app for `server`, stateless; its session manager must be run by the
    top-level app's lifespan (Serve runs only that one)."""
    # DNS-rebinding protection off: the SDK would allow only 127.0.0.1/localhost Host headers, and
    # the Ingress answers whatever host names Serve's proxy is reached by (http_options.host says
    # who can reach it, as for every other route).
    return server.streamable_http_app(
        streamable_http_path="/mcp", stateless_http=True,
        transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
    )
