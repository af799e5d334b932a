"""The shared dev app, and test ordering so each shared app starts once per session.

`dev_app` is configs/dev.yaml plus what the modules sharing it need, all at once: the tiny models
of dev.yaml with video, a tiny SDXL-Turbo, FLUX.1-dev and a toy family named by import path (the
registry's proof that a family needs no product change), test LoRAs, and tight upload and body
limits that the bad-input tests probe. The shared Ray it runs on exports metrics to a known port and
runs the dashboard, which writes the Prometheus service-discovery file (tests/integration/test_metrics.py).
"""

import contextlib

import pytest

from serve_app.security.keys import new_webhook_secret
from tests.integration.apps import EARLY, POOL, ROOT, dev_args

# Uploads over this many pixels get 422 (the bad-input tests send 320x320 or 400x400).
SHARED_PIXEL_LIMIT = 300 * 300
SHARED_MAX_BODY = 1024 * 1024
# /v1/scores: uploads over 65536 pixels in all are scored as scaled copies; over 4 x 300x300, 422.
SHARED_SCORE_BUDGET = {"pixel_budget": 65536, "max_total_pixels": 4 * SHARED_PIXEL_LIMIT}
TINY_CPU = {"device": "cpu", "torch_threads": 1}
EXTRA_MODELS = [
    # Request batching on (tests/integration/test_batching_app.py): concurrent requests share a pipeline call.
    {"id": "sdxl-turbo", "family": "sdxl", "source": "tiny", "default_width": 256, "default_height": 256,
     "default_steps": 2, "limits": {"max_steps": 4, "max_guidance": 0}, "device": TINY_CPU,
     "batching": {"enabled": True, "max_batch_images": 4, "wait_ms": 100},
     "deployment": {"num_cpus": 0.1, "max_ongoing_requests": 4}},
    # FLUX.1-dev: the same family code as schnell; the family's 1-50 steps, 28 and guidance 3.5 by default.
    {"id": "flux-dev", "family": "flux", "source": "tiny", "default_width": 256, "default_height": 256,
     "options": {"max_sequence_length": 64}, "device": TINY_CPU, "deployment": {"num_cpus": 0.1},
     "warmup": {"default_shape": False}},
    {"id": "toy", "family": "tests.toy_family:FAMILY", "source": "tiny", "options": {"invert": True},
     "device": TINY_CPU, "deployment": {"num_cpus": 0.1}},
    # Slow steps and a queue of one (one running, one waiting): the fallback tests fill it on purpose.
    {"id": "slow", "family": "tests.slow_family:FAMILY", "source": "tiny", "options": {"step_delay_s": 0.5},
     "device": TINY_CPU, "deployment": {"num_cpus": 0.1, "max_ongoing_requests": 1, "max_queued_requests": 1,
                                             "retry_after_s": 2}},
    # FLUX.1-dev on a simulated H100 (docs/simulator.md; tests/integration/test_simulator_app.py): modelled
    # time, placeholder images marked simulated; eager, 28 steps at 1024x1024 take ~6.9 s (simulated). Its
    # modelled cold start (~6 s) is skipped: the shared app starts as fast as the suite needs.
    {"id": "sim-flux", "family": "flux", "source": "black-forest-labs/FLUX.1-dev", "options": {"max_sequence_length": 512},
     "default_width": 512, "default_height": 512, "device": {"device": "sim:h100-sxm", "simulated_cold_start": False},
     "warmup": {"default_shape": False}, "deployment": {"num_cpus": 0.05}},
]


def _dev_app(stack: contextlib.ExitStack, tmp_path_factory) -> tuple[dict, dict]:
    from tests.images_server import FakeImagesServer
    from tests.loras import make_flux_lora, make_sdxl_lora

    loras = tmp_path_factory.mktemp("loras")
    make_flux_lora(loras, "ink", seed=1)
    make_sdxl_lora(loras, "xl_style")
    (loras / "weights.bin").write_bytes(b"never loaded")
    data_dir = tmp_path_factory.mktemp("jobs")
    args = dev_args()
    args["image_models"] += EXTRA_MODELS
    args["max_input_pixels"] = SHARED_PIXEL_LIMIT
    args["max_body_bytes"] = SHARED_MAX_BODY
    args["scores"] = SHARED_SCORE_BUDGET
    args["loras"]["dir"] = str(loras)
    args["jobs"]["data_dir"] = str(data_dir)
    args["jobs"]["progress_interval_s"] = 0  # every denoising step, which the job tests follow
    # A killed JobRunner's lease lapses this soon, and its successor takes over (test_jobs_chaos).
    args["jobs"]["runner_lease_s"], args["jobs"]["redis_timeout_s"] = 6.0, 2.0
    # The hybrid fallback, to a stand-in remote images API on loopback (requests opt in per request).
    remote = stack.enter_context(FakeImagesServer())
    args["fallback"] = {"enabled": True, "base_url": remote.base_url, "model": "remote-standin", "api_key_env": None,
                        "response_format": "b64_json"}
    # Two video jobs at once (the default adds up both video models' capacities, 4): the cancel test
    # fills the default video model's replica and needs the third job to wait in the job queue.
    args["jobs"]["max_concurrent_jobs"] = {"video": 2}
    # Webhooks and A2A pushes to test receivers on loopback, signed with a secret from a file.
    secret_file = data_dir / "webhook-secret"
    secret_file.write_text(new_webhook_secret())
    args["jobs"]["webhooks"] = {"allow_http": True, "allowed_hosts": ["127.0.0.1"], "first_retry_s": 0.5,
                                "poll_interval_s": 0.2, "secret_file": str(secret_file)}
    return args, {"data_dir": data_dir, "args": args, "remote": remote}


@pytest.fixture(scope="module")
def dev_app(tmp_path_factory) -> dict:
    """The shared dev app: {client, data_dir, args, remote: the fallback's stand-in, ray_dir: Ray's
    temp dir, metrics_port: where Ray exports metrics}. Deployed while the unit tests run
    (`pytest_collection_finish`), or on first use; kept for the next module. Module-scoped, so
    module fixtures (Prometheus scraping it) can use it too."""
    return POOL.get("dev", lambda stack: _dev_app(stack, tmp_path_factory))


def _keys_app(stack: contextlib.ExitStack, tmp_path_factory) -> tuple[dict, dict]:
    """The dev profile, trimmed to one tiny image model, behind API keys: two Ingress replicas
    sharing rate-limit counters in a throwaway Redis (tests/integration/test_keys_app.py)."""
    import yaml

    from serve_app.security.keys import key_entry_yaml, new_key
    from tests.redis_server import RedisServer

    folder = tmp_path_factory.mktemp("keys")
    redis = RedisServer(folder).start()
    stack.callback(redis.stop)
    keys, entries = {}, []
    for name, scopes, extra in KEYS_APP_KEYS:
        key_id, key = new_key()
        entries.append({**key_entry_yaml(key_id, name, key, scopes), **extra})
        keys[name] = {"id": key_id, "key": key, "headers": {"Authorization": f"Bearer {key}"}}
    keys_file = folder / "keys.yaml"
    keys_file.write_text(yaml.safe_dump({"url_signing_secret": "0123456789abcdef" * 4, "keys": entries}))
    args = dev_args()
    args["image_models"] = [entry for entry in args["image_models"] if entry["id"] == "flux-schnell"]
    args["video_models"] = []
    args["jobs"]["data_dir"] = str(tmp_path_factory.mktemp("keys-jobs"))
    args["auth"] = {"keys_file": str(keys_file), "limits_storage": redis.url}
    args["deployments"]["Ingress"] = {"num_replicas": 2, "num_cpus": 0.1}
    return args, {"keys": keys, "keys_file": keys_file, "args": args}


# (name, scopes, extra entry fields) of the keys_app's keys.
KEYS_APP_KEYS = (
    ("alice", ["generate", "read"], {}),
    ("bob", ["generate", "read"], {}),
    ("admin", ["admin"], {}),
    ("reader", ["read"], {}),
    ("expired", ["generate", "read"], {"expires_at": "2020-01-01T00:00:00Z"}),
    ("revoked", ["generate", "read"], {"revoked": True}),
    ("rpm", ["read"], {"limits": {"requests_per_minute": 4}}),
    ("burst", ["read"], {"limits": {"requests_per_minute": 4}}),
    ("quota", ["generate", "read"], {"limits": {"active_jobs": 1}}),
    ("budget", ["generate", "read"], {"limits": {"daily_images": 2}}),
)


@pytest.fixture
def keys_app(tmp_path_factory) -> dict:
    """The shared keys app: {client, keys: name -> {id, key, headers}, keys_file, args}."""
    return POOL.get("keys", lambda stack: _keys_app(stack, tmp_path_factory))


def _folders_app(stack: contextlib.ExitStack, tmp_path_factory) -> tuple[dict, dict]:
    """Images only (no video models), with FLUX, the scorer and the LLM enhancer loaded from saved
    folders (the path a hub id or a folder takes) and a blocklist: test_http_app.py and
    test_enhancer_app.py. The tiny LLM's gibberish falls back to the template on every request."""
    from deployments.tiny import save_tiny
    from tests.helpers import image_model

    models = tmp_path_factory.mktemp("models")
    args = dev_args()
    args["video_models"] = []
    flux = image_model(args, "flux-schnell")
    flux["source"] = str(save_tiny("flux", models / "flux"))
    clip = args["scorers"][0]
    clip["source"] = str(save_tiny("clip", models / "clip"))
    clip["options"]["laion"]["source"] = str(save_tiny("laion", models / "laion") / "laion-head.safetensors")
    args["enhancer"]["mode"] = "llm"
    args["enhancer"]["llm"]["source"] = str(save_tiny("llm", models / "llm"))
    args["enhancer"]["blocklist"] = ["gore", "nude figure"]
    return args, {"sources": (flux["source"], clip["source"])}


@pytest.fixture(scope="module")
def folders_app(tmp_path_factory) -> dict:
    """The shared app of models loaded from folders: {client, sources: (FLUX's folder, the scorer's)}."""
    return POOL.get("folders", lambda stack: _folders_app(stack, tmp_path_factory))


def _single_gpu_app(stack: contextlib.ExitStack) -> tuple[dict, dict]:
    """configs/single-gpu.yaml with tiny models, on the shared Ray's one logical GPU
    (tests/integration/test_single_gpu.py)."""
    from tests.helpers import tiny_args

    args = tiny_args(ROOT / "configs" / "single-gpu.yaml")
    return args, {"args": args}


@pytest.fixture(scope="module")
def single_gpu_app() -> dict:
    """The shared single-GPU profile app: {client, base, args}."""
    return POOL.get("single-gpu", _single_gpu_app)


def pytest_collection_finish(session):
    """The dev app deploys now, while the unit tests (ordered first) run on one of the two cores:
    its 17 replica processes are minutes of CPU in imports alone (`AppPool.prestart`). So do the
    subprocesses that modules start early (`STARTS_EARLY`, `Early`)."""
    if session.config.option.collectonly:
        return
    # The tmp_path_factory fixture's own factory (pytest's tmpdir plugin sets it at configure).
    factory = session.config._tmp_path_factory
    if any("dev_app" in item.fixturenames for item in session.items):
        POOL.prestart("dev", lambda stack: _dev_app(stack, factory))
    for module in {item.module: None for item in session.items if hasattr(item, "module")}:
        for name, launch in getattr(module, "STARTS_EARLY", {}).items():
            EARLY.start(name, launch, factory.mktemp(name))


_BACKGROUND_STARTED = []


def pytest_runtest_setup(item):
    """Once the shared apps' tests begin (their waits leave a core idle about half the time), the
    subprocesses that modules start in the background (`STARTS_IN_BACKGROUND`, name -> launch, as
    `STARTS_EARLY`'s): later than the early starts, whose Rays start beside the unit tests and the
    keeper; niced once their Ray runs. A module whose selected tests include long ones starts none
    (the long runs build what they need in the pytest process)."""
    if _BACKGROUND_STARTED or _rank(item) < (1, 0):
        return
    _BACKGROUND_STARTED.append(True)
    factory = item.session.config._tmp_path_factory
    modules: dict = {}
    for each in item.session.items:
        modules.setdefault(getattr(each, "module", None), []).append(each)
    for module, items in modules.items():
        if any(each.get_closest_marker("long") for each in items):
            continue
        for name, launch in getattr(module, "STARTS_IN_BACKGROUND", {}).items():
            EARLY.start(name, launch, factory.mktemp(name))


def pytest_sessionfinish(session):
    EARLY.stop()
    POOL.stop()


def pytest_collection_modifyitems(items):
    """Unit tests first, then the modules that start subprocesses early (`STARTS_EARLY`), then every
    test of each shared app (dev, keys, folders, single-gpu), then modules that start their own Ray.
    On the dev app, a module may ask for its turn with `DEV_APP_TURN`: "first" (test_metrics counts
    what the app recorded since it started), or "last" (test_jobs_restart replaces the app)."""
    items.sort(key=_rank)  # stable: the order within each group stays as collected


def _rank(item) -> tuple[int, int]:
    """Where `item` runs (`pytest_collection_modifyitems`): (0, 0) unit tests, (0, 1) modules that
    start early, (1, turn) the dev app's, (2, n) the other shared apps', (3, 0) modules with a Ray
    of their own."""
    if "integration" not in item.nodeid.split("::")[0]:
        return 0, 0
    if getattr(item.module, "STARTS_EARLY", None):
        return 0, 1
    if "dev_app" in item.fixturenames:
        return 1, {"first": 0, None: 1, "last": 2}[getattr(item.module, "DEV_APP_TURN", None)]
    if "keys_app" in item.fixturenames:
        return 2, 0
    for turn, app in enumerate(("folders_app", "single_gpu_app"), start=1):
        if app in item.fixturenames:
            return 2, turn
    return 3, 0
