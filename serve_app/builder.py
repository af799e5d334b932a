"""The typed application builder: `import_path: serve_app.builder:build_app` in a Serve config.

    applications:
      - name: genserve
        import_path: serve_app.builder:build_app
        args: {...}          # validated as serve_app.config.AppArgs
"""

from __future__ import annotations

from ray.serve import Application

from deployments.clip_scorer import ClipScorer
from deployments.flux import FluxGenerator
from deployments.prompt_enhancer import PromptEnhancer
from deployments.svd import SvdGenerator
from serve_app.config import AppArgs
from serve_app.ingress import Ingress
from serve_app.models import ModelSpec, flux_schnell_spec
from serve_app.video import VideoDefaults


def model_specs(args: AppArgs) -> dict[str, ModelSpec]:
    flux = args.flux
    spec = flux_schnell_spec(flux.default_width, flux.default_height, flux.default_steps)
    return {spec.id: spec}


def build_app(args: AppArgs) -> Application:
    """Wire PromptEnhancer -> FluxGenerator -> ClipScorer (and SvdGenerator, if configured) behind the Ingress.

    Serve validates a config's `args:` into `AppArgs` (the annotation); a plain dict is accepted too.
    """
    if not isinstance(args, AppArgs):
        args = AppArgs.model_validate(args or {})
    enhancer = PromptEnhancer.options(**args.options_for("PromptEnhancer")).bind(args.enhancer)
    flux = FluxGenerator.options(**args.options_for("FluxGenerator")).bind(
        args.model_config_for("FluxGenerator"), metrics=args.metrics
    )
    scorer = ClipScorer.options(**args.options_for("ClipScorer")).bind(
        args.model_config_for("ClipScorer"), metrics=args.metrics
    )
    video = {}
    if args.svd is not None:
        video["svd"] = SvdGenerator.options(**args.options_for("SvdGenerator")).bind(
            args.model_config_for("SvdGenerator"), metrics=args.metrics
        )
        video["video_defaults"] = VideoDefaults(
            source=args.svd.source, width=args.svd.default_width, height=args.svd.default_height,
            num_inference_steps=args.svd.default_steps,
        )
    return Ingress.options(**args.options_for("Ingress")).bind(
        enhancer=enhancer,
        generators={"flux-schnell": flux},
        scorer=scorer,
        specs=model_specs(args),
        policy=args.policy,
        request_timeout_s=args.request_timeout_s,
        max_input_pixels=args.max_input_pixels,
        metrics=args.metrics,
        **video,
    )
