"""The typed application builder: `import_path: serve_app.builder:build_app` in a Serve config.

    applications:
      - name: genserve
        import_path: serve_app.builder:build_app
        args: {...}          # validated as serve_app.config.AppArgs
"""

from __future__ import annotations

from ray.serve import Application

from deployments.enhancer.prompt_enhancer import PromptEnhancer
from deployments.image_generator import ImageGenerator
from deployments.scoring.clip_scorer import ClipScorer
from deployments.video_generator import VideoGenerator
from serve_app.api.a2a.push import push_body
from serve_app.api.ingress import Ingress
from serve_app.config import AppArgs
from serve_app.jobs.runner import JobRunner
from serve_app.services.settings import Handles, Settings


def bind_handles(args: AppArgs) -> Handles:
    """The model deployments, bound: PromptEnhancer, one ImageGenerator per `image_models:` entry,
    ClipScorer, and one VideoGenerator per `video_models:` entry."""

    def bind(deployment, name: str, **options):
        return deployment.options(name=name, **args.options_for(name)).bind(
            args.model_config_for(name), metrics=args.metrics, **options)

    return Handles(
        enhancer=bind(PromptEnhancer, "PromptEnhancer"),
        generators={entry.id: bind(ImageGenerator, entry.deployment_name, lora_cache_size=args.loras.cache_size)
                    for entry in args.served_image_models},
        scorer=bind(ClipScorer, "ClipScorer"),
        video_generators={entry.id: bind(VideoGenerator, entry.deployment_name) for entry in args.served_video_models},
    )


def build_app(args: AppArgs) -> Application:
    """The model deployments behind the Ingress, and the JobRunner that runs async jobs through
    the same deployments; both get the same settings, made once here.

    Serve validates a config's `args:` into `AppArgs` (the annotation); a plain dict is accepted too.
    """
    if not isinstance(args, AppArgs):
        args = AppArgs.model_validate(args or {})
    settings = Settings.from_args(args)
    handles = bind_handles(args)
    # The runner renders A2A push notifications with the A2A adapter's code (it sits above the jobs).
    runner = JobRunner.options(**args.options_for("JobRunner")).bind(settings, handles, renderers={"a2a": push_body})
    return Ingress.options(**args.options_for("Ingress")).bind(settings, handles, jobs=runner)
