"""`genserve bench`: what the Serve graph costs over the same calls made in one process.

Both paths run `serve_app.services.images.ImageService` with the same deployment classes and the same
config. In process they are plain objects behind `LocalHandle`s; through Serve each is a replica
behind a `DeploymentHandle`, reached over HTTP. The difference is the price of the graph: HTTP,
the proxy, handle routing and the object store. Requests are sent one at a time, so the figures
are latencies, not throughput.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import statistics
import time
from dataclasses import dataclass

from serve_app import APP_NAME
from serve_app.config import AppArgs, app_args_from_config


@dataclass
class Sample:
    name: str
    seconds: list[float]
    stages: list[dict[str, float]]

    def stage_p50(self, stage: str) -> float:
        return statistics.median(timings.get(stage, 0.0) for timings in self.stages)

    def percentile(self, q: float) -> float:
        return nearest_rank(self.seconds, q)

    @property
    def p50(self) -> float:
        return statistics.median(self.seconds)


def nearest_rank(values, q: float) -> float:
    """The q-th percentile of `values` by nearest rank (NaN when there are none): every bench's."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def _request_body(width: int, height: int, steps: int) -> dict:
    return {"prompt": "a lighthouse on a cliff at dusk", "width": width, "height": height,
            "num_inference_steps": steps, "seed": 1234}


def local_image_service(args: AppArgs, model_ids: list[str] | None = None):
    """The ImageService over the config's deployment classes as plain objects in this process
    (`model_ids`: these image models; default: the default model only)."""
    from deployments.enhancer.prompt_enhancer import PromptEnhancer
    from deployments.image_generator import ImageGenerator
    from deployments.scoring.clip_scorer import ClipScorer
    from serve_app.services.facade import Services
    from serve_app.services.settings import Handles, Settings

    models = [args.image_model(model_id) for model_id in model_ids or [args.default_model_id]]
    settings = Settings.from_args(args.model_copy(update={"image_models": models, "default_model": None}))
    handles = Handles.local(PromptEnhancer.func_or_class(args.enhancer, metrics=False),
                            {model.id: ImageGenerator.func_or_class(model, metrics=False) for model in models},
                            ClipScorer.func_or_class(args.scoring_config(), metrics=False))
    service = Services.build(settings, handles, ingress=False).images
    # One process has one torch thread pool: give it the first generator's setting (each constructor
    # above set it in turn; in Serve each replica keeps its own).
    if models[0].device.torch_threads:
        import torch

        torch.set_num_threads(models[0].device.torch_threads)
    return service


def _in_process(args: AppArgs, body: dict, warmup: int, requests: int, label: str = "") -> Sample:
    from serve_app.protocol.schemas import ImageRequest

    service = local_image_service(args)  # the benchmark measures the default model only
    request = ImageRequest(**body)

    async def run() -> Sample:
        sample = Sample(f"in-process{label}", [], [])
        for index in range(warmup + requests):
            started = time.perf_counter()
            response = await service.generate_images(request)
            if index >= warmup:
                sample.seconds.append(time.perf_counter() - started)
                sample.stages.append(response.timings)
        return sample

    return asyncio.run(run())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serving(args: AppArgs):
    """The app on a Ray cluster and Serve instance of its own; yields an HTTP client."""
    import httpx
    import ray
    from ray import serve

    from serve_app.builder import build_app

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # a one-machine cluster on loopback
    # A cluster of its own: the benchmark ends with serve.shutdown(), which must never stop the
    # apps of a cluster someone else started on this machine.
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    try:
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(args), name=APP_NAME, route_prefix="/")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300) as client:
            yield client
    finally:
        serve.shutdown()
        ray.shutdown()


def _through_serve(args: AppArgs, body: dict, warmup: int, requests: int, label: str = "") -> list[Sample]:
    from ray import serve

    from serve_app.protocol.schemas import ImageRequest

    with serving(args) as client:
        http = Sample(f"serve: HTTP{label}", [], [])
        for index in range(warmup + requests):
            started = time.perf_counter()
            response = client.post("/v1/images", json=body)
            response.raise_for_status()
            if index >= warmup:
                http.seconds.append(time.perf_counter() - started)
                http.stages.append(response.json()["timings"])
        handle = serve.get_app_handle(APP_NAME)
        request = ImageRequest(**body)
        through_handle = Sample(f"serve: handle{label}", [], [])
        for index in range(warmup + requests):
            started = time.perf_counter()
            result = handle.generate_images.remote(request).result()
            if index >= warmup:
                through_handle.seconds.append(time.perf_counter() - started)
                through_handle.stages.append(result.timings)
        return [http, through_handle]


def run_benchmark(config: str, requests: int, warmup: int, width: int, height: int, steps: int,
                  compare_metrics: bool = False, compare_enhancer: bool = False) -> list[Sample]:
    """In process first, then through Serve; with `compare_metrics`, Serve again without metrics;
    with `compare_enhancer`, in process and through Serve again with the other enhancer mode
    (template <-> the config's LLM), so the LLM's added latency shows next to the baseline."""
    args = app_args_from_config(config)
    body = _request_body(width, height, steps)
    samples = [_in_process(args, body, warmup, requests), *_through_serve(args, body, warmup, requests)]
    if compare_enhancer:
        other = "template" if args.enhancer.mode == "llm" else "llm"
        swapped = args.model_copy(update={"enhancer": args.enhancer.model_copy(update={"mode": other})})
        label = f" ({other} enhancer)"
        samples += [_in_process(swapped, body, warmup, requests, label),
                    *_through_serve(swapped, body, warmup, requests, label)]
    if compare_metrics:
        quiet = args.model_copy(update={"metrics": not args.metrics})
        label = " (metrics off)" if args.metrics else " (metrics on)"
        samples += _through_serve(quiet, body, warmup, requests, label)
    return samples


STAGES = ("enhance", "generate", "score", "encode")


def format_table(samples: list[Sample]) -> str:
    """Client-side latency per path, its ratio to in-process, and the service's own stage p50s."""
    baseline = samples[0]
    header = f"{'path':<34}{'n':>4}{'p50 ms':>9}{'p95 ms':>9}{'p50 x':>8}{'p95 x':>8}"
    header += "".join(f"{stage + ' ms':>13}" for stage in STAGES)
    lines = [header]
    for sample in samples:
        line = f"{sample.name:<34}{len(sample.seconds):>4}{sample.p50 * 1000:>9.1f}{sample.percentile(95) * 1000:>9.1f}"
        line += f"{sample.p50 / baseline.p50:>8.3f}{sample.percentile(95) / baseline.percentile(95):>8.3f}"
        line += "".join(f"{sample.stage_p50(stage) * 1000:>13.1f}" for stage in STAGES)
        lines.append(line)
    return "\n".join(lines)
