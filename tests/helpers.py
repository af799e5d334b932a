import base64
import io
import socket
import time
from pathlib import Path
from typing import Callable, TypeVar

from PIL import Image

from serve_app.config import generator_name

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(condition: Callable[[], T], timeout_s: float, interval_s: float = 0.25, what: str = "condition") -> T:
    """Poll `condition` until it returns something truthy; fail with `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    result = None
    while time.monotonic() < deadline:
        try:
            result = condition()
            if result:
                return result
        except Exception as error:  # the service may not be up yet
            last_error = error
        time.sleep(interval_s)
    raise TimeoutError(f"{what} not met within {timeout_s}s (last result: {result!r}, last error: {last_error!r})")


def image_bytes(image=None, fmt: str = "PNG", *, size: tuple[int, int] = (320, 240),
                color: tuple[int, int, int] = (200, 80, 20), **save) -> bytes:
    """`image` (a PIL image or a uint8 array; by default a `size` image of one `color`) encoded as
    `fmt`, PNG unless told, as a client uploads it; `save` goes to PIL (an `exif=`, say)."""
    if image is None:
        image = Image.new("RGB", size, color)
    elif not isinstance(image, Image.Image):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def image_b64(image=None, fmt: str = "PNG", **options) -> str:
    """`image_bytes` in base64, as the JSON bodies carry uploads."""
    return base64.b64encode(image_bytes(image, fmt, **options)).decode("ascii")


def tiny_args(config: Path, **deployments: dict) -> dict:
    """A Serve config's genserve args with tiny models (and LAION head) and no warm-up calls, everything
    else as the file says.

    Models get `device: auto` (the GPU profiles say cuda), so on a machine whose GPUs are only
    declared to Ray they run on the CPU (with fp32, one torch thread each: the cores are shared). `deployments` updates the
    named deployments' options (an image model's by its deployment name), e.g.
    `FluxSchnellGenerator={"num_replicas": 2}`.
    """
    from serve_app.config import app_args_from_config

    args = app_args_from_config(config).model_dump(exclude_none=True)
    for model in [*args["image_models"], *args.get("video_models", []), *args["scorers"]]:
        model["source"] = "tiny"
        model["device"].update(device="auto", dtype="auto", torch_threads=1)
    # The profiles' warm-up calls (the default shape at full size) would be the slowest part of a tiny
    # replica's start on shared cores; the tests of warm-up itself run on the dev app and in process.
    for model in args["image_models"]:
        model["warmup"] = {"default_shape": False, "shapes": []}
    for model in args.get("video_models", []):
        model["warmup"] = {"default_shape": False}
    llm = args["enhancer"]["llm"]
    if llm["backend"] == "transformers":
        # The tiny LLM's answer is gibberish at any length (the template answers); a short one
        # keeps the enhancer, which runs one answer at a time, from becoming the bottleneck.
        llm.update(source="tiny", max_new_tokens=8)
        llm["device"].update(device="auto", dtype="auto", torch_threads=1)
    for scorer in args["scorers"]:  # the LAION head too: a random one sized to the tiny CLIP
        if scorer["family"] == "clip":
            scorer["options"].setdefault("laion", {})["source"] = "tiny"
    for model in args.get("video_models", []):
        if "motion_adapter" in model["options"]:  # animatediff: the adapter too
            model["options"]["motion_adapter"] = "tiny"
    for model in args["image_models"]:
        options = model["options"]
        if "controlnets" in options:
            options["controlnets"] = {kind: "tiny" for kind in options["controlnets"]}
            options["depth_estimator"] = "tiny"
        if model["family"] == "sdxl":
            model.update(default_width=256, default_height=256)
    # The profiles name a keys file that exists only on their servers; tests call from loopback,
    # which a service without keys answers (docs/security.md).
    args.get("auth", {}).pop("keys_file", None)
    by_deployment = {generator_name(model["id"]): model
                     for model in [*args["image_models"], *args.get("video_models", [])]}
    for name, options in deployments.items():
        if name in by_deployment:
            by_deployment[name]["deployment"] = {**by_deployment[name]["deployment"], **options}
        else:
            args["deployments"][name] = {**args["deployments"].get(name, {}), **options}
    return args


def image_model(args: dict, model_id: str) -> dict:
    """The `image_models` entry with id `model_id` in a dict of app args."""
    return next(model for model in args["image_models"] if model["id"] == model_id)


def model_entry(model_id: str = "flux-schnell", family: str = "flux", width: int = 256, height: int = 256,
                **entry) -> dict:
    """An `image_models` entry with tiny weights (defaults: dev's flux-schnell at 256x256)."""
    if model_id == "flux-schnell":
        entry = {"limits": {"max_steps": 4, "max_guidance": 0}, "default_steps": 4, **entry}
    return {"id": model_id, "family": family, "source": "tiny", "default_width": width, "default_height": height,
            **entry}


def model_spec(model_id: str = "flux-schnell", family: str = "flux", width: int = 256, height: int = 256,
               **entry):
    """The ModelSpec of an image model entry, as the builder makes it (defaults: dev's flux-schnell)."""
    from deployments.config import ImageModelConfig
    from serve_app.services.validation import ModelSpec

    return ModelSpec.of(ImageModelConfig(**model_entry(model_id, family, width, height, **entry)))


def app_settings(*image_models: dict, **args):
    """The services' Settings as the builder makes them, from app args: these `image_models` entries
    (default: one `model_entry()`) and any other AppArgs key; metrics off (no Ray in unit tests)."""
    from serve_app.config import AppArgs
    from serve_app.services.settings import Settings

    return Settings.from_args(AppArgs.model_validate(
        {"image_models": list(image_models) or [model_entry()], "metrics": False, **args}))


def deploy_and_wait(args: dict, timeout_s: float = 300) -> None:
    """Deploy genserve with `args` on the Ray this process is connected to, then wait for it.

    Unlike `serve.run`, which waits forever for replicas that never get their resources, this
    fails after `timeout_s` with genserve's report of what is pending and why.
    """
    from ray import serve

    from serve_app import APP_NAME
    from serve_app.builder import build_app
    from serve_app.cli.launch import wait_until_running

    serve.run_many([serve.RunTarget(build_app(args), name=APP_NAME, route_prefix="/")],
                   wait_for_applications_running=False)
    wait_until_running([APP_NAME], timeout_s)


def replica_gpu_ids(replica) -> list[str]:
    """The GPU ids Ray assigned to a Serve replica (a `ReplicaDetails`), asked of its process."""
    import ray

    actor = ray.get_actor(replica.actor_name, namespace="serve")
    return ray.get(actor.__ray_call__.remote(lambda _: [str(gpu) for gpu in ray.get_gpu_ids()]), timeout=60)


async def wait_until_async(condition: Callable, timeout_s: float, interval_s: float = 0.02, what: str = "condition"):
    """`wait_until` inside an event loop: polls `condition` (sync or async) between awaits."""
    import asyncio
    import inspect

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        await asyncio.sleep(interval_s)
    raise TimeoutError(f"{what} not met within {timeout_s}s")


def flat_scores(scores: dict, prefix: str = "") -> dict[str, float]:
    """One image's scores with nested groups flattened ('aspects.lighting'), for pytest.approx."""
    flat: dict[str, float] = {}
    for key, value in scores.items():
        if isinstance(value, dict):
            flat.update(flat_scores(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# The address of a client on this machine: apps without API keys answer only loopback clients, and
# Starlette's TestClient otherwise calls from "testclient".
LOOPBACK = ("127.0.0.1", 50000)


class ActorLoop:
    """An object living on its own event loop in a thread, as a Serve actor lives on its replica's
    loop: `handle.method.remote(...)` from any other loop runs the call there and awaits its result.
    Used where a test's app runs a fresh loop per request (Starlette's TestClient) but the target
    keeps tasks running between requests (the job dispatcher)."""

    def __init__(self, target):
        import asyncio
        import threading

        self.target = target
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="actor-loop", daemon=True)
        self._thread.start()

    def call(self, function: Callable, *args, **kwargs):
        """Run `function(*args, **kwargs)` (sync or async) on the actor's loop; block for its result."""
        import asyncio
        import inspect

        async def run():
            result = function(*args, **kwargs)
            return await result if inspect.isawaitable(result) else result

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result()

    def handle(self):
        import asyncio
        import inspect

        actor = self

        class Method:
            def __init__(self, name):
                self._name = name

            def remote(self, *args, **kwargs):
                async def run():
                    result = getattr(actor.target, self._name)(*args, **kwargs)
                    return await result if inspect.isawaitable(result) else result

                return asyncio.wrap_future(asyncio.run_coroutine_threadsafe(run(), actor.loop))

        class Handle:
            def __getattr__(self, name):
                return Method(name)

        return Handle()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
