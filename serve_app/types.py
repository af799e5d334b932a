"""The request and response types of genserve's HTTP and handle APIs: their one stable home.

Import them from here, whatever the layout inside moves to:

    from serve_app.types import ImageRequest
    handle.generate_images.remote(ImageRequest(prompt="a lighthouse at dusk", seed=42))

They are defined in `serve_app.protocol`; the older paths `serve_app.api.schemas`,
`serve_app.jobs.schemas` and `serve_app.schemas` still work, with a DeprecationWarning.
"""

from serve_app.protocol.errors import RequestError
from serve_app.protocol.jobs import (
    ImageJobResult,
    JobList,
    JobProgress,
    JobState,
    JobStatus,
    JobSubmission,
    VideoJobResult,
)
from serve_app.protocol.schemas import (
    Attempt,
    ControlOptions,
    ControlPreviewRequest,
    ControlPreviewResponse,
    EnhanceRequest,
    EnhanceResponse,
    GeneratedImage,
    HiresOptions,
    ImageRequest,
    ImageResponse,
    JobImageRef,
    KeyframeOptions,
    Lora,
    ScoredImage,
    ScoreRequest,
    ScoreResponse,
    Scores,
    VideoRequest,
    VideoResponse,
)

__all__ = [
    "Attempt", "ControlOptions", "ControlPreviewRequest", "ControlPreviewResponse", "EnhanceRequest",
    "EnhanceResponse", "GeneratedImage", "HiresOptions", "ImageJobResult", "ImageRequest", "ImageResponse",
    "JobImageRef", "JobList", "JobProgress", "JobState", "JobStatus", "JobSubmission", "KeyframeOptions", "Lora",
    "RequestError",
    "ScoreRequest", "ScoreResponse", "ScoredImage", "Scores", "VideoJobResult", "VideoRequest", "VideoResponse",
]
