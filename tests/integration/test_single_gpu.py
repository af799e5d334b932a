"""configs/single-gpu.yaml on one node with one logical GPU: every deployment fits on the card.

Ray is told the node has one GPU; torch sees none, so the models (tiny) run on the CPU while Ray
schedules them exactly as it would on a one-GPU machine.
"""

import httpx
import pytest

from serve_app import APP_NAME
from serve_app.config import DEPLOYMENT_NAMES, AppArgs
from tests.helpers import replica_gpu_ids

pytestmark = pytest.mark.integration


@pytest.fixture
def one_gpu_node(single_gpu_app) -> dict:
    """The profile on the shared Ray: one node with one logical GPU and 9 logical CPUs (the
    config's CPU reservations add up to 8.5; the cores are shared anyway)."""
    return single_gpu_app


def test_every_deployment_fits_on_one_gpu_node_and_the_models_share_its_gpu(one_gpu_node):
    import ray

    from serve_app.cli.launch import serve_details

    deployments = serve_details().applications[APP_NAME].deployments
    args = AppArgs.model_validate(one_gpu_node["args"])
    options = args.all_deployment_options()
    expected = [*DEPLOYMENT_NAMES, *(entry.deployment_name for entry in args.served_image_models),
                *(entry.deployment_name for entry in args.served_video_models)]
    assert sorted(deployments) == sorted(expected)
    replicas = {name: deployments[name].replicas for name in expected}
    assert {name: [r.state.value for r in found] for name, found in replicas.items()} == {
        name: ["RUNNING"] for name in expected
    }
    [node] = {r.node_id for found in replicas.values() for r in found}
    assert node == ray.get_runtime_context().get_node_id()
    # FLUX, CLIP, SVD, SDXL and the enhancer's LLM hold fractions of the same (only) GPU.
    for name in ("FluxSchnellGenerator", "ClipScorer", "SvdXtGenerator", "SdxlGenerator", "PromptEnhancer"):
        [replica] = replicas[name]
        assert replica_gpu_ids(replica) == ["0"]
        assert deployments[name].required_resources["GPU"] == options[name].num_gpus


def test_it_answers_on_the_cpu_because_torch_sees_no_gpu(one_gpu_node):
    base = one_gpu_node["base"]
    response = httpx.post(f"{base}/v1/images", json={"prompt": "a red fox", "width": 256, "height": 256, "seed": 9},
                          timeout=120)
    assert response.status_code == 200, response.text
    # The profile enhances with an LLM (tiny here: gibberish, so the template answered, saying why).
    assert response.json()["enhancer"] == "template" and response.json()["enhancer_fallback"]
    models = {model["id"]: model for model in httpx.get(f"{base}/v1/models", timeout=30).json()["models"]}
    assert set(models) == {"flux-schnell", "sdxl"}
    flux = models["flux-schnell"]
    # The builder set a memory cap from the GPU share, but a cap is only applied on CUDA.
    assert flux["deployment"]["device"] == "cpu" and flux["deployment"]["memory_fraction"] is None
