"""A2A push notification configs over the job store: configs are targets of the task's job, and
the job's end is delivered by the same durable deliveries as webhooks (serve_app.jobs.webhooks).

- `JobPushConfigStore` is the SDK's `PushNotificationConfigStore`: `set_info` puts a target on the
  job (kind `a2a`, the config kept as JSON, its token and credentials as the headers the SDK's own
  sender sends), `get_info` reads the caller's task's configs, `get_info_for_dispatch` every
  config of a task whoever asked, `delete_info` removes one or all. Any Ingress replica serves
  any of them: they live in the job store, never in a replica's memory.
- What is POSTed is `serve_app.api.a2a.push.push_body`.
"""

from __future__ import annotations

from collections.abc import Callable

from a2a.server.context import ServerCallContext
from a2a.server.tasks.push_notification_config_store import (
    PushNotificationConfigStore,
    normalize_push_notification_config,
)
from a2a.types import a2a_pb2 as pb
from a2a.utils.errors import InvalidParamsError, TaskNotFoundError
from google.protobuf.json_format import MessageToDict, ParseDict

from serve_app.jobs import http as jobs_http
from serve_app.jobs.model import EVENTS, Job
from serve_app.protocol.errors import RequestError

KIND = "a2a"


def target_of(config: pb.TaskPushNotificationConfig) -> dict:
    """A normalized push config as a job target: what the deliverer needs, and the config itself."""
    headers = {}
    if config.token:
        headers["X-A2A-Notification-Token"] = config.token
    if config.HasField("authentication") and config.authentication.scheme and config.authentication.credentials:
        headers["Authorization"] = f"{config.authentication.scheme} {config.authentication.credentials}"
    target = {"id": config.id, "kind": KIND, "url": config.url, "events": list(EVENTS.values()),
              "config": MessageToDict(config)}
    if headers:  # no empty objects: the Redis store's scripts re-encode targets (cjson: {} becomes [])
        target["headers"] = headers
    return target


def configs_of(job: Job) -> list[tuple[str, pb.TaskPushNotificationConfig]]:
    """(target id, config) of each push config on the job, normalized to its task: one sent with the
    message was stored before the job had an id, so its task id (and a missing config id) is filled here."""
    return [(target["id"], normalize_push_notification_config(
                job.id, ParseDict(target["config"], pb.TaskPushNotificationConfig())))
            for target in job.targets if target.get("kind") == KIND]


class JobPushConfigStore(PushNotificationConfigStore):
    """Push configs as targets of the task's job (see the module docstring). `jobs()`: the
    replica's JobsApi; the caller is the HTTP request in the call context (its API key)."""

    def __init__(self, jobs: Callable[[], jobs_http.JobsApi]):
        self._jobs = jobs

    async def _job(self, task_id: str, context: ServerCallContext | None) -> Job:
        try:
            if context is None:  # dispatch: whoever set them
                found = await self._jobs().runner.status.remote(task_id)
                if found is None:
                    raise jobs_http.JobError(404, "no job")
                return found[0]
            return (await self._jobs().find(task_id, context.state["request"]))[0]
        except jobs_http.JobError:
            raise TaskNotFoundError(f"no task {task_id!r}: it never existed, or its job expired") from None

    async def checked_target(self, task_id: str, config: pb.TaskPushNotificationConfig) -> dict:
        """The config as a target, its URL checked as a webhook's is (InvalidParams naming `url`);
        `task_id` "" for a config sent with the message that makes the task."""
        stored = normalize_push_notification_config(task_id, config)
        try:
            await self._jobs().webhooks.check_url(stored.url, field="url")
        except RequestError as error:  # the shape of the agent's other InvalidParams errors
            message = f"{error.field}: {error.message} (allowed: {error.allowed})"
            raise InvalidParamsError(message, data={"errors": [{"field": error.field, "message": message}]}) from None
        return target_of(stored)

    async def set_info(self, task_id, notification_config, context):
        await self._job(task_id, context)
        target = await self.checked_target(task_id, notification_config)
        if await self._jobs().runner.put_target.remote(task_id, target) is None:
            raise TaskNotFoundError(f"no task {task_id!r}")
        return ParseDict(target["config"], pb.TaskPushNotificationConfig())

    async def get_info(self, task_id, context):
        return [config for _, config in configs_of(await self._job(task_id, context))]

    async def get_info_for_dispatch(self, task_id):
        return [config for _, config in configs_of(await self._job(task_id, None))]

    async def delete_info(self, task_id, context, config_id=None):
        job = await self._job(task_id, context)
        for target_id, config in configs_of(job):
            if config_id is None or config.id == config_id:
                await self._jobs().runner.delete_target.remote(task_id, target_id)
