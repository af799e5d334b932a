"""The HTTP ingress: a FastAPI app served by Ray Serve, plus the Python handle API.

Routes (OpenAPI at /docs):
- POST /v1/images   generate, score and regenerate; JSON in, JSON with base64 PNGs out
- GET  /v1/models   the deployed models with their limits and defaults
- GET  /healthz     200 when every downstream deployment answers, 503 naming the one that did not

Python: `serve.get_app_handle("genserve").generate_images.remote(ImageRequest(...))`.
"""


import asyncio

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.exceptions import RayActorError

from serve_app.config import QualityPolicy
from serve_app.errors import explain_errors
from serve_app.graph import StageTimeout
from serve_app.models import ModelSpec, RequestError
from serve_app.schemas import ImageRequest, ImageResponse
from serve_app.service import ImageService

HEALTH_TIMEOUT_S = 5.0

api = FastAPI(
    title="genserve",
    description="Self-hosted image generation on Ray Serve: enhance, generate, score, regenerate.",
    version="0.1.0",
)


@api.exception_handler(RequestValidationError)
async def _validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
    detail = explain_errors(list(error.errors()), ImageRequest)
    return JSONResponse(status_code=422, content={"detail": jsonable_encoder(detail)})


@api.exception_handler(RequestError)
async def _request_error(_: Request, error: RequestError) -> JSONResponse:
    return JSONResponse(status_code=422, content={"detail": error.detail()})


@api.exception_handler(StageTimeout)
async def _stage_timeout(_: Request, error: StageTimeout) -> JSONResponse:
    return JSONResponse(status_code=504, content={"detail": str(error)})


@api.exception_handler(RayActorError)
async def _replica_lost(_: Request, error: RayActorError) -> JSONResponse:
    # A downstream replica died mid-request (its node or process went away). Serve replaces it
    # on its own, so this is a retryable 503, not a server bug; the request can be sent again
    # as it was (with its seed, it gives the same images).
    return JSONResponse(
        status_code=503,
        headers={"Retry-After": "5"},
        content={"detail": f"a replica serving this request was lost; retry. ({type(error).__name__})"},
    )


async def _info(handle) -> dict:
    return await handle.info.remote()


@serve.deployment(name="Ingress", max_ongoing_requests=64, ray_actor_options={"num_cpus": 0.25})
@serve.ingress(api)
class Ingress:
    def __init__(self, enhancer, generators: dict, scorer, specs: dict[str, ModelSpec], policy: QualityPolicy,
                 request_timeout_s: float = 600.0):
        self._service = ImageService(enhancer, generators, scorer, specs, policy, request_timeout_s)

    async def generate_images(self, request: ImageRequest | dict) -> ImageResponse:
        """The Python API: the same request model and response as POST /v1/images.

        Raises `pydantic.ValidationError` or `serve_app.models.RequestError` (a `ValueError`)
        for bad input, naming the field.
        """
        return await self._service.generate_images(request)

    @api.post("/v1/images", response_model=ImageResponse)
    async def post_images(self, request: ImageRequest) -> ImageResponse:
        return await self._service.generate_images(request)

    @api.get("/v1/models")
    async def get_models(self) -> dict:
        """Each model's limits and defaults, with where its replica loaded it from and on what."""
        service = self._service
        infos = await asyncio.gather(*(_info(service.generators[spec["id"]]) for spec in service.models()))
        models = [{**spec, "deployment": info} for spec, info in zip(service.models(), infos)]
        return {"models": models, "quality_policy": service.policy.model_dump()}

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        service = self._service
        downstream = {"enhancer": service.enhancer, "scorer": service.scorer}
        downstream.update({f"generator:{name}": handle for name, handle in service.generators.items()})
        results = await asyncio.gather(
            *(asyncio.wait_for(_info(handle), HEALTH_TIMEOUT_S) for handle in downstream.values()),
            return_exceptions=True,
        )
        report = {}
        for name, result in zip(downstream, results):
            if isinstance(result, BaseException):
                report[name] = {"ok": False, "error": f"{type(result).__name__}: {result}"[:300]}
            else:
                report[name] = {"ok": True, **result}
        healthy = all(entry["ok"] for entry in report.values())
        return JSONResponse(
            status_code=200 if healthy else 503,
            content={"status": "ok" if healthy else "unavailable", "deployments": report},
        )
