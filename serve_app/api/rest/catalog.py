"""What can be asked for: GET /v1/models, /v1/loras, /v1/controls, and POST /v1/controls/preview."""

import asyncio
import json

from fastapi import APIRouter, Depends
from fastapi.responses import Response

from serve_app.api.deps import services
from serve_app.api.openai.protocol import openai_model
from serve_app.api.responses import BODY, OVERLOAD, errors
from serve_app.protocol.schemas import ControlPreviewRequest, ControlPreviewResponse
from serve_app.services.facade import Services

router = APIRouter(tags=["catalog"])


async def _info(handle) -> dict:
    return await handle.info.remote()


@router.get("/v1/models", responses=errors(*OVERLOAD, 504))
async def get_models(service: Services = Depends(services)) -> dict:
    """Each model's limits and defaults, with where its replica loaded it from and on what, and its
    quality gate's figures by metric (as GET /v1/admin/quality; null when they cannot be read now);
    `data` lists the image models in OpenAI's shape (`client.models.list()`)."""
    images = service.images
    infos = await asyncio.gather(*(_info(images.generators[spec["id"]]) for spec in images.models()))
    quality = await images.quality_figures()
    models = [{**spec, "deployment": info, "quality": quality.get(spec["id"], {}) if quality is not None else None}
              for spec, info in zip(images.models(), infos)]
    videos, default_video = [], None
    if service.videos is not None:
        specs = list(service.videos.specs.values())
        video_infos = await asyncio.gather(*(_info(service.videos.generators[spec.id]) for spec in specs))
        videos = [{**spec.public(), "deployment": info} for spec, info in zip(specs, video_infos)]
        default_video = service.videos.default_model
    # `object` and `data`: OpenAI's list shape beside genserve's keys, so OpenAI clients list them too.
    return {"object": "list", "data": [openai_model(model["id"]) for model in models],
            "models": models, "default_model": images.default_model, "video_models": videos,
            "default_video_model": default_video, "quality_policy": images.policy.model_dump(),
            "scores": service.scores.gate_ranges(), "scorers": list(service.scores.scorers)}


@router.get("/v1/loras", responses=errors())
async def get_loras(service: Services = Depends(services)) -> dict:
    """LoRA adapters a request may name in `loras`, each with its model family and the deployed
    models that take it; `families` groups the names by family."""
    # A rescan (when the directory changed) reads safetensors headers: off the event loop.
    return await asyncio.to_thread(service.images.loras_available)


@router.get("/v1/controls", responses=errors())
async def get_controls(service: Services = Depends(services)) -> dict:
    """ControlNet control types (as the A1111 extension's module list): each one's parameters
    with defaults and ranges, and the deployed models that take it."""
    return {"controls": service.images.controls()}


@router.post("/v1/controls/preview", response_model=ControlPreviewResponse,
             responses={200: {"content": {"image/png": {}}}, **errors(*BODY, *OVERLOAD, 504)})
async def post_control_preview(request: ControlPreviewRequest, service: Services = Depends(services)):
    """The control map alone (the A1111 extension's /controlnet/detect): what the model would follow."""
    response, png = await service.images.preview_control(request)
    if request.response_format == "json":
        return response
    metadata = response.model_dump(exclude={"b64_png"})
    return Response(content=png, media_type="image/png",
                    headers={"X-Genserve-Metadata": json.dumps(metadata, separators=(",", ":"))})
