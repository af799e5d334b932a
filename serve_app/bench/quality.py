"""What the quality gate costs, and the starting calibration a profile ships.

- `genserve bench-quality --candidates 2 4 8`: best-of-N (one request, N images in one generator
  call) against N sequential rounds (one request whose threshold nothing reaches, one image a round).
- `genserve bench-quality --gate`: a gated request (quality_percentile, regenerating up to
  max_attempts) against an ungated one at the same settings: latency, rounds, device seconds per
  accepted image.
- `genserve calibrate`: each image model of a config scores images of random prompts; the score
  histograms are written as the file `policy.calibration` names.

All run the services in process over the config's deployment classes (`local_image_service`),
requests one at a time, so the figures are latencies of the models and the graph, not of Serve.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass, field

from deployments.names import SCORE_RANGES
from serve_app.bench.images import local_image_service
from serve_app.config import app_args_from_config
from serve_app.services.quality import BINS, MemoryQualityBook, bins_of

PROMPT = "a lighthouse on a cliff at dusk"

# Random prompts for a calibration: a subject, a setting and a look, drawn with a seeded RNG.
SUBJECTS = ("a fox", "a lighthouse", "an old sailor", "a red bicycle", "a bowl of fruit", "a city street",
            "a mountain lake", "a robot", "a cat on a windowsill", "a castle", "a forest path", "a teapot")
SETTINGS = ("at dusk", "in the snow", "under neon lights", "at noon", "in the rain", "on a beach",
            "in a library", "in fog", "at sunrise", "in a desert")
LOOKS = ("oil painting", "photograph", "watercolor", "3d render", "pencil sketch", "cinematic still")


def random_prompts(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"{rng.choice(SUBJECTS)} {rng.choice(SETTINGS)}, {rng.choice(LOOKS)}" for _ in range(count)]


@dataclass
class Run:
    """One way of asking, measured `requests` times."""

    name: str
    seconds: list[float] = field(default_factory=list)
    rounds: list[int] = field(default_factory=list)
    images: list[int] = field(default_factory=list)  # generated per request
    accepted: list[int] = field(default_factory=list)
    device_seconds: list[float] = field(default_factory=list)

    @property
    def p50(self) -> float:
        return statistics.median(self.seconds)

    def per_accepted(self, values: list[float]) -> float | None:
        return sum(values) / sum(self.accepted) if sum(self.accepted) else None


async def _measure(service, runs: list[tuple[Run, list[dict]]], requests: int, warmup: int) -> None:
    """Each run's `bodies`, sent one after another, count as one request (N rounds past
    max_attempts' 5). The runs take turns request by request, so load from elsewhere on the
    machine hits them alike."""
    for index in range(warmup + requests):
        for run, bodies in runs:
            await _once(service, run, bodies, 1000 + 97 * index, record=index >= warmup)


async def _once(service, run: Run, bodies: list[dict], seed: int, record: bool) -> None:
    from serve_app.protocol.schemas import ImageRequest

    started = time.perf_counter()
    results = [(await service.run(ImageRequest(**{**body, "seed": seed + 13 * part})))[3]
               for part, body in enumerate(bodies)]
    if record:
        run.seconds.append(time.perf_counter() - started)
        run.rounds.append(sum(max(c.attempt for c in result.candidates) for result in results))
        run.images.append(sum(len(result.candidates) for result in results))
        run.accepted.append(sum(c.passed for result in results for c in result.chosen))
        run.device_seconds.append(sum(result.device_seconds for result in results))


def _rounds(body: dict, count: int) -> list[dict]:
    """Requests making `count` rounds in all (max_attempts is at most 5)."""
    return [{**body, "max_attempts": min(5, count - start)} for start in range(0, count, 5)]


def run_candidates_benchmark(config: str, counts: list[int], requests: int, warmup: int,
                             steps: int | None = None) -> list[tuple[int, Run, Run]]:
    """Per N: best-of-N in one batch, and N sequential one-image rounds, at the same settings."""
    args = app_args_from_config(config)
    service = local_image_service(args)
    metric = service.policy.metric
    unreachable = SCORE_RANGES[metric][1]  # nothing scores above the top of the range: every round runs
    body = {"prompt": PROMPT, "enhance": False, "quality_metric": metric}
    if steps is not None:
        body["num_inference_steps"] = steps

    async def go():
        results = [(count, Run(f"best-of-{count}"), Run(f"{count} rounds")) for count in counts]
        runs = []
        for count, batch, rounds in results:
            runs += [(batch, [{**body, "candidates": count, "quality_threshold": 0.0}]),
                     (rounds, _rounds({**body, "quality_threshold": unreachable}, count))]
        await _measure(service, runs, requests, warmup)
        return results

    return asyncio.run(go())


def format_candidates_table(results: list[tuple[int, Run, Run]]) -> str:
    lines = [f"{'N':>3}{'best-of-N p50 ms':>18}{'N rounds p50 ms':>17}{'batch / rounds':>16}"
             f"{'device s/img batch':>20}{'device s/img rounds':>21}"]
    for count, batch, rounds in results:
        per_image = [sum(run.device_seconds) / sum(run.images) for run in (batch, rounds)]
        lines.append(f"{count:>3}{batch.p50 * 1000:>18.1f}{rounds.p50 * 1000:>17.1f}{batch.p50 / rounds.p50:>16.3f}"
                     f"{per_image[0]:>20.4f}{per_image[1]:>21.4f}")
    return "\n".join(lines)


def run_gate_benchmark(config: str, percentile: float, max_attempts: int, requests: int, warmup: int,
                       calibration_prompts: int = 40) -> list[Run]:
    """An ungated request (threshold 0: one round) and the same request gated at `percentile`.
    The calibration comes from the config's file when it has one for the model, else from
    `calibration_prompts` images made first."""
    args = app_args_from_config(config)
    service = local_image_service(args)
    model = service.default_model
    body = {"prompt": PROMPT, "enhance": False}

    async def go():
        metric = service.policy.metric
        if not service.quality.starting.get(model, {}).get(metric):
            await calibrate_model(service, model, calibration_prompts)
        ungated, gated = Run("ungated"), Run(f"gated p{percentile:g}, {max_attempts} attempts")
        await _measure(service, [(ungated, [{**body, "quality_threshold": 0.0}]),
                                 (gated, [{**body, "quality_percentile": percentile, "max_attempts": max_attempts}])],
                       requests, warmup)
        return [ungated, gated]

    return asyncio.run(go())


def format_gate_table(runs: list[Run]) -> str:
    baseline = runs[0]
    lines = [f"{'request':<28}{'n':>4}{'p50 ms':>9}{'mean ms':>9}{'x ungated':>11}{'rounds':>8}"
             f"{'accepted':>10}{'device s/accepted':>19}"]
    for run in runs:
        mean = statistics.fmean(run.seconds)
        device = run.per_accepted(run.device_seconds)
        lines.append(f"{run.name:<28}{len(run.seconds):>4}{run.p50 * 1000:>9.1f}{mean * 1000:>9.1f}"
                     f"{mean / statistics.fmean(baseline.seconds):>11.3f}{statistics.fmean(run.rounds):>8.2f}"
                     f"{sum(run.accepted) / len(run.seconds):>10.2f}"
                     f"{'-' if device is None else f'{device:.4f}':>19}")
    return "\n".join(lines)


async def calibrate_model(service, model: str, prompts: int, seed: int = 0) -> None:
    """Score one image of each of `prompts` random prompts on `model`, ungated, into `service.quality`."""
    from serve_app.protocol.schemas import ImageRequest

    for index, prompt in enumerate(random_prompts(prompts, seed)):
        await service.run(ImageRequest(prompt=prompt, model=model, seed=seed * 100_003 + index, quality_threshold=0.0,
                                       max_attempts=1))
    await service.quality.drain()


def run_calibration(config: str, prompts: int, seed: int = 0) -> dict:
    """The calibration file's contents: per image model of `config`, the score histogram of every
    gate metric over `prompts` random prompts (the config's default settings, the enhancer on)."""
    args = app_args_from_config(config)
    models = [entry.id for entry in args.served_image_models]
    service = local_image_service(args, models)
    service.quality = MemoryQualityBook()  # from nothing: the config's own calibration is what is being made

    async def go():
        for model in models:
            await calibrate_model(service, model, prompts, seed)
        return await service.quality.tallies()

    tallies = asyncio.run(go())
    calibrated: dict[str, dict[str, dict[str, float]]] = {}
    for (model, metric), tally in sorted(tallies.items()):
        calibrated.setdefault(model, {})[metric] = {str(index): count for index, count in sorted(bins_of(tally).items())}
    return {"bins": BINS, "prompts": prompts, "seed": seed, "config": config, "models": calibrated}


def write_calibration(data: dict, path: str) -> None:
    with open(path, "w") as file:
        json.dump(data, file, indent=1, sort_keys=True)
        file.write("\n")
