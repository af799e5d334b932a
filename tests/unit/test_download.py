"""`genserve download`: the plan of each profile (offline), and the real download code against a
stand-in hub on loopback serving saved tiny models; then loading them offline from the cache."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from deployments.runtime.weights import select_files
from serve_app.config import AppArgs, app_args_from_config
from serve_app.weights import plan
from tests.hub_server import FakeHub

ROOT = Path(__file__).parents[2]


def _repos(profile: str) -> dict[str, tuple]:
    return {repo.source.source: (repo.source.layout, repo.source.variant, repo.optional)
            for repo in plan(app_args_from_config(ROOT / "configs" / profile))}


@pytest.mark.parametrize("profile", ["single-gpu.yaml", "multi-gpu.yaml"])
def test_each_gpu_profile_plans_every_hub_model_it_loads(profile):
    assert _repos(profile) == {
        "black-forest-labs/FLUX.1-schnell": ("diffusers-pipeline", None, False),
        "black-forest-labs/FLUX.1-dev": ("diffusers-pipeline", None, True),
        "stabilityai/stable-diffusion-xl-base-1.0": ("diffusers-pipeline", "fp16", False),
        "diffusers/controlnet-canny-sdxl-1.0": ("diffusers-model", "fp16", False),
        "diffusers/controlnet-depth-sdxl-1.0": ("diffusers-model", "fp16", False),
        "depth-anything/Depth-Anything-V2-Small-hf": ("transformers", None, False),
        "openai/clip-vit-large-patch14": ("transformers", None, False),
        "camenduru/improved-aesthetic-predictor": ("file", None, False),
        "xswu/HPSv2": ("file", None, False),
        "laion/CLIP-ViT-H-14-laion2B-s32B-b79K": ("processor", None, False),  # HPSv2.1's and PickScore's
        "yuvalkirstain/PickScore_v1": ("transformers", None, True),  # optional: no licence stated
        "Qwen/Qwen2.5-1.5B-Instruct": ("transformers", None, False),
        "stabilityai/stable-video-diffusion-img2vid-xt": ("diffusers-pipeline", "fp16", False),
        "Lightricks/LTX-Video": ("diffusers-pipeline", None, True),  # optional (enabled: false)
        "Wan-AI/Wan2.2-TI2V-5B-Diffusers": ("diffusers-pipeline", None, True),
        "Qwen/Qwen-Image": ("diffusers-pipeline", None, True),
        **({"Qwen/Qwen-Image-Edit-2509": ("diffusers-pipeline", None, True)} if profile == "single-gpu.yaml" else {}),
        "black-forest-labs/FLUX.2-klein-4B": ("diffusers-pipeline", None, True),
        "Tongyi-MAI/Z-Image-Turbo": ("diffusers-pipeline", None, True),
        **({"black-forest-labs/FLUX.2-klein-9B": ("diffusers-pipeline", None, True)} if profile == "single-gpu.yaml"
           else {}),
    }


def test_the_dev_profile_needs_nothing_from_the_hub():
    assert plan(app_args_from_config(ROOT / "configs" / "dev.yaml")) == []


def test_hub_loras_are_planned_and_a_repo_used_twice_is_fetched_once():
    args = AppArgs.model_validate({
        "image_models": [{"id": "a", "family": "sdxl", "source": "org/sdxl"},
                         {"id": "b", "family": "sdxl", "source": "org/sdxl", "enabled": False}],
        "scorer": {"source": "tiny"},
        "loras": {"hub": [{"name": "ink", "repo": "org/loras", "weight_name": "ink.safetensors", "family": "sdxl"}]},
    })
    repos = plan(args)
    assert [(r.source.source, r.roles, r.optional) for r in repos] == [
        ("org/sdxl", ("a pipeline", "b pipeline"), False),
        ("org/loras", ("LoRA ink",), False),
    ]
    assert repos[1].source.filename == "ink.safetensors"


def test_files_are_safetensors_of_the_variant_where_a_folder_has_it_and_only_named_components():
    files = [
        "model_index.json", "sd_xl_base_1.0.safetensors", "README.md",
        "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
        "unet/diffusion_pytorch_model.bin", "unet/diffusion_pytorch_model.onnx",
        "text_encoder/config.json", "text_encoder/model.safetensors",  # no fp16 here: the plain one
        "tokenizer/vocab.json", "tokenizer/merges.txt",
        "vae_1_0/diffusion_pytorch_model.safetensors",  # not a component of model_index.json
    ]
    chosen = select_files(files, "diffusers-pipeline", "fp16", ["unet", "text_encoder", "tokenizer"])
    assert chosen == ["model_index.json", "text_encoder/config.json", "text_encoder/model.safetensors",
                      "tokenizer/merges.txt", "tokenizer/vocab.json", "unet/config.json",
                      "unet/diffusion_pytorch_model.fp16.safetensors"]
    sharded = ["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
               "model.safetensors.index.json", "pytorch_model.bin", "tf_model.h5"]
    assert select_files(sharded, "transformers") == ["config.json", *sharded[1:4]]


def _save_tiny_repos(root: Path) -> dict[str, Path]:
    """Tiny SDXL (plain and fp16 files), a tiny canny ControlNet (plain and fp16), a LAION head."""
    import torch

    from deployments.families.sdxl import build_tiny_sdxl, build_tiny_sdxl_controlnet
    from deployments.tiny import save_tiny

    sdxl, controlnet, laion = root / "sdxl", root / "canny", root / "laion"
    pipeline = build_tiny_sdxl()
    pipeline.save_pretrained(sdxl)
    pipeline.to(torch.float16).save_pretrained(sdxl, variant="fp16")
    (sdxl / "single-file-checkpoint.safetensors").write_bytes(b"never fetched")
    net = build_tiny_sdxl_controlnet()
    net.save_pretrained(controlnet)
    net.to(torch.float16).save_pretrained(controlnet, variant="fp16")
    save_tiny("laion", laion)
    return {"org/tiny-sdxl": sdxl, "org/tiny-canny": controlnet, "org/laion-head": laion}


def _config(tmp_path: Path, laion_file: str, gated: bool) -> Path:
    args = {
        "image_models": [{"id": "sdxl", "family": "sdxl", "source": "org/tiny-sdxl",
                          "device": {"device": "cpu", "dtype": "float16"}, "default_width": 256, "default_height": 256,
                          "options": {"controlnets": {"canny": "org/tiny-canny"}}}],
        "scorer": {"source": "tiny", "laion": {"source": "org/laion-head", "filename": laion_file}},
    }
    if gated:
        args["image_models"].append({"id": "gated", "family": "sdxl", "source": "org/gated", "enabled": False})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"applications": [{"name": "genserve", "import_path": "serve_app.builder:build_app",
                                                      "args": args}]}))
    return path


def _run(args: list[str], env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    return subprocess.run(args, env={**clean, **env}, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_download_fetches_exactly_the_planned_files_then_loading_uses_them_offline(tmp_path):
    repos = _save_tiny_repos(tmp_path / "repos")
    laion_file = next(path.name for path in repos["org/laion-head"].iterdir())
    config = _config(tmp_path, laion_file, gated=True)
    cache = tmp_path / "cache"
    genserve = [sys.executable, "-m", "serve_app.cli", "download", str(config), "--dir", str(cache)]
    with FakeHub({**repos, "org/gated": repos["org/tiny-sdxl"]}, gated={"org/gated": "secret"}) as hub:
        env = {"HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HOME": str(tmp_path / "home")}
        dry = _run([*genserve, "--dry-run"], env)
        # Without a token, the gated (optional) repo is refused with what to do; the rest is planned.
        assert dry.returncode == 1, dry.stdout + dry.stderr
        assert "org/gated is gated and no token is set" in dry.stdout and "set HF_TOKEN" in dry.stdout
        assert "unet/diffusion_pytorch_model.fp16.safetensors" in dry.stdout
        assert "unet/diffusion_pytorch_model.safetensors" not in dry.stdout
        assert "single-file-checkpoint" not in dry.stdout
        assert "3 of 4 repos to fetch" in dry.stdout
        assert not cache.exists()

        done = _run(genserve, {**env, "HF_TOKEN": "secret"})
        assert done.returncode == 0, done.stdout + done.stderr
        assert "4 of 4 repos fetched" in done.stdout

    snapshots = {repo: next((cache / f"models--{repo.replace('/', '--')}" / "snapshots").iterdir())
                 for repo in ("org/tiny-sdxl", "org/tiny-canny", "org/laion-head")}
    fetched = sorted(str(p.relative_to(snapshots["org/tiny-sdxl"])) for p in snapshots["org/tiny-sdxl"].rglob("*")
                     if p.is_file())
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in fetched
    assert not [name for name in fetched if name.endswith(".safetensors") and ".fp16." not in name
                and not name.startswith(("tokenizer", "scheduler"))]
    assert "single-file-checkpoint.safetensors" not in fetched

    # Offline, from the cache just filled: the fp16 files load, and the model generates.
    script = (
        "from serve_app.config import app_args_from_config\n"
        "from deployments.runtime.loading import resolve_placement\n"
        "from deployments.runtime.weights import local_variant\n"
        f"args = app_args_from_config({str(config)!r})\n"
        "entry = args.image_models[0]\n"
        "print('variant', local_variant(entry.source, 'fp16'), local_variant('org/tiny-canny', 'fp16'))\n"
        "model = entry.model_family.load(entry, resolve_placement(entry.device))\n"
        "print('controls', model.control_types)\n"
    )
    loaded = _run([sys.executable, "-c", script], {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"})
    assert loaded.returncode == 0, loaded.stdout + loaded.stderr
    assert "variant fp16 fp16" in loaded.stdout and "controls ('canny',)" in loaded.stdout
