"""POST /v1/scores: score uploaded images against a prompt, with no generation."""

from fastapi import APIRouter, Depends

from serve_app.api.deps import services
from serve_app.api.responses import BODY, OVERLOAD, errors
from serve_app.protocol.schemas import ScoreRequest, ScoreResponse
from serve_app.services.facade import Services

router = APIRouter(tags=["scores"])


@router.post("/v1/scores", response_model=ScoreResponse, responses=errors(*BODY, *OVERLOAD, 504))
async def post_scores(request: ScoreRequest, service: Services = Depends(services)) -> ScoreResponse:
    """Score 1-16 uploaded images against a prompt in one batch: every score per image, which
    pass the quality gate, and the best one."""
    return await service.scores.score(request)
