"""A finished sync response, turned into a job's result: files named by position, JSON without base64.

File names depend only on the request (image-0.png ..., image-0.webp with output_format webp,
video.mp4), so a re-run of the same job writes the same names: a store keyed by job id and name then
holds one result, never two.
"""

from __future__ import annotations

from deployments.runtime.types import VideoOutput
from serve_app.jobs.model import ResultFile
from serve_app.protocol.schemas import ImageResponse, VideoResponse

Files = list[tuple[ResultFile, bytes]]


def image_result(job_id: str, response: ImageResponse) -> tuple[dict, Files]:
    files: Files = []
    images = []
    for index, image in enumerate(response.images):
        name = f"image-{index}.{image.output_format}"
        data = image.image_bytes()
        files.append((ResultFile(name, image.media_type, len(data)), data))
        images.append({**image.model_dump(mode="json", exclude={"b64_png", "b64_image"}), "file": name})
    result = {**response.model_dump(mode="json", exclude={"images"}), "id": job_id, "images": images}
    return result, files


def video_result(job_id: str, response: VideoResponse, output: VideoOutput) -> tuple[dict, Files]:
    name = f"video.{response.output_format}"
    files: Files = [(ResultFile(name, output.content_type, len(output.data)), output.data)]
    result = {**response.model_dump(mode="json", exclude={"b64_video"}), "id": job_id, "file": name}
    return result, files


def with_urls(kind: str, result: dict, file_url) -> dict:
    """The stored result with `url` next to each `file`, `file_url(name)` making the URL."""
    result = dict(result)
    if kind == "image":
        result["images"] = [{**image, "url": file_url(image["file"])} for image in result["images"]]
    else:
        result["url"] = file_url(result["file"])
    return result
