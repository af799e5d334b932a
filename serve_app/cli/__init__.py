"""The `genserve` command.

    genserve serve [CONFIG] [--timeout S] [--address ADDR] [--detach] [--strict]
                                     deploy CONFIG (default configs/dev.yaml) and wait until it runs
    genserve bench [options]         graph overhead: Serve over HTTP vs the same calls in process
    genserve bench --concurrency 1 8 64 [--storm 64] [--json]
                                     throughput, p50/p95, device utilization, overhead, CPU per image and
                                     rejections under concurrent clients and a storm, batching off and on
    genserve bench --replicas 1 2 4 8 16 [--model ID] [--ingress-replicas K] [--json]
                                     throughput on N logical GPUs, one replica each; CPU per image by Ray
                                     process role; ends with `scaling: N replicas Rx one`
    genserve bench-jobs [options]    async job overhead: POST /v1/jobs vs the same POST /v1/images
    genserve bench-agents [options]  OpenAI route, MCP tools, A2A vs the same POST /v1/images
    genserve bench-gpu [options]     FLUX.1-schnell / SDXL architectures with random weights: eager, compiled, fp8
    genserve bench-scores [options]  scoring cost of a batch of images against one image
    genserve bench-quality [--candidates 2 4 8] [--gate]
                                     best-of-N in one batch vs N rounds; a gated request vs an ungated one
    genserve calibrate [CONFIG] -o FILE [--prompts N]
                                     score random prompts on each image model: a starting calibration
                                     for quality_percentile (policy.calibration)
    genserve keys create NAME [--scopes generate read admin] [--file KEYS.yaml] [limits]
                                     make an API key: prints it once, and the entry for the keys file
    genserve download CONFIG [--dry-run] [--dir DIR] [--skip-optional]
                                     fetch exactly the hub weights CONFIG names, for offline serving
    genserve doctor CONFIG [--gpu-memory-gib N]
                                     check this machine before serving CONFIG (torch, CUDA, GPU memory,
                                     the memory plan on its card and which shipped profiles fit it,
                                     weights, ports): each line ok, or what to do
    genserve bench-overload [options]  C clients for D seconds against a running app: statuses, latency, memory
    genserve bench-costs [--config CONFIG] [--clients 16 --seconds 15 --jobs 20]
                                     per-component costs for docs/scaling.md: the proxy's requests per core
                                     (GET /livez), Redis commands, CPU and bytes per image job
    genserve bench-fairness [--config CONFIG] [--a-jobs 500 --b-interval 2 --backlog 300]
                                     two keys through the fair job queue: B's wait behind A's backlog, throughput,
                                     GPU-time shares at weights 3:1
    genserve bench-autoscale [--config CONFIG] [--model ID] [--phases 1:30 32:150 1:150] [autoscaling flags]
                                     a step load on an autoscaled model pool: replicas, throughput and p95 each
                                     second, time to scale up and down, a plot (docs/images/autoscaling.png)
    genserve save-tiny FAMILY DIR    write a tiny random model (flux | sdxl | sd15 | svd | ltx | animatediff | clip | llm |
                                     laion | sdxl-controlnet | depth) as a local folder

Against a running service (--url or $GENSERVE_URL; docs/client.md has the exit codes):
    genserve generate PROMPT -o out.png [--model --seed --size WxH --steps --n --json]
    genserve animate [IMAGE] -o out.mp4 [--model --prompt --frames --fps --seed --steps --motion --interpolate --json]
    genserve jobs list | show ID | wait ID [-o DIR] | cancel ID
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

from deployments.tiny import tiny_kinds

DEFAULT_START_TIMEOUT_S = 900.0


def _serve(args: argparse.Namespace) -> int:
    import ray
    from pydantic import ValidationError
    from ray import serve
    from ray.serve.schema import ServeDeploySchema

    from serve_app.builder import build_app
    from serve_app.cli.launch import DeployError, deploy_config, shutdown_gracefully, wait_until_running
    from serve_app.config import load_serve_config

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
    refusal = unprotected_bind(raw)
    if refusal:
        print(f"genserve: {args.config}: {refusal}", file=sys.stderr)
        return 2
    for problem in loose_keys_files(raw):
        print(f"genserve: {args.config}: {'refusing to start: ' if args.strict else 'warning: '}{problem}",
              file=sys.stderr)
        if args.strict:
            return 2
    names = [application.name for application in config.applications]

    # Like `serve run`: join the cluster at --address (or $RAY_ADDRESS), else start a local one.
    ray.init(address=args.address, namespace="serve")
    # SIGTERM (systemd, docker stop, a pod's end) stops like Ctrl-C: serve.shutdown() lets every
    # replica finish its requests within its graceful_shutdown_timeout_s and the JobRunner put its
    # running jobs back in the queue, instead of the process dying under them. Set after ray.init,
    # whose own handler for it aborts the process (SIGABRT, exit 134).
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        deploy_config(config)
        print(f"genserve: deploying {args.config}; waiting up to {args.timeout:g}s for {', '.join(names)}", flush=True)
        wait_until_running(names, args.timeout, config.http_options.host, config.http_options.port,
                           [application.route_prefix for application in config.applications if application.route_prefix])
    except DeployError as error:
        print(f"genserve: {error}", file=sys.stderr, flush=True)
        # Leave nothing pending behind. Not blocking: a replica that never got its resources
        # still has a shutdown grace period to run out, and the controller can do that alone.
        for name in names:
            serve.delete(name, _blocking=False)
        return 1
    except KeyboardInterrupt:
        shutdown_gracefully(config, names)
        return 130
    http = config.http_options
    for application in config.applications:
        if application.route_prefix is not None:
            print(f"genserve: {application.name} is running at http://{http.host}:{http.port}{application.route_prefix}",
                  flush=True)
    if args.detach:
        return 0
    print("genserve: Ctrl-C (or SIGTERM) stops it, letting requests and jobs in flight settle; twice: at once",
          flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("genserve: stopping: replicas finish what they hold (graceful_shutdown_timeout_s)", flush=True)
        try:
            shutdown_gracefully(config, names)
        except KeyboardInterrupt:
            serve.shutdown()
    return 0


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def binds_loopback(host: str) -> bool:
    """Whether binding `host` accepts connections from this machine only. A name ("localhost", or
    one /etc/hosts maps anywhere) is resolved first: it is loopback only when every address it
    resolves to is; one that does not resolve is not vouched for."""
    import ipaddress
    import socket

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        found = socket.getaddrinfo(host, None)
    except (OSError, UnicodeError):
        return False
    addresses = {info[4][0].split("%")[0] for info in found}
    return bool(addresses) and all(ipaddress.ip_address(address).is_loopback for address in addresses)


def unprotected_bind(raw: dict) -> str | None:
    """Why a config must not start: it binds a non-loopback address and an application, whatever
    its import_path, has no keys (and does not say allow_unauthenticated). None when it may start."""
    host = str(((raw.get("http_options") or {}).get("host")) or "127.0.0.1")
    if binds_loopback(host):
        return None
    for application in raw.get("applications", []):
        auth = (application.get("args") or {}).get("auth") or {}
        if auth.get("keys_file"):
            from serve_app.security.keys import KeyRing

            try:
                KeyRing(auth["keys_file"])
            except (OSError, ValueError) as error:
                return str(error)
        elif not auth.get("allow_unauthenticated"):
            return (f"http_options.host {host} accepts connections from other machines, but application "
                    f"{application.get('name')!r} has no API keys. Create one with `genserve keys create NAME "
                    "--file keys.yaml` and set auth.keys_file (docs/security.md), bind 127.0.0.1, or set "
                    "auth.allow_unauthenticated: true on a network you trust.")
    return None


def loose_keys_files(raw: dict) -> list[str]:
    """What is wrong with the permissions of each keys file the config names (readable or
    writable by group or others), for `genserve serve` to warn about or, with --strict, refuse."""
    from serve_app.security.keys import check_keys_file_mode

    problems = []
    for application in raw.get("applications", []):
        keys_file = ((application.get("args") or {}).get("auth") or {}).get("keys_file")
        if keys_file and os.path.exists(keys_file):
            problem = check_keys_file_mode(keys_file)
            if problem:
                problems.append(problem)
    return problems


def _keys_create(args: argparse.Namespace) -> int:
    import yaml

    from serve_app.security.keys import (
        add_to_keys_file,
        check_keys_file_mode,
        key_entry_yaml,
        new_key,
        new_webhook_secret,
    )

    key_id, key = new_key()
    webhook_secret = new_webhook_secret()
    limits = {name: value for name, value in (("requests_per_minute", args.requests_per_minute),
                                              ("concurrent_requests", args.concurrent_requests),
                                              ("active_jobs", args.active_jobs),
                                              ("queued_jobs", args.queued_jobs),
                                              ("daily_images", args.daily_images)) if value is not None}
    entry = key_entry_yaml(key_id, args.name, key, args.scopes, limits, args.expires_at, webhook_secret)
    print(f"API key for {args.name} (id {key_id}); shown once, store it now:\n\n    {key}\n")
    print(f"Its webhook signing secret (verify this key's webhooks with it; kept in the keys file):\n\n"
          f"    {webhook_secret}\n")
    if args.file:
        loose = check_keys_file_mode(args.file) if os.path.exists(args.file) else None
        add_to_keys_file(args.file, entry)
        print(f"added to {args.file}; the app re-reads it within a second or two")
        if loose:  # the file is rewritten mode 600, but what it held may have been read already
            print(f"genserve: warning: {loose}; it is mode 600 now. Its url_signing_secret may have been read: "
                  "replace it (this invalidates the file URLs signed so far)", file=sys.stderr)
    else:
        print("add this entry under `keys:` in the keys file:\n")
        print(yaml.safe_dump([entry], sort_keys=False))
    return 0


def _bench(args: argparse.Namespace) -> int:
    if args.replicas:
        return _bench_replicas(args)
    if args.concurrency:
        return _bench_concurrency(args)
    if args.auth_overhead:
        from serve_app.bench.auth import format_auth_table, run_auth_benchmark

        samples = run_auth_benchmark(args.config, args.requests, args.warmup, args.limits_storage)
        print(f"genserve bench --auth-overhead: {args.config}, job status reads, {args.requests} sequential "
              f"after {args.warmup} warm-up, the app served without keys and then with them")
        print(format_auth_table(samples))
        return 0
    from serve_app.bench.images import format_table, run_benchmark

    samples = run_benchmark(args.config, args.requests, args.warmup, args.width, args.height, args.steps,
                            compare_metrics=args.compare_metrics, compare_enhancer=args.compare_enhancer)
    print(f"genserve bench: {args.config}, {args.width}x{args.height}, {args.steps} steps, "
          f"{args.requests} sequential requests after {args.warmup} warm-up")
    print(format_table(samples))
    return 0


def _bench_concurrency(args: argparse.Namespace) -> int:
    from serve_app.bench.concurrency import (
        format_concurrency_table,
        level_json,
        run_concurrency_benchmark,
        with_batching,
    )
    from serve_app.config import app_args_from_config

    def progress(level) -> None:
        if args.json:  # one object per level, as it finishes, and nothing else on stdout
            print(json.dumps(level_json(level)), flush=True)
            return
        print(f"  {level.mode}, {level.clients} clients{' (storm)' if level.storm else ''}: "
              f"{level.throughput:.2f} img/s, {level.failures} failed, {level.rejections} rejections", flush=True)

    config = app_args_from_config(args.config)
    modes = [("batching off", with_batching(config, False, args.max_batch_images, args.batch_wait_ms)),
             (f"batching on ({args.max_batch_images} images, {args.batch_wait_ms:g} ms)",
              with_batching(config, True, args.max_batch_images, args.batch_wait_ms))]
    modes = {"off": modes[:1], "on": modes[1:], "both": modes}[args.batching]
    levels = run_concurrency_benchmark(modes, args.concurrency, args.requests, args.warmup, args.width, args.height,
                                       args.steps, progress, storm=args.storm)
    if args.json:
        return 0
    batching = {"off": "off", "on": "on", "both": "off, then on"}[args.batching]
    print(f"genserve bench --concurrency: {args.config}, {args.width}x{args.height}, {args.steps} steps, "
          f"max({args.requests}, 2 x clients) requests per level after {args.warmup} warm-up; batching "
          f"{batching} (the default model and the scorer)"
          + (f"; then a storm of {args.storm} clients retrying at once" if args.storm else ""))
    print(format_concurrency_table(levels))
    return 0


def _bench_replicas(args: argparse.Namespace) -> int:
    from serve_app.bench.replicas import (
        format_replica_table,
        format_role_table,
        run_json,
        run_replica_benchmark,
        scaling_line,
    )
    from serve_app.config import app_args_from_config

    config = app_args_from_config(args.config)
    model = args.model or config.default_model_id
    counts = sorted(set(args.replicas))
    first: list[float] = []

    def progress(run) -> None:
        first.append(first[0] if first else run.level.throughput)
        if args.json:  # one object per N, as it finishes, and nothing else on stdout
            print(json.dumps(run_json(run, first[0])), flush=True)
            return
        print(f"  {run.replicas} GPUs: {run.level.throughput:.3f} img/s, {run.level.failures} failed", flush=True)

    runs = run_replica_benchmark(config, model, counts, args.requests_per_replica, args.clients_per_replica,
                                 args.ingress_replicas, args.max_ongoing, progress)
    if not args.json:
        simulated = config.image_model(model).device.simulated
        print(f"genserve bench --replicas: {args.config}, model {model} at its default size and steps, "
              f"{args.clients_per_replica:g} x N clients, {args.requests_per_replica} x N requests after N warm-up, "
              f"N logical GPUs on one node" + (f" (simulated {simulated}: device times are simulated)" if simulated
                                                 else ""))
        print(format_replica_table(runs))
        print(format_role_table(runs))
    print(scaling_line(runs))
    return 0


def _bench_costs(args: argparse.Namespace) -> int:
    from serve_app.bench.costs import format_costs, png_encode_ms, run_costs_benchmark
    from serve_app.config import app_args_from_config

    proxy, redis_cost = run_costs_benchmark(app_args_from_config(args.config), args.clients, args.seconds, args.jobs)
    print(f"genserve bench-costs: {args.config}, one local node, jobs in a redis-server on loopback")
    print(format_costs(proxy, redis_cost, png_encode_ms()))
    return 0


def _bench_gpu(args: argparse.Namespace) -> int:
    from serve_app.bench.gpu import format_gpu_table, run_gpu_benchmark

    device, cases = run_gpu_benchmark(args.repeats, args.cpu_compile, args.model, args.steps)
    print(format_gpu_table(device, cases))
    return 0


def _bench_rounds(args: argparse.Namespace, command: str, rounds: str, run, format_table) -> int:
    """bench-jobs and bench-agents: the same request sent more than one way, `args.requests` rounds."""
    samples, overheads = run(args.config, args.requests, args.warmup, args.width, args.height, args.steps)
    print(f"genserve {command}: {args.config}, {args.width}x{args.height}, {args.steps} steps, "
          f"{args.requests} rounds ({rounds}) after {args.warmup} warm-up")
    print(format_table(samples, overheads))
    return 0


def _bench_jobs(args: argparse.Namespace) -> int:
    from serve_app.bench.jobs import format_jobs_table, run_jobs_benchmark

    return _bench_rounds(args, "bench-jobs", "sync, then the same as a job", run_jobs_benchmark, format_jobs_table)


def _bench_agents(args: argparse.Namespace) -> int:
    from serve_app.bench.agents import format_agents_table, run_agents_benchmark

    return _bench_rounds(args, "bench-agents", "each interface in turn, same request", run_agents_benchmark,
                         format_agents_table)


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


def _bench_quality(args: argparse.Namespace) -> int:
    from serve_app.bench import quality

    if args.candidates:
        counts = sorted(set(args.candidates))
        results = quality.run_candidates_benchmark(args.config, counts, args.requests, args.warmup, args.steps)
        print(f"genserve bench-quality --candidates: {args.config}, default model, {args.requests} requests per row "
              f"after {args.warmup} warm-up, in process; best-of-N: one request, N images in one generator call; "
              "N rounds: one request, one image a round, N rounds")
        print(quality.format_candidates_table(results))
    if args.gate:
        runs = quality.run_gate_benchmark(args.config, args.percentile, args.max_attempts, args.requests, args.warmup)
        print(f"genserve bench-quality --gate: {args.config}, default model, {args.requests} requests each after "
              f"{args.warmup} warm-up, in process, the same settings but the gate")
        print(quality.format_gate_table(runs))
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from serve_app.bench.quality import run_calibration, write_calibration

    data = run_calibration(args.config, args.prompts, args.seed)
    write_calibration(data, args.output)
    for model, metrics in data["models"].items():
        counts = {metric: int(sum(bins.values())) for metric, bins in metrics.items()}
        print(f"{model}: {counts}")
    print(f"wrote {args.output}")
    return 0


def _save_tiny(args: argparse.Namespace) -> int:
    from deployments.tiny import save_tiny

    print(save_tiny(args.family, args.folder))
    return 0


def _download(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from serve_app.config import app_args_from_config
    from serve_app.weights import run_download

    try:  # a profile that does not fit its card (`gpu:`) fails here, before anything is fetched
        app_args = app_args_from_config(args.config)
    except ValidationError as error:
        print(f"genserve: {args.config} is not a valid config: {error}", file=sys.stderr)
        return 2
    return run_download(app_args, dry_run=args.dry_run, cache_dir=args.dir, include_optional=not args.skip_optional)


def _doctor(args: argparse.Namespace) -> int:
    from serve_app.doctor import run_doctor

    return run_doctor(args.config, memory_gib=args.gpu_memory_gib)
def _bench_overload(args: argparse.Namespace) -> int:
    from serve_app.bench.overload import format_overload_table, run_overload

    body = {"prompt": "a lighthouse on a cliff at dusk", "enhance": False, "width": args.width,
            "height": args.height, "num_inference_steps": args.steps}
    counts = [int(count) for count in args.clients.split(",")]
    runs = run_overload(args.url, counts, args.duration, body, honour_retry_after=args.honour_retry_after)
    print(f"genserve bench-overload: {args.url}, POST /v1/images {args.width}x{args.height} {args.steps} steps, "
          f"{args.duration:g} s per client count, rejected clients "
          f"{'wait Retry-After' if args.honour_retry_after else 'retry at once'}; "
          "ratio: throughput over the first count's")
    print(format_overload_table(runs))
    return 0


def _bench_fairness(args: argparse.Namespace) -> int:
    from serve_app.bench.fairness import run_fairness_benchmark

    report = run_fairness_benchmark(args.config, args.a_jobs, args.b_interval, args.backlog, args.idle_jobs)
    simulated = f" (simulated {report.simulated}: every time is simulated)" if report.simulated else ""
    print(f"genserve bench-fairness: {args.config}{simulated}")
    print("\n".join(report.lines()))
    return 0


AUTOSCALING_FLAGS = {"min_replicas": "min_replicas", "max_replicas": "max_replicas",
                     "target_ongoing": "target_ongoing_requests", "upscale_delay": "upscale_delay_s",
                     "downscale_delay": "downscale_delay_s", "look_back": "look_back_period_s",
                     "metrics_interval": "metrics_interval_s"}


def _bench_autoscale(args: argparse.Namespace) -> int:
    from serve_app.bench import autoscale
    from serve_app.config import AutoscalingOptions, app_args_from_config

    config = app_args_from_config(args.config)
    entry = config.image_model(args.model)
    # The entry's own settings (its replica bounds are the config's card's, so the flags' 1 to 8 replace
    # them); each flag given replaces one field.
    base = entry.deployment.autoscaling or AutoscalingOptions()
    flags = {field: getattr(args, flag) for flag, field in AUTOSCALING_FLAGS.items() if getattr(args, flag) is not None}
    options = AutoscalingOptions.model_validate({**base.model_dump(), **flags})
    phases = autoscale.parse_phases(args.phases)
    gpus = args.gpus or max(16, options.max_replicas)
    simulated = entry.device.simulated
    print(f"genserve bench-autoscale: {args.config}, model {args.model}, phases {' '.join(args.phases)} "
          f"(clients:seconds), {gpus} logical GPUs, one per replica"
          + (f" (simulated {simulated}: device times are simulated)" if simulated else ""), flush=True)
    samples, done, rejections = autoscale.run_autoscale_benchmark(config, args.model, options, phases, gpus,
                                                                  args.replica_cpus, args.interval, args.window)
    # First: a run's samples and requests outlive a failure below.
    autoscale.write_samples(samples, args.samples)
    autoscale.write_requests(done, args.samples.removesuffix(".csv") + ".requests.csv")
    summary = autoscale.summarize(samples, done, phases, options, rejections)
    summary.cold_start = autoscale.modelled_cold_start(config, args.model)
    print(autoscale.format_summary(summary))
    title = (f"{args.model} autoscaling {options.min_replicas}-{options.max_replicas}, target "
             f"{options.target_ongoing_requests:g}, up/down delay {options.upscale_delay_s:g}/{options.downscale_delay_s:g} s"
             + (f" (simulated {simulated})" if simulated else ""))
    autoscale.plot(samples, args.plot, title, options.max_replicas)
    print(f"samples: {args.samples} (requests beside them: .requests.csv); plot: {args.plot}")
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
    serve.add_argument("--strict", action="store_true",
                       help="refuse to start when a keys file can be read or written by group or others "
                            "(without it: a warning)")
    serve.set_defaults(func=_serve)

    bench = commands.add_parser("bench", help="graph overhead over in-process calls")
    bench_jobs = commands.add_parser("bench-jobs", help="async job overhead over the same sync request")
    bench_agents = commands.add_parser("bench-agents", help="OpenAI route, MCP tools and A2A over the same sync request")
    for parser_, func in ((bench, _bench), (bench_jobs, _bench_jobs), (bench_agents, _bench_agents)):
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
                       help="instead: throughput and p50/p95 at these client counts, batching off and on (e.g. 1 8 64)")
    bench.add_argument("--replicas", type=int, nargs="+", default=None, metavar="N",
                       help="throughput on N logical GPUs, one replica of --model on each (docs/scaling.md)")
    bench.add_argument("--model", default=None, help="with --replicas: the image model (default: the default)")
    bench.add_argument("--requests-per-replica", type=int, default=30,
                       help="with --replicas: requests = this x N (fewer weigh the drain at the end more at large N)")
    bench.add_argument("--clients-per-replica", type=float, default=2.5,
                       help="with --replicas: clients = this x N, rounded up (2.5: one running and one ready per "
                            "replica, and a few waiting at the ingress for the replica that frees first)")
    bench.add_argument("--ingress-replicas", type=int, default=None,
                       help="with --replicas: fixed Ingress replicas (default: the config's)")
    bench.add_argument("--max-ongoing", type=int, default=None,
                       help="with --replicas: the model's max_ongoing_requests (default: the config's)")
    bench.add_argument("--max-batch-images", type=int, default=8, help="with --concurrency: the batch cap")
    bench.add_argument("--batch-wait-ms", type=float, default=20.0, help="with --concurrency: the batch wait")
    bench.add_argument("--batching", choices=["off", "on", "both"], default="both",
                       help="with --concurrency: the default model and the scorer with batching off, on, or both in turn")
    bench.add_argument("--storm", type=int, default=64, metavar="CLIENTS",
                       help="with --concurrency: last, this many clients that send a rejected request again at once "
                            "(0: none)")
    bench.add_argument("--json", action="store_true",
                       help="with --concurrency: one JSON object per level on stdout instead of the table")
    bench.add_argument("--auth-overhead", action="store_true",
                       help="instead: job status read latency without keys, then with keys and per-key limits")
    bench.add_argument("--limits-storage", default=None,
                       help="with --auth-overhead: the limits storage URI for the keyed run (default: the config's)")
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

    bench_quality = commands.add_parser("bench-quality", help="best-of-N vs rounds; a gated request vs an ungated one")
    bench_quality.add_argument("--config", default="configs/dev.yaml")
    bench_quality.add_argument("--candidates", type=int, nargs="*", default=None, metavar="N",
                               help="best-of-N against N sequential rounds, for each N (e.g. 2 4 8)")
    bench_quality.add_argument("--gate", action="store_true", help="a gated request against an ungated one")
    bench_quality.add_argument("--percentile", type=float, default=70.0, help="with --gate: quality_percentile")
    bench_quality.add_argument("--max-attempts", type=int, default=3, help="with --gate: rounds at most")
    bench_quality.add_argument("--requests", type=int, default=20)
    bench_quality.add_argument("--warmup", type=int, default=2)
    bench_quality.add_argument("--steps", type=int, default=None, help="default: the model's")
    bench_quality.set_defaults(func=_bench_quality)

    calibrate = commands.add_parser("calibrate", help="a starting calibration for quality_percentile")
    calibrate.add_argument("config", nargs="?", default="configs/dev.yaml")
    calibrate.add_argument("-o", "--output", required=True, help="the JSON file to write (policy.calibration)")
    calibrate.add_argument("--prompts", type=int, default=64, help="random prompts per model")
    calibrate.add_argument("--seed", type=int, default=0, help="of the prompts and the images")
    calibrate.set_defaults(func=_calibrate)

    keys = commands.add_parser("keys", help="API keys (docs/security.md)")
    key_commands = keys.add_subparsers(dest="keys_command", required=True)
    create = key_commands.add_parser("create", help="make a new API key; it is printed once")
    create.add_argument("name", help="who or what the key is for (shown in the admin usage route)")
    create.add_argument("--scopes", nargs="+", default=["generate", "read"], choices=["generate", "read", "admin"])
    create.add_argument("--file", default=None,
                        help="keys file to add the entry to (created, mode 600, if missing); else print the entry")
    create.add_argument("--expires-at", default=None, help="ISO 8601 time the key stops working, e.g. 2027-01-01T00:00:00Z")
    create.add_argument("--requests-per-minute", type=int, default=None)
    create.add_argument("--concurrent-requests", type=int, default=None)
    create.add_argument("--active-jobs", type=int, default=None)
    create.add_argument("--queued-jobs", type=int, default=None, help="jobs waiting at once (429 past it)")
    create.add_argument("--daily-images", type=int, default=None)
    create.set_defaults(func=_keys_create)
    overload = commands.add_parser("bench-overload", help="C concurrent clients for D seconds against a running app")
    overload.add_argument("--url", default="http://127.0.0.1:8000")
    overload.add_argument("--clients", default="8,64", help="comma-separated client counts, run in turn")
    overload.add_argument("--duration", type=float, default=30.0, help="seconds per client count")
    overload.add_argument("--width", type=int, default=256)
    overload.add_argument("--height", type=int, default=256)
    overload.add_argument("--steps", type=int, default=4)
    overload.add_argument("--honour-retry-after", action="store_true",
                          help="a rejected client waits Retry-After before its next request (default: at once)")
    overload.set_defaults(func=_bench_overload)
    costs = commands.add_parser("bench-costs", help="proxy requests per core and Redis commands per job")
    costs.add_argument("--config", default="configs/sim-h200.yaml")
    costs.add_argument("--clients", type=int, default=16, help="concurrent clients on GET /livez")
    costs.add_argument("--seconds", type=float, default=15.0, help="of GET /livez load")
    costs.add_argument("--jobs", type=int, default=20, help="image jobs, one after another")
    costs.set_defaults(func=_bench_costs)
    fairness = commands.add_parser("bench-fairness", help="two keys through the fair job queue (docs/jobs.md)")
    fairness.add_argument("--config", default="configs/sim-h200.yaml")
    fairness.add_argument("--a-jobs", type=int, default=500, help="key A's image jobs, submitted at once")
    fairness.add_argument("--b-interval", type=float, default=2.0, help="key B submits one job this often (s)")
    fairness.add_argument("--backlog", type=int, default=300, help="jobs of each key at weights 3:1")
    fairness.add_argument("--idle-jobs", type=int, default=5, help="B's jobs one at a time on an idle service")
    fairness.set_defaults(func=_bench_fairness)

    autoscale = commands.add_parser("bench-autoscale", help="a step load on an autoscaled model pool (docs/benchmarks.md)")
    autoscale.add_argument("--config", default="configs/sim-h200.yaml")
    autoscale.add_argument("--model", default="flux-dev", help="the image model whose pool autoscales")
    autoscale.add_argument("--phases", nargs="+", default=["1:30", "32:150", "1:150"], metavar="CLIENTS:SECONDS",
                           help="the load, phase by phase")
    autoscale.add_argument("--gpus", type=int, default=None, help="logical GPUs Ray declares (default: max(16, max replicas))")
    autoscale.add_argument("--replica-cpus", type=float, default=0.1, help="CPUs reserved per model replica")
    autoscale.add_argument("--interval", type=float, default=1.0, help="seconds between samples")
    autoscale.add_argument("--window", type=float, default=10.0, help="seconds of the throughput and p95 window")
    autoscale.add_argument("--samples", default="autoscaling.csv", help="where the samples go (CSV; the requests beside them, .requests.csv)")
    autoscale.add_argument("--plot", default="docs/images/autoscaling.png", help="where the plot goes (PNG)")
    autoscale.add_argument("--min-replicas", type=int, default=1, help="the pool's least replicas")
    autoscale.add_argument("--max-replicas", type=int, default=8, help="the pool's most replicas")
    for flag in ("target_ongoing", "upscale_delay", "downscale_delay", "look_back", "metrics_interval"):
        autoscale.add_argument(f"--{flag.replace('_', '-')}", type=float, default=None,
                               help=f"autoscaling {AUTOSCALING_FLAGS[flag]} (default: the model's config, else Serve's)")
    autoscale.set_defaults(func=_bench_autoscale)
    tiny = commands.add_parser("save-tiny", help="write a tiny random-weight model folder")
    tiny.add_argument("family", choices=tiny_kinds())
    tiny.add_argument("folder")
    tiny.set_defaults(func=_save_tiny)

    from serve_app.cli import remote

    remote.add_commands(commands)
    download = commands.add_parser(
        "download", help="fetch exactly the hub weights a config names (HF cache, or --dir) for offline serving")
    download.add_argument("config")
    download.add_argument("--dry-run", action="store_true", help="list repos, files and sizes; fetch nothing")
    download.add_argument("--dir", default=None,
                          help="a Hugging Face cache folder to fill instead of the default one (serve with HF_HUB_CACHE=DIR)")
    download.add_argument("--skip-optional", action="store_true",
                          help="leave out image models marked enabled: false (e.g. the gated FLUX.1-dev)")
    download.set_defaults(func=_download)

    doctor = commands.add_parser("doctor", help="check this machine can serve a config: torch, CUDA, GPU memory, "
                                                "weights, ports")
    doctor.add_argument("config")
    doctor.add_argument("--gpu-memory-gib", type=float, default=None,
                        help="plan on a card of this memory instead of this node's GPU (which shipped profile fits it)")
    doctor.set_defaults(func=_doctor)

    args = parser.parse_args(argv)
    if args.command == "serve" and args.detach and not (args.address or os.environ.get("RAY_ADDRESS")):
        parser.error("--detach needs --address: a Ray started by this command would stop with it")
    if args.func.__module__ == remote.__name__:
        return remote.run(args)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
