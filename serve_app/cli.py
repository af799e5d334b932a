"""The `genserve` command.

    genserve serve [CONFIG]          serve run CONFIG (default configs/dev.yaml)
    genserve bench [options]         graph overhead: Serve over HTTP vs the same calls in process
    genserve bench-jobs [options]    async job overhead: POST /v1/jobs vs the same POST /v1/images
    genserve save-tiny FAMILY DIR    write a tiny random model (flux | clip | svd) as a local folder
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

from deployments.tiny import TINY_FAMILIES


def _serve(args: argparse.Namespace) -> int:
    from serve_app.appconfig import load_serve_config
    from serve_app.builder import build_app

    # Validate the typed args first, so a bad config fails here with the field named.
    config = load_serve_config(args.config)
    for application in config.get("applications", []):
        if application.get("import_path") == "serve_app.builder:build_app":
            build_app(application.get("args") or {})
    serve_bin = shutil.which("serve")
    if serve_bin is None:
        print("the `serve` command (from ray[serve]) is not on PATH", file=sys.stderr)
        return 2
    os.execv(serve_bin, [serve_bin, "run", args.config])
    return 0


def _bench(args: argparse.Namespace) -> int:
    from serve_app.bench import format_table, run_benchmark

    samples = run_benchmark(args.config, args.requests, args.warmup, args.width, args.height, args.steps)
    print(f"genserve bench: {args.config}, {args.width}x{args.height}, {args.steps} steps, "
          f"{args.requests} sequential requests after {args.warmup} warm-up")
    print(format_table(samples))
    return 0


def _bench_jobs(args: argparse.Namespace) -> int:
    from serve_app.bench_jobs import format_jobs_table, run_jobs_benchmark

    samples, overheads = run_jobs_benchmark(args.config, args.requests, args.warmup, args.width, args.height,
                                            args.steps)
    print(f"genserve bench-jobs: {args.config}, {args.width}x{args.height}, {args.steps} steps, "
          f"{args.requests} rounds (sync, then the same as a job) after {args.warmup} warm-up")
    print(format_jobs_table(samples, overheads))
    return 0


def _save_tiny(args: argparse.Namespace) -> int:
    from deployments.tiny import save_tiny

    print(save_tiny(args.family, args.folder))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="genserve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the service (serve run CONFIG)")
    serve.add_argument("config", nargs="?", default="configs/dev.yaml")
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

    tiny = commands.add_parser("save-tiny", help="write a tiny random-weight model folder")
    tiny.add_argument("family", choices=TINY_FAMILIES)
    tiny.add_argument("folder")
    tiny.set_defaults(func=_save_tiny)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
