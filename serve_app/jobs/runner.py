"""The JobRunner deployment: owns the job store and runs queued jobs (see `dispatch`).

One replica (the builder enforces it). Serve still overlaps two for a while in a rolling update
(the new one starts while the old one drains), so only the holder of the store's runner lease
claims jobs; the other stands by (see `dispatch`). It reaches the models through the same Serve handles as the
ingress, and runs each job through the same `ImageService`/`VideoService` code as the sync
endpoints. The ingress calls it for every /v1/jobs route; the generators call its
`record_progress` after each denoising step.

When the replica stops (a redeploy, `serve shutdown`, SIGTERM to `genserve serve`), its running
jobs go back to the queue without spending an attempt. If it dies instead, Serve starts another,
which requeues the jobs left running, counting the attempt; the same happens when the whole
application is started again on the same store after a crash.
"""

from __future__ import annotations

import asyncio
import logging

from ray import serve

from deployments.runtime.types import ProgressTarget
from serve_app.jobs.dispatch import JobDispatcher
from serve_app.jobs.fairness import FairPolicy
from serve_app.jobs.model import ActiveJobsExceeded, Job, QueuedJobsExceeded
from serve_app.jobs.quality import StoreQualityBook
from serve_app.jobs.store import JobStore
from serve_app.jobs.webhooks import Deliverer, Secrets
from serve_app.security.guard import Auth
from serve_app.services.facade import Services
from serve_app.services.settings import Handles, Settings

logger = logging.getLogger("ray.serve")
# How often the genserve_jobs gauge is refreshed: one GROUP BY (SQLite) or five ZCARDs (Redis).
JOBS_GAUGE_INTERVAL_S = 5.0


# graceful_shutdown_timeout_s: event-stream long polls (at most 15 s) drain first, then `__del__`
# puts the running jobs back in the queue (a few store calls).
@serve.deployment(name="JobRunner", num_replicas=1, max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0.25},
                  graceful_shutdown_timeout_s=60)
class JobRunner:
    """Serves the job store to the ingress and dispatches queued jobs to the model deployments.

    `max_ongoing_requests` is high because its requests are light: status reads, progress
    reports and the long polls behind each open event stream.
    """

    def __init__(self, settings: Settings, handles: Handles, renderers: dict | None = None):
        # The same services the ingress runs requests through, less its fallback and request metrics.
        services = Services.build(settings, handles, ingress=False)
        config, slots = settings.jobs, settings.job_slots
        context = serve.get_replica_context()
        app, deployment = context.app_name, context.deployment

        def progress_target(job: Job) -> ProgressTarget:
            return ProgressTarget(app=app, deployment=deployment, job_id=job.id, attempt=job.attempts, stage="generate",
                                  min_interval_s=config.progress_interval_s)

        self._store = open_store(config)
        # The gate's tallies of job requests go to the store directly (the ingress's through add_quality).
        services.images.quality = StoreQualityBook(self._store, settings.calibration)
        self._fairness = config.fairness
        self._keys = _key_ring(settings.auth.keys_file)
        self._queue_wait = None
        if settings.metrics:
            from ray.serve.metrics import Histogram

            # Tagged by group: bounded by the keys file, never by request data.
            self._queue_wait = Histogram(
                "genserve_job_queue_wait_seconds", description="Submit to start of jobs and sync turns, by key group.",
                boundaries=[0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900, 3600], tag_keys=("group", "kind"))
        self._dispatcher = JobDispatcher(self._store, services.images, services.videos, slots, config.retry_limit,
                                         config.sweep_interval_s, progress_target,
                                         max_queued_jobs=config.max_queued_jobs,
                                         max_request_bytes=config.max_request_bytes, queued_ttl_s=config.queued_ttl_s,
                                         lease_ttl_s=config.runner_lease_s, policy=self.policy,
                                         on_claim=self._claimed,
                                         deliverer=build_deliverer(self._store, settings, renderers))
        # Serve runs the constructor on the replica's event loop. Recovering the jobs a previous
        # runner left running comes once this one holds the store's lease.
        self._dispatcher.start()
        self._jobs_gauge = None
        if settings.metrics:
            from ray.serve.metrics import Gauge

            self._jobs_gauge = Gauge("genserve_jobs", description="Jobs in the store, by state.", tag_keys=("state",))
            self._report_task = asyncio.get_running_loop().create_task(self._report_jobs(JOBS_GAUGE_INTERVAL_S))
        logger.info("JobRunner: %s store, slots %s, retry limit %d", config.store, slots, config.retry_limit)

    def policy(self) -> FairPolicy:
        """The fair order's weights (the keys file as it is now) and time constants."""
        weights = self._keys.weights() if self._keys is not None else {}
        return FairPolicy(weights=weights, half_life_s=self._fairness.half_life_s,
                          priority_age_s=self._fairness.priority_age_s)

    def _claimed(self, job: Job) -> None:
        if self._queue_wait is not None and job.attempts == 1:
            self._queue_wait.observe(max(0.0, (job.started_at or job.created_at) - job.created_at),
                                     tags={"group": job.group or "local", "kind": job.kind})

    async def submit(self, kind: str, request: dict, idempotency_key: str | None = None,
                     request_hash: str | None = None, owner: str | None = None,
                     max_active: int | None = None, group: str | None = None, priority: str = "normal",
                     max_queued: int | None = None,
                     targets: list[dict] | None = None) -> tuple[Job, bool, int | None] | tuple[None, str, int]:
        """(job, created, queue position); (None, the limit's name, limit) when the owner is at
        `max_active` ("active_jobs") or `max_queued` ("queued_jobs")."""
        try:
            return await self._dispatcher.submit(kind, request, idempotency_key, request_hash, owner, max_active,
                                                 group, priority, max_queued, targets)
        except ActiveJobsExceeded as error:
            return None, "active_jobs", error.limit
        except QueuedJobsExceeded as error:
            return None, "queued_jobs", error.limit

    async def status_with_estimate(self, job_id: str) -> tuple[Job, int | None, float | None] | None:
        return await self._dispatcher.status_with_estimate(job_id)

    async def sync_turn(self, kind: str, owner: str | None, group: str | None, wait_s: float) -> str | None:
        return await self._dispatcher.sync_turn(kind, owner, group, wait_s)

    async def end_turn(self, token: str, group: str | None, device_s: float) -> None:
        await self._dispatcher.end_turn(token, group, device_s)

    async def fair_usage(self) -> dict[str, dict]:
        return await self._dispatcher.fair_usage()

    async def put_target(self, job_id: str, target: dict) -> bool | None:
        return await self._dispatcher.put_target(job_id, target)

    async def delete_target(self, job_id: str, target_id: str) -> bool | None:
        return await self._dispatcher.delete_target(job_id, target_id)

    async def replay(self, idempotency_key: str, owner: str | None = None) -> tuple[Job, int | None] | None:
        return await self._dispatcher.replay(idempotency_key, owner)

    async def status(self, job_id: str) -> tuple[Job, int | None] | None:
        return await self._dispatcher.status(job_id)

    async def list(self, state: str | None, limit: int, before: int | None,
                   owner: str | None = None) -> list[tuple[Job, int | None]]:
        return await self._dispatcher.list(state, limit, before, owner)

    async def delete(self, job_id: str) -> bool | None:
        return await self._dispatcher.delete(job_id)

    async def active_count(self, owner: str) -> int:
        return await asyncio.to_thread(self._store.active_count, owner)

    async def cancel(self, job_id: str) -> tuple[Job, bool, int | None] | None:
        return await self._dispatcher.cancel(job_id)

    async def watch(self, job_id: str, after_version: int, timeout_s: float) -> Job | None:
        return await self._dispatcher.watch(job_id, after_version, timeout_s)

    async def read_file(self, job_id: str, name: str) -> tuple[bytes, str] | None:
        return await self._dispatcher.read_file(job_id, name)

    async def record_progress(self, job_id: str, attempt: int, progress: dict) -> None:
        await self._dispatcher.record_progress(job_id, attempt, progress)

    def info(self) -> dict:
        return self._dispatcher.info()

    async def add_quality(self, model: str, metric: str, increments: dict[str, float]) -> None:
        """The ingress's quality tallies (serve_app.jobs.quality.RunnerQualityBook)."""
        await asyncio.to_thread(self._store.add_quality, model, metric, increments)

    async def quality_tallies(self) -> dict[tuple[str, str], dict[str, float]]:
        return await asyncio.to_thread(self._store.quality_tallies)

    async def _report_jobs(self, interval_s: float) -> None:
        """Keep the `genserve_jobs{state}` gauge current (queued and running are the ones to watch)."""
        while True:
            try:
                counts = await asyncio.to_thread(self._store.counts)
                for state, count in counts.items():
                    self._jobs_gauge.set(count, tags={"state": state})
            except Exception:  # a store hiccup must not end the reporting; health checks cover the store
                logger.exception("could not count jobs for the genserve_jobs gauge")
            await asyncio.sleep(interval_s)

    async def check_health(self) -> None:
        if not self._dispatcher.healthy():
            raise RuntimeError("the job dispatch loop stopped")
        await asyncio.to_thread(self._store.ping)

    async def __del__(self):
        if hasattr(self, "_dispatcher"):  # the constructor got that far
            await self._dispatcher.stop()
            self._store.close()


def build_deliverer(store: JobStore, settings: Settings, renderers: dict | None = None) -> Deliverer:
    """The runner's webhook and A2A push deliverer: signing secrets and signed result URLs as the
    ingress has them (the keys file the config names, read on this replica)."""
    config = settings.jobs.webhooks
    try:
        auth = Auth.from_config(settings.auth, "memory://", metrics=False)
    except (OSError, ValueError) as error:  # the runner's node lacks the keys file the ingress reads
        logger.warning("webhooks: cannot read auth.keys_file here (%s); keyed jobs' webhooks are signed with the "
                       "service secret, if any, and their result URLs are unsigned", error)
        auth = None
    base = (config.public_url or "").rstrip("/")

    def file_url(job: Job, name: str) -> str:
        path = f"/v1/jobs/{job.id}/files/{name}"
        return base + (path if auth is None else auth.sign_path(path, job.owner or ""))

    keys = None if auth is None else auth.keys
    return Deliverer(store, config, Secrets(keys, config.secret()), file_url, renderers, metrics=settings.metrics)


def _key_ring(keys_file: str | None):
    """The keys file's weights, where this replica can read it (the ingress checks it exists at
    start); without it every group weighs 1, and that is logged."""
    if keys_file is None:
        return None
    from serve_app.security.keys import KeyRing

    try:
        return KeyRing(keys_file)
    except (OSError, ValueError) as error:
        logger.warning("JobRunner: cannot read the keys file for fair-queueing weights (%s); every key weighs 1", error)
        return None


def open_store(config) -> JobStore:
    """The store a `JobsConfig` names."""
    if config.store == "redis":
        from serve_app.jobs.redis_store import RedisJobStore

        return RedisJobStore(config.redis_url, ttl_s=config.ttl_s, prefix=config.redis_prefix,
                             connect_timeout_s=config.redis_timeout_s / 2, socket_timeout_s=config.redis_timeout_s,
                             config_check=config.redis_config_check, password=config.redis_password())
    from serve_app.jobs.sqlite_store import SqliteJobStore

    return SqliteJobStore(config.data_dir, ttl_s=config.ttl_s)
