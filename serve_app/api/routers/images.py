"""POST /v1/images (generate, score, regenerate) and POST /v1/prompts/enhance (the enhance step alone)."""

from fastapi import APIRouter, Depends, Request

from serve_app.api.app import Services, services
from serve_app.api.schemas import EnhanceRequest, EnhanceResponse, ImageRequest, ImageResponse
from serve_app.security.guard import charge_images

router = APIRouter(tags=["images"])
BLOCKED = {400: {"description": "The prompt contains a blocklisted term."}}


@router.post("/v1/images", response_model=ImageResponse, responses=BLOCKED)
async def post_images(request: ImageRequest, http: Request, service: Services = Depends(services)) -> ImageResponse:
    await charge_images(http, request.num_images)
    return await service.generate_images(request)


@router.post("/v1/prompts/enhance", response_model=EnhanceResponse, responses=BLOCKED)
async def post_enhance(request: EnhanceRequest, service: Services = Depends(services)) -> EnhanceResponse:
    """The enhance step alone, as `POST /v1/images` would run it for `model`: the prompt the model
    would see, which enhancer made it (and why the template answered, if the LLM was asked), and
    advice on the prompt as written. Nothing is generated."""
    return await service.images.enhance_prompt(request)
