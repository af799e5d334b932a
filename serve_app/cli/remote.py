"""The `genserve` commands that talk to a running service through `serve_app.client`:

    genserve generate PROMPT [-o out.png] [--model --seed --size WxH --steps --n --style ...]
    genserve animate [IMAGE] [-o out.mp4] [--model --prompt --frames --fps --seed --steps --motion --interpolate]
    genserve jobs list [--state S] [--limit N] | show ID | wait ID [-o DIR] | cancel ID

Each takes `--url` (default $GENSERVE_URL, else http://127.0.0.1:8000), `--api-key` (default
$GENSERVE_API_KEY) and `--json` (the result as JSON on stdout). Generation runs as a job, so a
progress bar on stderr follows its event stream; a service without jobs is asked synchronously.

Exit codes: 0 done; 1 the job failed or was cancelled, or the service refused the request (4xx,
or still busy after the retries); 2 usage error (bad arguments or field values, caught before
sending); 3 the service is unreachable. Ctrl-C while waiting leaves the job running (130).
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from pathlib import Path

from pydantic import BaseModel, ValidationError

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
VIDEO_FORMATS = ("mp4", "gif", "webp")


def add_commands(commands) -> None:
    """Add generate, animate and jobs to the `genserve` parser's subcommands."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=None, help="the service (default $GENSERVE_URL, else http://127.0.0.1:8000)")
    common.add_argument("--api-key", default=None, help="sent as a Bearer token (default $GENSERVE_API_KEY)")
    common.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    common.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="draw a progress bar on stderr (default: when stderr is a terminal)")

    generate = commands.add_parser("generate", parents=[common], help="generate images from a prompt")
    generate.add_argument("prompt")
    generate.add_argument("-o", "--output", default="image.png",
                          help="PNG to write (default %(default)s); with --n > 1, NAME-1.png, NAME-2.png, ...")
    generate.add_argument("--model", help="a model id from GET /v1/models (default: the service's)")
    generate.add_argument("--seed", type=int)
    generate.add_argument("--size", type=_size, help="WIDTHxHEIGHT, e.g. 1024x768")
    generate.add_argument("--steps", type=int, dest="num_inference_steps")
    generate.add_argument("--guidance", type=float, dest="guidance_scale")
    generate.add_argument("--n", type=int, dest="num_images", help="images to return, 1-4")
    generate.add_argument("--style")
    generate.add_argument("--negative", dest="negative_prompt")
    generate.add_argument("--no-enhance", dest="enhance", action="store_false", default=None,
                          help="send the prompt as written")
    generate.add_argument("--max-attempts", type=int)
    generate.set_defaults(func=_generate)

    animate = commands.add_parser("animate", parents=[common],
                                  help="animate an image into a video, or make one from --prompt")
    animate.add_argument("image", type=Path, nargs="?", help="a PNG or JPEG (leave out for text-to-video)")
    animate.add_argument("-o", "--output", default="video.mp4",
                         help="the video (default %(default)s); .gif or .webp picks that format")
    animate.add_argument("--model", help="a video model id from GET /v1/models (default: the service's)")
    animate.add_argument("--prompt", help="text-to-video without IMAGE; with it, guides models that take both (ltx)")
    animate.add_argument("--frames", type=int, dest="num_frames")
    animate.add_argument("--fps", type=int)
    animate.add_argument("--seed", type=int)
    animate.add_argument("--size", type=_size)
    animate.add_argument("--steps", type=int, dest="num_inference_steps")
    animate.add_argument("--motion", type=int, dest="motion_bucket_id", help="svd: 0-255, more motion when higher")
    animate.add_argument("--interpolate", type=int, choices=(2, 4),
                         help="raise the frame rate k times (ffmpeg motion interpolation): (N-1)*k+1 frames")
    animate.set_defaults(func=_animate)

    jobs = commands.add_parser("jobs", help="list, show, wait for or cancel async jobs")
    verbs = jobs.add_subparsers(dest="verb", required=True)
    listing = verbs.add_parser("list", parents=[common], help="jobs, newest first")
    listing.add_argument("--state", choices=("queued", "running", "succeeded", "failed", "cancelled"))
    listing.add_argument("--limit", type=int, default=20)
    listing.set_defaults(func=_jobs_list)
    show = verbs.add_parser("show", parents=[common], help="one job's status")
    show.add_argument("job_id")
    show.set_defaults(func=_jobs_show)
    wait = verbs.add_parser("wait", parents=[common], help="follow a job to its end")
    wait.add_argument("job_id")
    wait.add_argument("-o", "--output-dir", type=Path, help="write the job's files here once it succeeds")
    wait.set_defaults(func=_jobs_wait)
    cancel = verbs.add_parser("cancel", parents=[common], help="cancel a queued or running job")
    cancel.add_argument("job_id")
    cancel.set_defaults(func=_jobs_cancel)


def run(args: argparse.Namespace) -> int:
    """Run a remote command, mapping what went wrong to the documented exit codes."""
    from serve_app.client import GenserveError, JobFailed, Unreachable

    try:
        return args.func(args)
    except ValidationError as error:
        _error(f"invalid request: {_fields(error)}")
        return EXIT_USAGE
    except (UsageError, ValueError) as error:
        _error(str(error))
        return EXIT_USAGE
    except Unreachable as error:
        _error(f"service unreachable: {error}")
        return EXIT_UNREACHABLE
    except JobFailed as error:
        if args.json:
            _print_json(error.job)
        _error(str(error))
        return EXIT_FAILED
    except GenserveError as error:
        _error(str(error))
        return EXIT_FAILED
    except KeyboardInterrupt:
        job_id = getattr(args, "submitted", None) or getattr(args, "job_id", None)
        if job_id:
            _error(f"stopped waiting; job {job_id} goes on (genserve jobs cancel {job_id} stops it)")
        return EXIT_INTERRUPTED


class UsageError(Exception):
    pass


# Commands


def _generate(args: argparse.Namespace) -> int:
    from serve_app.protocol.schemas import ImageRequest

    fields = _given(args, "model", "seed", "num_inference_steps", "guidance_scale", "num_images", "style",
                    "negative_prompt", "enhance", "max_attempts")
    if args.size:
        fields["width"], fields["height"] = args.size
    request = ImageRequest(prompt=args.prompt, **fields)
    outputs = _numbered(Path(args.output), request.num_images)
    with _client(args) as client:
        result, files = _run_job(client, args, "image", request)
        if result is None:  # no jobs deployed: the sync endpoint, without progress
            response = client.images(request)
            files = [image.image_bytes() for image in response.images]
            result = response.model_dump(mode="json", exclude={"images"}) | {
                "images": [image.model_dump(mode="json", exclude={"b64_png", "b64_image"}) for image in response.images]}
        saved = _save(files, outputs)
    _report(args, result, saved)
    return EXIT_OK


def _animate(args: argparse.Namespace) -> int:
    from serve_app.protocol.schemas import VideoRequest

    output = Path(args.output)
    output_format = output.suffix.lstrip(".").lower()
    if output_format not in VIDEO_FORMATS:
        endings = ", ".join("." + name for name in VIDEO_FORMATS)
        raise UsageError(f"--output must end in one of {endings}; got {output.name!r}")
    if args.image is None and args.prompt is None:
        raise UsageError("give IMAGE to animate, or --prompt for text-to-video")
    if args.image is not None and not args.image.is_file():
        raise UsageError(f"no image file {str(args.image)!r}")
    fields = _given(args, "model", "prompt", "num_frames", "fps", "seed", "num_inference_steps", "motion_bucket_id",
                    "interpolate")
    if args.size:
        fields["width"], fields["height"] = args.size
    if args.image is not None:
        fields["image"] = base64.b64encode(args.image.read_bytes()).decode()
    request = VideoRequest(output_format=output_format, **fields)
    with _client(args) as client:
        result, files = _run_job(client, args, "video", request)
        if result is None:
            response = client.videos(request)
            files = [base64.b64decode(response.b64_video)]
            result = response.model_dump(mode="json", exclude={"b64_video"})
        saved = _save(files, [output])
    _report(args, result, saved)
    return EXIT_OK


def _jobs_list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        page = client.jobs(state=args.state, limit=args.limit)
    return _show(args, page, _print_table)


def _jobs_show(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = client.job(args.job_id)
    return _show(args, job, _print_status)


def _jobs_wait(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = _follow(client, args, args.job_id)
        saved = []
        if args.output_dir is not None:
            args.output_dir.mkdir(parents=True, exist_ok=True)
            files = [client.file(job.id, link.name) for link in job.files]
            saved = _save(files, [args.output_dir / f"{job.id}-{link.name}" for link in job.files])
    if args.json:
        _print_json(job.model_dump(mode="json") | {"saved": [str(path) for path in saved]})
    else:
        _print_status(job)
        for path in saved:
            print(path)
    return EXIT_OK


def _jobs_cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = client.cancel(args.job_id)
    return _show(args, job, _print_cancelled)


# Jobs with a progress bar


def _run_job(client, args, kind: str, request: BaseModel):
    """Submit, follow with a progress bar, fetch the result and files. (None, None) without jobs."""
    from serve_app.client import RequestRejected

    try:
        job = client.submit(kind, request)
    except RequestRejected as error:
        if error.status == 501 and "jobs" in str(error.detail):
            return None, None
        raise
    args.submitted = job.id
    job = _follow(client, args, job.id)
    result = client.result(job.id)
    files = [client.file(job.id, link.name) for link in job.files]
    return result.model_dump(mode="json") | {"job_id": job.id}, files


def _follow(client, args, job_id: str):
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console = Console(stderr=True)
    show = console.is_terminal if args.progress is None else args.progress
    if not show:
        return client.wait(job_id)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
               TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(f"{job_id}: submitted", total=None)

        def on_event(event) -> None:
            if event.event == "progress" and event.progress is not None:
                step = event.progress
                label = step.stage if step.round == 1 else f"{step.stage} (round {step.round})"
                progress.update(task, description=f"{job_id}: {label}", completed=step.step, total=step.steps)
            elif event.event == "state":
                progress.update(task, description=f"{job_id}: {event.state}")

        return client.wait(job_id, on_event=on_event)


# Helpers


def _client(args):
    from serve_app.client import Client

    return Client(args.url, args.api_key)


def _size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, e.g. 1024x768; got {text!r}") from None
    return width, height


def _given(args, *names: str) -> dict:
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def _numbered(output: Path, count: int) -> list[Path]:
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{index}{output.suffix}") for index in range(1, count + 1)]


def _save(files: list[bytes], paths: list[Path]) -> list[Path]:
    for data, path in zip(files, paths):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return paths[: len(files)]


def _report(args, result: dict, saved: list[Path]) -> None:
    if args.json:
        _print_json(result | {"saved": [str(path) for path in saved]})
        return
    for path in saved:
        print(path)
    details = [f"model {result.get('model')}", f"seed {result.get('seed', _first_seed(result))}"]
    if result.get("enhanced_prompt"):
        details.append(f"prompt: {result['enhanced_prompt']}")
    print(", ".join(details), file=sys.stderr)


def _first_seed(result: dict):
    images = result.get("images") or [{}]
    return images[0].get("seed")


def _show(args, value: BaseModel, print_text) -> int:
    """A jobs command's answer: `value` as JSON with --json, else as `print_text` writes it."""
    if args.json:
        _print_json(value)
    else:
        print_text(value)
    return EXIT_OK


def _print_table(page) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("id", "kind", "state", "created", "queue", "error")
    for job in page.jobs:
        table.add_row(job.id, job.kind, job.state, _time(job.created_at),
                      "" if job.queue_position is None else str(job.queue_position), job.error or "")
    Console().print(table)


def _print_cancelled(job) -> None:
    print(f"{job.id}: {job.state}" + (" (stops at its next step)" if job.state == "running" else ""))


def _print_status(job) -> None:
    line = f"{job.id}  {job.kind}  {job.state}"
    if job.queue_position is not None:
        line += f"  queue position {job.queue_position}"
    if job.progress is not None:
        line += f"  {job.progress.stage} step {job.progress.step}/{job.progress.steps}"
    print(line)
    if job.error:
        print(f"error: {job.error}")
    for link in job.files:
        print(f"file: {link.name} ({link.content_type}, {link.size} bytes) {link.url}")


def _print_json(value) -> None:
    data = value.model_dump(mode="json") if isinstance(value, BaseModel) else value
    print(json.dumps(data, indent=2))


def _fields(error: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, item['loc'])) or 'request'}: {item['msg']}" for item in error.errors())


def _time(timestamp: float) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S")


def _error(message: str) -> None:
    print(f"genserve: {message}", file=sys.stderr)
