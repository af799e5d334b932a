"""Deploy a Serve config file and wait, up to a deadline, until its applications run.

`serve run CONFIG` submits a config and then waits forever, saying nothing when a replica asks
for resources the cluster never offers (a GPU on a machine without one, a GPU type no node has).
`genserve serve` deploys the same way `serve run` and `serve deploy` do (the controller applies
the whole config: import paths, args, runtime envs), then polls `serve.status()` until every
application runs, one fails, or the deadline passes. Then it says which deployments are not
running, what each of their replicas asks for, and whether any node could ever offer it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import ray
from ray import serve
from ray.serve.schema import ApplicationStatus, DeploymentDetails, ServeDeploySchema, ServeInstanceDetails

POLL_INTERVAL_S = 1.0


class DeployError(RuntimeError):
    """An application did not reach RUNNING; the message says why, naming deployments and resources."""


def deploy_config(config: ServeDeploySchema) -> None:
    """Start Serve with the config's cluster-wide options and submit its applications.

    The same calls `serve run CONFIG` makes: Serve's cluster options (proxies, HTTP and gRPC)
    from the file, then the controller's `apply_config` with the whole config.
    """
    serve.start(
        proxy_location=config.proxy_location,
        http_options=config.http_options.model_dump(),
        grpc_options=config.grpc_options.model_dump(),
        logging_config=config.logging_config,
        controller_options=config.controller_options,
    )
    _client().deploy_apps(config, _blocking=False)


def wait_until_running(app_names: Iterable[str], timeout_s: float, http_host: str | None = None,
                       http_port: int | None = None, prefixes: Iterable[str] = ()) -> None:
    """Return once every named application is RUNNING and, given `http_port`, the HTTP proxy there
    routes each of `prefixes` (the proxy starts apart from the applications: on a busy machine it can still
    refuse connections after they run).

    Raises `DeployError` at once when one fails to deploy, and after `timeout_s` seconds when
    one is still not running or not routed, with `explain_not_running` as the message.
    """
    names, prefixes = list(app_names), list(prefixes)
    deadline = time.monotonic() + timeout_s
    while True:
        applications = serve.status().applications
        statuses = {name: applications[name].status if name in applications else None for name in names}
        if all(status == ApplicationStatus.RUNNING for status in statuses.values()):
            if http_port is None or _proxy_routes(http_host, http_port, prefixes):
                return
            if time.monotonic() >= deadline:
                raise DeployError(f"the applications run, but the HTTP proxy on port {http_port} does not route "
                                  f"{', '.join(prefixes)} within {timeout_s:g}s")
            time.sleep(POLL_INTERVAL_S)
            continue
        if ApplicationStatus.DEPLOY_FAILED in statuses.values():
            raise DeployError(explain_not_running(names, "failed to deploy"))
        if time.monotonic() >= deadline:
            raise DeployError(explain_not_running(names, f"did not start within {timeout_s:g}s"))
        time.sleep(POLL_INTERVAL_S)


def _proxy_routes(host: str | None, port: int, prefixes: list[str]) -> bool:
    """Whether Serve's proxy on `port` answers `/-/routes` listing every prefix."""
    import httpx

    address = "127.0.0.1" if host in (None, "", "0.0.0.0", "::") else host
    try:
        routes = httpx.get(f"http://{address}:{port}/-/routes", timeout=2).json()
    except (httpx.HTTPError, ValueError):
        return False
    return isinstance(routes, dict) and all(prefix in routes for prefix in prefixes)


def serve_details() -> ServeInstanceDetails:
    """What the Serve controller knows: applications, deployments, replicas and their nodes."""
    return ServeInstanceDetails(**_client().get_serve_details())


def explain_not_running(app_names: Iterable[str], what: str) -> str:
    """A readable report on the applications not RUNNING: each deployment short of its target,
    the resources each of its replicas asks for, and what the cluster's nodes have."""
    details = serve_details()
    nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    lines = []
    for name in app_names:
        app = details.applications.get(name)
        if app is None:
            lines.append(f"application {name!r}: not deployed")
            continue
        if app.status == ApplicationStatus.RUNNING:
            continue
        lines.append(f"application {name!r} {what}: {app.status.value}")
        if app.message:
            lines.append(f"  {app.message.strip()}")
        for deployment in app.deployments.values():
            if deployment.status.value != "HEALTHY":
                lines.extend(_explain_deployment(deployment, nodes))
    lines.append(f"cluster: {_fmt(ray.cluster_resources())} in all, {_fmt(ray.available_resources())} free")
    return "\n".join(lines)


def _explain_deployment(deployment: DeploymentDetails, nodes: list[dict]) -> list[str]:
    running = sum(replica.state.value == "RUNNING" for replica in deployment.replicas)
    states: dict[str, int] = {}
    for replica in deployment.replicas:
        states[replica.state.value] = states.get(replica.state.value, 0) + 1
    wanted = deployment.required_resources
    lines = [
        f"  - {deployment.name}: {deployment.status.value}, {running} of {deployment.target_num_replicas} "
        f"replicas running {states or ''}".rstrip()
        + f"; each replica asks for {_fmt(wanted)}"
    ]
    if not any(_fits(wanted, node) for node in nodes):
        lines.append(
            f"    no node in the cluster has {_fmt(wanted)}: it stays pending until one joins "
            "(an autoscaling cluster adds one only if a node type offers it)"
        )
    if deployment.message:
        lines.append(f"    Serve says: {deployment.message.strip()}")
    return lines


def _fits(wanted: dict, node: dict) -> bool:
    return all(node.get(resource, 0) >= amount for resource, amount in wanted.items() if amount)


def _fmt(resources: dict) -> str:
    # Memory and the per-node markers are never what a replica waits for here: leave them out.
    shown = {
        key: round(value, 4)
        for key, value in sorted(resources.items())
        if not key.startswith("node:") and key not in ("memory", "object_store_memory")
    }
    return "{" + ", ".join(f"{key}: {value:g}" for key, value in shown.items()) + "}"


def shutdown_gracefully(config: ServeDeploySchema, app_names: Iterable[str]) -> None:
    """Delete the applications, then wait while their replicas finish what they hold (each
    deployment's graceful_shutdown_timeout_s: sync requests answered, running jobs put back in the
    queue), then shut Serve down. `serve.shutdown()` alone waits 30 s at most and then kills the
    controller, cutting those short."""
    names = list(app_names)
    for name in names:
        serve.delete(name, _blocking=False)
    deadline = time.monotonic() + _longest_grace_s(config) + 30
    while time.monotonic() < deadline and set(names) & set(serve.status().applications):
        time.sleep(POLL_INTERVAL_S)
    serve.shutdown()


def _longest_grace_s(config: ServeDeploySchema) -> float:
    """The longest graceful_shutdown_timeout_s of the config's deployments (Serve's default: 20)."""
    from serve_app.config import AppArgs

    longest = 20.0
    for application in config.applications:
        if application.import_path == "serve_app.builder:build_app":
            for options in AppArgs.model_validate(application.args or {}).all_deployment_options().values():
                longest = max(longest, options.graceful_shutdown_timeout_s or 0.0)
        for deployment in application.deployments or []:
            grace = getattr(deployment, "graceful_shutdown_timeout_s", None)
            longest = max(longest, grace if isinstance(grace, (int, float)) else 0.0)
    return longest


def _client():
    # Serve's controller client: what `serve run` itself uses to apply a config and read details.
    from ray.serve.context import _get_global_client

    return _get_global_client()
