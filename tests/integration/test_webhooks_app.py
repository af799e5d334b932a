"""Webhooks and A2A push notifications on the shared dev app, to receivers on loopback (allowed in
its config): a job's webhook verified with the `standardwebhooks` package and delivered again with
the same id after a 500; a message sent by the official a2a-sdk client with a push config gets its
completed task POSTed; push configs created, got, listed and deleted through that client."""

import asyncio
import uuid
from pathlib import Path

import httpx
import pytest
from a2a.client import ClientConfig, ClientFactory
from a2a.types import a2a_pb2 as pb
from standardwebhooks import Webhook

from tests.helpers import wait_until
from tests.webhook_receiver import Receiver

pytestmark = pytest.mark.integration


def _secret(dev_app) -> str:
    return Path(dev_app["args"]["jobs"]["webhooks"]["secret_file"]).read_text().strip()


def test_a_jobs_webhook_is_signed_and_retried_with_the_same_id(dev_app):
    client = dev_app["client"]
    with Receiver([500]) as receiver:
        submitted = client.post("/v1/jobs", json={"kind": "image", "request": {"prompt": "a red kite", "seed": 3},
                                                  "webhook": {"url": receiver.url}})
        assert submitted.status_code == 202, submitted.text
        job_id = submitted.json()["id"]
        received = receiver.wait_for(2, timeout_s=60)
        wait_until(lambda: client.get(f"/v1/jobs/{job_id}").json()["webhooks"][0]["state"] == "delivered", 30)
    assert {headers["webhook-id"] for headers, _ in received} == {f"msg_{job_id}_0"}
    for headers, body in received:
        payload = Webhook(_secret(dev_app)).verify(body, headers)
        assert payload["type"] == "job.succeeded" and payload["data"]["state"] == "succeeded"
        image = payload["data"]["result"]["images"][0]
        assert image["url"].startswith(f"/v1/jobs/{job_id}/files/") and "b64_json" not in image
    [delivery] = client.get(f"/v1/jobs/{job_id}").json()["webhooks"]
    assert delivery["attempts"] == 2 and delivery["last_status"] == 200 and delivery["event"] == "job.succeeded"
    refused = client.post("/v1/jobs", json={"kind": "image", "request": {"prompt": "x"},
                                            "webhook": {"url": "http://169.254.169.254/latest/meta-data/"}})
    assert refused.status_code == 422 and refused.json()["detail"][0]["loc"] == ["body", "webhook", "url"]


async def _client(base: str):
    http = httpx.AsyncClient(timeout=120)
    return await ClientFactory(ClientConfig(httpx_client=http, streaming=False)).create_from_url(base)


def test_an_a2a_message_with_a_push_config_gets_its_completed_task_posted(dev_app):
    base = str(dev_app["client"].base_url).rstrip("/")
    card = httpx.get(f"{base}/.well-known/agent-card.json").json()
    assert card["capabilities"]["pushNotifications"] is True

    async def run(url: str):
        client = await _client(base)
        request = pb.SendMessageRequest(message=pb.Message(message_id=str(uuid.uuid4()), role=pb.ROLE_USER,
                                                           parts=[pb.Part(text="a paper boat")]))
        request.configuration.return_immediately = True
        request.configuration.task_push_notification_config.CopyFrom(
            pb.TaskPushNotificationConfig(url=url, token="tok-1"))
        [response] = [r async for r in client.send_message(request)]
        task_id = response.task.id
        made = await client.create_task_push_notification_config(
            pb.TaskPushNotificationConfig(task_id=task_id, id="second", url=url))
        listed = await client.list_task_push_notification_configs(
            pb.ListTaskPushNotificationConfigsRequest(task_id=task_id))
        got = await client.get_task_push_notification_config(
            pb.GetTaskPushNotificationConfigRequest(task_id=task_id, id="second"))
        await client.delete_task_push_notification_config(
            pb.DeleteTaskPushNotificationConfigRequest(task_id=task_id, id="second"))
        after = await client.list_task_push_notification_configs(
            pb.ListTaskPushNotificationConfigsRequest(task_id=task_id))
        return task_id, made, listed, got, after

    with Receiver() as receiver:
        task_id, made, listed, got, after = asyncio.run(run(receiver.url))
        received = receiver.wait_for(1, timeout_s=60)
    assert made.id == "second" and made.task_id == task_id and got.url == made.url
    assert sorted(config.id for config in listed.configs) == sorted([task_id, "second"])
    assert [config.id for config in after.configs] == [task_id], "the first config, sent with the message, stays"
    pushed = [(headers, body) for headers, body in received if headers.get("x-a2a-notification-token") == "tok-1"]
    assert pushed, [headers for headers, _ in received]
    headers, body = pushed[0]
    payload = Webhook(_secret(dev_app)).verify(body, headers)
    assert payload["task"]["id"] == task_id and payload["task"]["status"]["state"] == "TASK_STATE_COMPLETED"
    part = payload["task"]["artifacts"][0]["parts"][0]
    assert part["mediaType"] == "image/png" and part["url"].startswith(f"/v1/jobs/{task_id}/files/")
