"""POST /v1/videos: image-to-video or text-to-video with any video model (`model`); JSON or the file itself."""

import json

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from serve_app.api.deps import services
from serve_app.api.responses import BODY, OVERLOAD, errors
from serve_app.protocol.schemas import VideoRequest, VideoResponse
from serve_app.security.guard import charge_images
from serve_app.services.facade import Services

router = APIRouter(tags=["videos"])


@router.post(
    "/v1/videos",
    response_model=VideoResponse,
    responses={200: {"content": {"video/mp4": {}, "image/gif": {}, "image/webp": {}}}, **errors(*BODY, 501, *OVERLOAD, 504)},
)
async def post_videos(request: VideoRequest, http: Request, service: Services = Depends(services)):
    if service.videos is not None:
        await charge_images(http, service.videos.frames(request))
    response, output = await service.generate_video(request)
    if request.response_format == "json":
        return response
    metadata = response.model_dump(exclude={"b64_video", "keyframe"})
    if response.keyframe is not None:
        metadata["keyframe"] = response.keyframe.model_dump(exclude={"attempts"})
    return Response(
        content=output.data,
        media_type=output.content_type,
        headers={"X-Genserve-Metadata": json.dumps(metadata, separators=(",", ":"))},
    )
