"""The `genserve` command.

    genserve serve [CONFIG] [--timeout S] [--address ADDR] [--detach]
                                     deploy CONFIG (default configs/dev.yaml) and wait until it runs
    genserve bench [options]         graph overhead: Serve over HTTP vs the same calls in process
    genserve bench --concurrency 1 8 64   throughput and p50/p95 under concurrent clients, batching off and on
    genserve bench-gpu [options]     FLUX.1-schnell / SDXL architectures with random weights: eager, compiled, fp8
    genserve bench-jobs [options]    async job overhead: POST /v1/jobs vs the same POST /v1/images
    genserve bench-scores [options]  scoring cost of a batch of images against one image
    genserve save-tiny FAMILY DIR    write a tiny random model (flux | clip | svd | llm | laion | sdxl |
                                     sdxl-controlnet | depth) as a local folder
"""

from __future__ import annotations

import argparse
import os
import sys
import time

DEFAULT_START_TIMEOUT_S = 900.0

from deployments.tiny import tiny_kinds


def _serve(args: argparse.Namespace) -> int:
    import ray
    from ray import serve
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    from serve_app.config import load_serve_config
    from serve_app.builder import build_app
    from serve_app.cli.launch import DeployError, deploy_config, wait_until_running

    # Validate with Serve's schema and the typed args first, so a bad config fails here with the
    # field named, before any Ray process starts.
    raw = load_serve_config(args.config)
    try:
        config = ServeDeploySchema.model_validate(raw)
        for application in raw.get("applications", []):
            if application.get("import_path") == "serve_app.builder:build_app":
                build_app(application.get("args") or {})
    except ValidationError as error:
        print(f"genserve: {args.config} is not a valid config: {error}", file=sys.stderr)
        return 2
    names = [application.name for application in config.applications]

    # Like `serve run`: join the cluster at --address (or $RAY_ADDRESS), else start a local one.
    ray.init(address=args.address, namespace="serve")
    try:
        deploy_config(config)
        print(f"genserve: deploying {args.config}; waiting up to {args.timeout:g}s for {', '.join(names)}", flush=True)
        wait_until_running(names, args.timeout)
    except DeployError as error:
        print(f"genserve: {error}", file=sys.stderr, flush=True)
        # Leave nothing pending behind. Not blocking: a replica that never got its resources
        # still has a shutdown grace period to run out, and the controller can do that alone.
        for name in names:
            serve.delete(name, _blocking=False)
        return 1
    except KeyboardInterrupt:
        serve.shutdown()
        return 130
    http = config.http_options
    for application in config.applications:
        if application.route_prefix is not None:
            print(f"genserve: {application.name} is running at http://{http.host}:{http.port}{application.route_prefix}",
                  flush=True)
    if args.detach:
        return 0
    print("genserve: Ctrl-C stops it", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
    return 0


def _bench(args: argparse.Namespace) -> int:
    if args.concurrency:
        return _bench_concurrency(args)
    from serve_app.bench.images import format_table, run_benchmark

    samples = run_benchmark(args.config, args.requests, args.warmup, args.width, args.height, args.steps,
                            compare_metrics=args.compare_metrics, compare_enhancer=args.compare_enhancer)
    print(f"genserve bench: {args.config}, {args.width}x{args.height}, {args.steps} steps, "
          f"{args.requests} sequential requests after {args.warmup} warm-up")
    print(format_table(samples))
    return 0


def _bench_concurrency(args: argparse.Namespace) -> int:
    from serve_app.bench.concurrency import format_concurrency_table, run_concurrency_benchmark

    def progress(level) -> None:
        print(f"  {level.mode}, {level.clients} clients: {level.throughput:.2f} img/s, {level.failures} failed",
              flush=True)

    levels = run_concurrency_benchmark(args.config, args.concurrency, args.requests, args.warmup, args.width,
                                       args.height, args.steps, args.max_batch_images, args.batch_wait_ms, progress)
    print(f"genserve bench --concurrency: {args.config}, {args.width}x{args.height}, {args.steps} steps, "
          f"max({args.requests}, 2 x clients) requests per level after {args.warmup} warm-up; batching off, then on")
    print(format_concurrency_table(levels))
    return 0


def _bench_gpu(args: argparse.Namespace) -> int:
    from serve_app.bench.gpu import format_gpu_table, run_gpu_benchmark

    device, cases = run_gpu_benchmark(args.repeats, args.cpu_compile, args.model, args.steps)
    print(format_gpu_table(device, cases))
    return 0


def _bench_jobs(args: argparse.Namespace) -> int:
    from serve_app.bench.jobs import format_jobs_table, run_jobs_benchmark

    samples, overheads = run_jobs_benchmark(args.config, args.requests, args.warmup, args.width, args.height,
                                            args.steps)
    print(f"genserve bench-jobs: {args.config}, {args.width}x{args.height}, {args.steps} steps, "
          f"{args.requests} rounds (sync, then the same as a job) after {args.warmup} warm-up")
    print(format_jobs_table(samples, overheads))
    return 0


def _bench_scores(args: argparse.Namespace) -> int:
    from serve_app.bench.scores import format_score_table, run_score_benchmark

    batches = sorted({1, *args.batch})
    paths, setup = run_score_benchmark(args.config, batches, args.requests, args.warmup, args.width, args.height,
                                       serve=args.serve)
    print(f"genserve bench-scores: {args.config}, scorer {setup['scorer']} on {setup['device']} ({setup['dtype']}), "
          f"LAION head {setup['laion']}, {setup['width']}x{setup['height']} images, {args.requests} calls per "
          f"batch size after {args.warmup} warm-up")
    print(format_score_table(paths))
    return 0


def _save_tiny(args: argparse.Namespace) -> int:
    from deployments.tiny import save_tiny

    print(save_tiny(args.family, args.folder))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="genserve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="deploy a Serve config and wait until it runs")
    serve.add_argument("config", nargs="?", default="configs/dev.yaml")
    serve.add_argument("--timeout", type=float, default=DEFAULT_START_TIMEOUT_S,
                       help="seconds to wait for every replica to run before giving up with the reason "
                            "(default %(default)g; the first start of real weights includes their download)")
    serve.add_argument("--address", default=None,
                       help="Ray cluster to join ('auto' for the local node's); default $RAY_ADDRESS, "
                            "else a new local Ray")
    serve.add_argument("--detach", action="store_true",
                       help="exit 0 once running and leave the application deployed (needs --address)")
    serve.set_defaults(func=_serve)

    bench = commands.add_parser("bench", help="graph overhead over in-process calls")
    bench_jobs = commands.add_parser("bench-jobs", help="async job overhead over the same sync request")
    for parser_, func in ((bench, _bench), (bench_jobs, _bench_jobs)):
        parser_.add_argument("--config", default="configs/dev.yaml")
        parser_.add_argument("--requests", type=int, default=30)
        parser_.add_argument("--warmup", type=int, default=3)
        parser_.add_argument("--width", type=int, default=256)
        parser_.add_argument("--height", type=int, default=256)
        parser_.add_argument("--steps", type=int, default=4)
        parser_.set_defaults(func=func)
    bench.add_argument("--compare-metrics", action="store_true",
                       help="also run through Serve with the config's metrics setting flipped")
    bench.add_argument("--concurrency", type=int, nargs="+", default=None, metavar="CLIENTS",
                       help="throughput and p50/p95 at these client counts, batching off and on (e.g. 1 8 64)")
    bench.add_argument("--max-batch-images", type=int, default=8, help="with --concurrency: the batch cap")
    bench.add_argument("--batch-wait-ms", type=float, default=20.0, help="with --concurrency: the batch wait")
    bench.add_argument("--compare-enhancer", action="store_true",
                       help="also run with the other enhancer mode (template <-> the config's llm)")

    gpu = commands.add_parser("bench-gpu", help="FLUX.1-schnell and SDXL architectures, random weights, in process")
    gpu.add_argument("--repeats", type=int, default=3, help="timed calls per case after the first")
    gpu.add_argument("--model", nargs="+", choices=["flux-schnell", "sdxl"], default=None, help="default: both")
    gpu.add_argument("--steps", type=int, default=None, help="default: the published ones (schnell 4, SDXL 30)")
    gpu.add_argument("--cpu-compile", action="store_true", help="on a CPU, also run the compiled tiers (slow)")
    gpu.set_defaults(func=_bench_gpu)

    scores = commands.add_parser("bench-scores", help="scoring cost of a batch of images against one")
    scores.add_argument("--config", default="configs/dev.yaml")
    scores.add_argument("--batch", type=int, nargs="+", default=[8], help="batch sizes besides 1 (default 8)")
    scores.add_argument("--requests", type=int, default=30)
    scores.add_argument("--warmup", type=int, default=3)
    scores.add_argument("--width", type=int, default=None, help="default: the config's flux.default_width")
    scores.add_argument("--height", type=int, default=None, help="default: the config's flux.default_height")
    scores.add_argument("--serve", action="store_true",
                        help="also as a Serve replica with the config's resources, called through a handle")
    scores.set_defaults(func=_bench_scores)

    tiny = commands.add_parser("save-tiny", help="write a tiny random-weight model folder")
    tiny.add_argument("family", choices=tiny_kinds())
    tiny.add_argument("folder")
    tiny.set_defaults(func=_save_tiny)

    args = parser.parse_args(argv)
    if args.command == "serve" and args.detach and not (args.address or os.environ.get("RAY_ADDRESS")):
        parser.error("--detach needs --address: a Ray started by this command would stop with it")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
