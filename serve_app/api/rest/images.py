"""POST /v1/images (generate, score, regenerate) and POST /v1/prompts/enhance (the enhance step alone)."""

from fastapi import APIRouter, Depends, Request

from serve_app.api.deps import services
from serve_app.api.responses import BODY, OVERLOAD, errors
from serve_app.protocol.schemas import EnhanceRequest, EnhanceResponse, ImageRequest, ImageResponse
from serve_app.security.guard import charge_images
from serve_app.services.facade import Services

router = APIRouter(tags=["images"])
GENERATE_ERRORS = errors(*BODY, *OVERLOAD, 504)


@router.post("/v1/images", response_model=ImageResponse, responses=GENERATE_ERRORS)
async def post_images(request: ImageRequest, http: Request, service: Services = Depends(services)) -> ImageResponse:
    await charge_images(http, request.num_images)
    if any(not isinstance(reference, str) for reference in request.reference_images):
        request = await service.jobs_api().with_references(request, http)  # earlier jobs' images, the caller's own
    if service.jobs is None or request.fallback:  # no job queue; or a peak may send it to the remote fallback
        return await service.generate_images(request)
    # In the same fair order as jobs (docs/jobs.md#sync-and-async-share-a-model): not ahead of everyone's jobs.
    return await service.jobs.in_turn(http, lambda: service.generate_images(request))


@router.post("/v1/prompts/enhance", response_model=EnhanceResponse, responses=GENERATE_ERRORS)
async def post_enhance(request: EnhanceRequest, service: Services = Depends(services)) -> EnhanceResponse:
    """The enhance step alone, as `POST /v1/images` would run it for `model`: the prompt the model
    would see, which enhancer made it (and why the template answered, if the LLM was asked), and
    advice on the prompt as written. Nothing is generated."""
    return await service.images.enhance_prompt(request)
