"""`genserve doctor` and the loud device check: what a GPU box's first user reads when it is not ready."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from deployments.config import DeviceOptions
from deployments.runtime import loading
from serve_app.doctor import Machine, run_doctor

ROOT = Path(__file__).parents[2]
H200 = ("NVIDIA H200", 143771 * 1024**2)  # what nvidia-smi reports for an H200 (141 GB)
L4 = ("NVIDIA L4", 23034 * 1024**2)  # an L4 (24 GB) as nvidia-smi reports it


def _doctor(profile: str, machine: Machine | None = None) -> tuple[int, list[str]]:
    out = io.StringIO()
    status = run_doctor(str(ROOT / "configs" / profile), machine, out=out)
    return status, out.getvalue().splitlines()


def test_on_this_cpu_machine_the_gpu_profile_is_not_ready_and_each_line_says_why():
    status, lines = _doctor("single-gpu.yaml")
    assert status == 1
    assert any(line.startswith("FIX   torch sees no CUDA device, but 5 deployments reserve GPU shares") for line in lines)
    assert any(line.startswith("FIX   black-forest-labs/FLUX.1-schnell is not in the Hugging Face cache: run "
                               "`genserve download ") for line in lines)
    # The gated, optional FLUX.1-dev is not deployed, so its absence is only information.
    assert any(line.startswith("info  black-forest-labs/FLUX.1-dev is not in the Hugging Face cache") for line in lines)
    assert lines[-1].startswith("genserve doctor: ") and "to fix" in lines[-1]


def test_the_dev_profile_is_ready_without_a_gpu():
    status, lines = _doctor("dev.yaml")
    assert status == 0, lines
    assert "ok    this config reserves no GPU" in lines and lines[-1] == "genserve doctor: ready to serve"


def test_on_an_h200_each_share_is_shown_in_gib_and_cuda_contexts_have_room():
    machine = Machine("2.13.0+cu130", "13.0", [H200], driver="580.65.06")
    _, lines = _doctor("single-gpu.yaml", machine)
    assert "ok    torch 2.13.0+cu130, built for CUDA 13.0" in lines and "ok    NVIDIA driver 580.65.06" in lines
    assert "ok    FluxSchnellGenerator: 0.45 of the card = 63.2 GiB" in lines
    [room] = [line for line in lines if "outside every share" in line]
    assert room.startswith("ok    ") and "for 5 processes' CUDA contexts" in room


def test_on_an_l4_node_of_the_cluster_profile_only_the_l4_deployments_are_checked():
    machine = Machine("2.13.0+cu130", "13.0", [L4], driver="580.65.06")
    _, lines = _doctor("multi-gpu.yaml", machine)
    [elsewhere] = [line for line in lines if line.startswith("info  not for this node's GPUs")]
    assert "FluxSchnellGenerator" in elsewhere and "SvdXtGenerator" in elsewhere
    assert any(line.startswith("ok    SdxlGenerator: ") for line in lines)
    [room] = [line for line in lines if "outside every share" in line]
    assert room.startswith("ok    "), room


def test_a_replica_given_a_gpu_share_that_sees_no_cuda_fails_naming_it_the_share_and_the_cause(monkeypatch):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.setattr(loading, "_ray_gpu_share", lambda: 0.45)
    monkeypatch.setattr(loading, "_replica_deployment", lambda: "FluxSchnellGenerator")
    with pytest.raises(loading.NoCudaDevice) as raised:
        loading.resolve_placement(DeviceOptions(device="cuda"))
    message = str(raised.value)
    assert message.startswith("FluxSchnellGenerator: device 'cuda', and it was given 0.45 of a GPU by Ray, "
                              "but torch sees no CUDA device")
    assert f"torch.version.cuda={torch.version.cuda}" in message and "torch.cuda.device_count()=0" in message
    assert "Likely cause: this torch is a CPU-only build" in message


def test_device_auto_with_a_gpu_share_runs_on_the_cpu_but_warns(monkeypatch, caplog):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.setattr(loading, "_ray_gpu_share", lambda: 0.2)
    monkeypatch.setattr(loading, "_replica_deployment", lambda: "SdxlGenerator")
    placement = loading.resolve_placement(DeviceOptions())
    assert placement.device == "cpu"
    assert "SdxlGenerator: device 'cuda', and it was given 0.2 of a GPU" in caplog.text


def test_likely_cause_names_a_missing_share_or_driver(monkeypatch):
    import torch

    monkeypatch.setattr(torch.version, "cuda", "13.0")
    assert "reserves no GPU (num_gpus unset or 0)" in loading.no_cuda_message("ClipScorer", None)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert "older than CUDA 13.0 needs, or the GPU is not mounted" in loading.no_cuda_message("ClipScorer", 0.05)


# Card memory as nvidia-smi reports it, by the gpu_capacity key each profile uses ('any': the
# single-GPU profile's H200).
CARD_MIB = {"any": 143771, "H200": 143771, "H100": 81559, "L4": 23034}


@pytest.mark.parametrize("profile", ["single-gpu.yaml", "multi-gpu.yaml"])
def test_no_profile_fills_a_card_every_process_keeps_room_for_its_cuda_context(profile):
    from serve_app.config import app_args_from_config
    from serve_app.doctor import CUDA_CONTEXT_GIB, headroom_gib, packed_cards

    cards = packed_cards(app_args_from_config(ROOT / "configs" / profile))
    for kind in {kind for kind, _ in cards}:
        worst = headroom_gib([card for card in cards if card[0] == kind], CARD_MIB[kind] * 1024**2)
        if worst is not None:  # cards holding fractional shares
            left, processes = worst
            assert left >= processes * CUDA_CONTEXT_GIB, (kind, left, processes)


def test_noise_is_drawn_on_the_cpu_whatever_the_device_and_the_png_says_so():
    import torch
    from diffusers.utils.torch_utils import randn_tensor

    from deployments.runtime.loading import seeded_generators
    from serve_app.services.media import a1111_parameters

    [generator] = seeded_generators([1234])
    assert generator.device.type == "cpu"
    noise = randn_tensor((1, 4, 8, 8), generator=generator, device=torch.device("cpu"))
    assert torch.equal(noise, torch.randn((1, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(1234)))
    meta = {"prompt": "a fox", "seed": 1234, "generator": "cpu", "steps": 4, "guidance_scale": 0.0,
            "width": 64, "height": 64, "model": "flux-schnell"}
    assert a1111_parameters(meta).endswith("Model: flux-schnell, RNG: CPU")
